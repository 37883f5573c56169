"""Blocking SQL against DuckDB, run only on `upstream.database.Database` threads.

Nothing here may run on the event loop, and no SQL here may contain user text:
values are always bound parameters and identifiers come from `upstream.schema`.
"""
