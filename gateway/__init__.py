"""The EMP authorization gateway: one pipeline every request into the EMP service crosses."""

__version__ = "0.1.0"
