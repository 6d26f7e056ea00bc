"""memcast: online forecasting that keeps learning from every observation and remembers."""

__version__ = "0.1.0"
