"""Secrets and data keys shared by the gateway and the EMP service.

Both processes resolve secret references (`empsecrets.providers`) and seal sensitive
columns (`empsecrets.fieldcrypt`) the same way; the EMP service imports nothing from the
gateway, so what both need lives here.
"""
