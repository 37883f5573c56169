"""Archive files shared by the gateway and the EMP service (docs/security/retention.md).

Parquet exports, their manifests, read-back checks and the recovery of interrupted runs: both
processes archive their own tables the same way, and the EMP service imports nothing from the
gateway, so the file format lives here, once.
"""
