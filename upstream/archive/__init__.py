"""Retention of the service's ingest tables: old rows to verified Parquet, then deleted.

`files` writes and checks one archive file; `tables` archives ``ingest_records`` and
``ingest_quarantine``; ``POST /internal/archive`` (upstream/routes/archive.py) runs it when the
gateway asks. A row is deleted only once its archive was read back and matched.
"""
