"""The online forecasting REST service: streams, observations -> update -> forecast."""

from service.app import create_app
from service.settings import Settings, get_settings

__all__ = ["Settings", "create_app", "get_settings"]
