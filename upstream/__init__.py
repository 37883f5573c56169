"""The EMP service: departments, employees, tickets and ingest streams behind the gateway.

It trusts only the gateway (shared secret) and must never be exposed to clients directly.
"""
