"""Retention: what is older than its window is exported to Parquet, verified, then deleted.

`files` writes and checks one archive file, `audit_store` and `decisions` archive the audit
store and the decision log, `job` runs them (and asks the EMP service for its tables), `cli` is
`gateway archive run`. Nothing here deletes a row whose archive was not read back and matched.
"""
