"""Encryption at rest across the whole deployment: values planted through the gateway's API
are found nowhere on disk, in any file under the deployment's var/ (databases, their WALs,
audit and decision logs, process logs, keystore), while the API still answers them.

The gateway and the EMP service run as real processes on a root of their own, so the test
can stop them and read every byte they left behind.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import duckdb
import pytest
from support.disk import disk_hits
from support.stack import (
    GATEWAY,
    REPO,
    prepare,
    start_gateway,
    start_upstream,
    write_gateway_config,
)

from empsecrets.fieldcrypt import sealed_key_id
from gateway.testing import free_port, mint_dev_token

PLANTED = {
    "employee name": "Ottoline Vantablack-Shrike",
    "employee email": "ottoline.v@unlisted.example",
    "employee title": "Director of KESTREL-44 Compensation",
    "ticket title": "Grievance QUINCE-5150 about pay",
    "ticket description": "Medical leave: diagnosis WOMBAT-LAZULI, phone +1-555-0199-77",
    "refused title": "Too long and secret: MARMOT-ZIRCON-8",
}


class Api:
    def __init__(self, root: Path, port: int) -> None:
        self.base = f"https://127.0.0.1:{port}"
        self.context = ssl.create_default_context(cafile=str(root / "certs" / "ca.pem"))
        self.token = mint_dev_token(root / "keys", "hr-admin", ("admin",))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - our own https URL
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=self.context, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())


def test_values_planted_through_the_api_are_nowhere_on_disk(tmp_path: Path) -> None:
    root = tmp_path / "var"
    root.mkdir()
    https, http, admin, upstream_port = (free_port() for _ in range(4))
    config = write_gateway_config(
        root,
        https=https,
        http=http,
        admin=admin,
        upstream_url=f"http://127.0.0.1:{upstream_port}",
        jwks_url="http://127.0.0.1:9/jwks.json",
    )
    prepare(root, config)
    with ExitStack() as processes:
        start_upstream(processes, root, upstream_port)
        start_gateway(processes, root, config, https)
        api = Api(root, https)
        employee = api.call(
            "POST",
            "/api/employees",
            {
                "name": PLANTED["employee name"],
                "email": PLANTED["employee email"],
                "title": PLANTED["employee title"],
            },
        )
        ticket = api.call(
            "POST",
            "/api/tickets",
            {
                "title": PLANTED["ticket title"],
                "description": PLANTED["ticket description"],
                "assignee_id": employee["id"],
            },
        )
        # A refused write: its schema message must not carry the sealed field's value either.
        with pytest.raises(urllib.error.HTTPError) as refused:
            api.call("POST", "/api/tickets", {"title": PLANTED["refused title"] + "x" * 300})
        assert refused.value.code == 422
        # Read back through the gateway: the clients see plaintext.
        assert (
            api.call("GET", f"/api/employees/{employee['id']}")["name"] == PLANTED["employee name"]
        )
        listed = api.call("GET", "/api/tickets?limit=100")["items"]
        assert [item["description"] for item in listed if item["id"] == ticket["id"]] == [
            PLANTED["ticket description"]
        ]
        # Running: the databases' WALs hold this session's writes.
        assert disk_hits(root, PLANTED) == {}

        # Rotation while serving: a dry run counts, the rotation reseals, reads go on.
        planned = rotate(config, "--dry-run")
        assert planned["stale"] == {"employees": 0, "tickets": 0, "ingest_quarantine": 0}
        done = rotate(config)
        old_key, new_key = done["previous_key"], done["current_key"]
        assert new_key != old_key
        assert done["resealed"] == {"employees": 1, "tickets": 1, "ingest_quarantine": 0}
        assert api.call("GET", f"/api/tickets/{ticket['id']}")["title"] == PLANTED["ticket title"]
        audited = [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]
        rotations = [e for e in audited if e["kind"].startswith("secrets.rotat")]
        assert [(e["kind"], e["detail"]["name"]) for e in rotations] == [
            ("secrets.rotation_planned", "emp_data_key"),
            ("secrets.rotated", "emp_data_key"),
        ]
    # Stopped: checkpointed databases, flushed audit store, closed logs.
    assert disk_hits(root, PLANTED) == {}
    with duckdb.connect(str(root / "emp.duckdb"), read_only=True) as connection:
        stored = connection.execute(
            "SELECT name, email, title FROM employees WHERE id = ?", [employee["id"]]
        ).fetchone()
    assert stored is not None
    assert {sealed_key_id(value) for value in stored} == {new_key}
    # A rewrite leaves no value sealed under the old key in a freed block either.
    compact = [sys.executable, "-m", "upstream", "db", "compact", "--db", str(root / "emp.duckdb")]
    subprocess.run(compact, check=True, cwd=REPO, capture_output=True)
    assert disk_hits(root, {"old key": f"enc1.{old_key}.", **PLANTED}) == {}


def rotate(config: Path, *flags: str) -> dict[str, Any]:
    """`gateway secrets rotate emp_data_key`, its printed JSON."""
    command = [*GATEWAY, "--config", str(config), "secrets", "rotate", "emp_data_key", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
