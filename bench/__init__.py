"""Benchmarks: accuracy against the alternatives and service speed against the compute floor.

Scripts (each runs on its own and writes a JSON file; ``run_all.py`` runs them all and writes
``docs/benchmarks.md``):

- ``floor.py``: ``models.online.observe`` in-process, B streams batched, per update mode;
- ``load.py``: ``memcast serve`` (embedded store and Redis) under an async HTTP load generator;
- ``accuracy.py``: ETTh1 online test, memcast's configurations vs naive, OGD and River.
"""
