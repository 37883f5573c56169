"""Declarative validation beyond JSON Schema: per-route rules compiled from config."""
