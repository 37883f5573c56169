"""Helpers shared by the test suites (importable as `support` via pytest's pythonpath)."""
