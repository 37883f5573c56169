#!/usr/bin/env bash
# Run the upstream in the background and the gateway in the foreground; Ctrl-C stops both.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}

"$PYTHON" -m upstream serve &
upstream=$!
trap 'kill -TERM "$upstream" 2>/dev/null; wait "$upstream" 2>/dev/null || true' EXIT

echo "upstream pid $upstream; gateway on https://localhost:8443 (CA: var/certs/ca.pem)" >&2
echo "token: $PYTHON -m gateway token mint --sub alice --role reader" >&2
"$PYTHON" -m gateway serve
