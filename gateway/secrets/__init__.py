"""The secrets the gateway holds: resolved from references (providers), watched for age (inventory).

Config names a secret by reference (`keystore:upstream`), never by value; see
docs/security/secret-providers.md.
"""
