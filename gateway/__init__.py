"""The EMP authorization gateway: one pipeline every request into the EMP service crosses."""

import sys

__version__ = "0.1.0"

# python-jsonschema imports rfc3987_syntax for its "iri" formats, which builds a Lark grammar at
# import: ~2 s on every start and every CLI call. Validity is decided by jsonschema-rs, which
# checks those formats itself; python-jsonschema only explains a failure (schemas.py), so it
# does without. A None entry makes that optional import fail as if the package were missing.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
