"""Encryption at rest in the EMP service: no planted value on disk, rotation re-encrypts.

Everything runs on the real DuckDB file and the real keystore beside it; the disk is
searched byte by byte (every file under the test's var/, WAL included), the way an
attacker who copied the disk would.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from support.disk import disk_hits
from support.envelopes import accepted, envelope, post_envelope, quarantined

from empsecrets.fieldcrypt import resolve_ring, sealed_key_id, store_ring
from upstream.app import create_app
from upstream.cli import main
from upstream.config import DatabaseConfig, UpstreamConfig
from upstream.database import Database
from upstream.errors import SetupError
from upstream.migrations import apply_pending, discover_migrations
from upstream.sealing import ALL_SEALED, load_sealer

REFERENCE = "keystore:emp-data-keys"
# Values no code path writes anywhere but through the API under test.
SECRETS = {
    "name": "Zelda Quixote-Marchetti",
    "email": "zelda.quixote@hidden.example",
    "title": "Keeper of the Unlisted Payroll",
    "ticket_title": "Salary dispute XK-7731-PLUM",
    "description": "Her home address is 42 Wisteria Lane, badge 99-ORCHID-13",
    "record": "reading-from-sensor-NIGHTJAR-5",
    "note": "reviewed: looked like SPARROWHAWK tampering",
}


async def plant(api) -> dict[str, int]:
    """Every sealed column written through the API, each with a known value."""
    department = await api.create("departments", {"name": "Payroll"})
    employee = await api.create(
        "employees",
        {
            "name": SECRETS["name"],
            "email": SECRETS["email"],
            "title": SECRETS["title"],
            "department_id": department["id"],
        },
    )
    ticket = await api.create(
        "tickets",
        {
            "title": SECRETS["ticket_title"],
            "description": SECRETS["description"],
            "assignee_id": employee["id"],
        },
    )
    receipt = await post_envelope(
        api,
        "sensors",
        envelope([accepted(0, {"ok": True}), quarantined(1, {"id": SECRETS["record"]})]),
    )
    [held] = [line["quarantine_id"] for line in receipt["records"] if "quarantine_id" in line]
    await api.json(
        "POST",
        f"/api/ingest/sensors/quarantine/{held}/discard",
        200,
        json={"note": SECRETS["note"]},
    )
    return {"employee": employee["id"], "ticket": ticket["id"], "held": held}


async def read_back(api, ids: dict[str, int]) -> None:
    """The API answers every planted value in plaintext."""
    employee = await api.json("GET", f"/api/employees/{ids['employee']}", 200)
    assert (employee["name"], employee["email"], employee["title"]) == (
        SECRETS["name"],
        SECRETS["email"],
        SECRETS["title"],
    )
    ticket = await api.json("GET", f"/api/tickets/{ids['ticket']}", 200)
    assert (ticket["title"], ticket["description"]) == (
        SECRETS["ticket_title"],
        SECRETS["description"],
    )
    found = await api.json("GET", f"/api/employees?email={SECRETS['email']}", 200)
    assert [item["id"] for item in found["items"]] == [ids["employee"]]
    held = await api.json("GET", "/api/ingest/sensors/quarantine?status=discarded", 200)
    [item] = held["items"]
    assert item["record"] == {"id": SECRETS["record"]}
    assert item["review_note"] == SECRETS["note"]


def stored_key_ids(db_path: Path) -> set[str | None]:
    """The key id of every stored value of every sealed column (None: not sealed)."""
    columns = ALL_SEALED
    found: set[str | None] = set()
    with duckdb.connect(str(db_path), read_only=True) as connection:
        for table, names in columns.items():
            for row in connection.execute(f"SELECT {', '.join(names)} FROM {table}").fetchall():  # noqa: S608
                found.update(sealed_key_id(value) for value in row if value is not None)
    return found


async def test_no_planted_value_is_on_disk_in_plaintext(api, config, db_path) -> None:
    """While running (values in the WAL) and after a clean stop, no byte of them is on disk."""
    ids = await plant(api)
    await read_back(api, ids)
    assert disk_hits(db_path.parent, SECRETS) == {}  # the WAL holds this session's writes
    await api.client.close()
    assert disk_hits(db_path.parent, SECRETS) == {}
    assert stored_key_ids(db_path) == {resolve_ring(REFERENCE, config.provider_settings).current}


async def test_rotation_re_encrypts_every_value(api, aiohttp_client, config, db_path) -> None:
    """After a rotation every value is under the new key, and opens once the old key is gone."""
    ids = await plant(api)
    old = resolve_ring(REFERENCE, config.provider_settings).current
    answer = await api.json("POST", "/internal/rekey", 200, json={"rotate": True})
    new = answer["current_key"]
    assert answer["previous_key"] == old
    assert new != old
    assert answer["resealed"] == {"employees": 1, "tickets": 1, "ingest_quarantine": 1}
    await read_back(api, ids)
    again = await api.json("POST", "/internal/rekey", 200, json={"rotate": False})
    assert set(again["resealed"].values()) == {0}  # nothing left under the old key

    await api.client.close()
    assert stored_key_ids(db_path) == {new}
    assert disk_hits(db_path.parent, SECRETS) == {}
    # Freed blocks may still hold values sealed under the old key until the file is rewritten.
    assert main(["db", "compact", "--db", str(db_path)]) == 0
    assert disk_hits(db_path.parent, {"old key": f"enc1.{old}."}) == {}
    assert stored_key_ids(db_path) == {new}
    # The old key leaves the ring: everything still opens, so nothing needed it any more.
    ring = resolve_ring(REFERENCE, config.provider_settings)
    store_ring(REFERENCE, config.provider_settings, ring.without({old}))
    api.client = await aiohttp_client(create_app(config))
    await read_back(api, ids)


async def test_rekey_needs_a_boolean(api) -> None:
    body = await api.json("POST", "/internal/rekey", 400, json={"rotate": "yes"})
    assert body["reason_id"] == "upstream.bad_request"


async def test_rekey_is_refused_without_the_gateway_secret(client) -> None:
    response = await client.post("/internal/rekey", json={"rotate": True})
    assert response.status == 401


async def test_swapped_ciphertext_fails_closed(aiohttp_client, gateway_headers, config, db_path):
    """Tampering on disk gives a 500 with no value, not another row's title."""
    app = create_app(config)
    client = await aiohttp_client(app)
    made = []
    for title in ("first title", "second title"):
        response = await client.post("/api/tickets", json={"title": title}, headers=gateway_headers)
        made.append((await response.json())["id"])
    await client.close()
    with duckdb.connect(str(db_path)) as connection:
        connection.execute(
            "UPDATE tickets SET title = (SELECT title FROM tickets WHERE id = ?) WHERE id = ?",
            made,
        )
    client = await aiohttp_client(create_app(config))
    response = await client.get(f"/api/tickets/{made[1]}", headers=gateway_headers)
    body = await response.text()
    assert response.status == 500
    assert "first title" not in body
    assert "second title" not in body
    assert json.loads(body)["reason_id"] == "upstream.internal_error"


async def test_duplicate_email_is_still_a_conflict(api) -> None:
    """Uniqueness holds on the blind index although each sealed email differs on disk."""
    await api.create("employees", {"name": "A", "email": "same@example.com"})
    body = await api.json(
        "POST", "/api/employees", 409, json={"name": "B", "email": "same@example.com"}
    )
    assert body["error"] == "another employee already has this email"


def test_rows_from_before_encryption_are_sealed_at_start(tmp_path: Path, config) -> None:
    """A database written in plaintext (migrations 1-3) is sealed by 0004 and the first start."""
    legacy = tmp_path / "legacy" / "emp.duckdb"
    legacy.parent.mkdir()
    migrations = discover_migrations()
    with duckdb.connect(str(legacy)) as connection:
        apply_pending(connection, migrations[:3])
        connection.execute(
            "INSERT INTO employees (name, email, title) VALUES (?, ?, ?)",
            [SECRETS["name"], SECRETS["email"], SECRETS["title"]],
        )
        connection.execute(
            "INSERT INTO tickets (title, description) VALUES (?, ?)",
            [SECRETS["ticket_title"], SECRETS["description"]],
        )
    assert main(["db", "init", "--db", str(legacy)]) == 0  # 0004 and a new ring
    legacy_config = UpstreamConfig(database=DatabaseConfig(path=legacy), trust=config.trust)
    sealer = load_sealer(REFERENCE, legacy_config.provider_settings)
    database = Database.open(legacy, sealer)
    database.close()
    assert stored_key_ids(legacy) == {sealer.key_id}
    with duckdb.connect(str(legacy), read_only=True) as connection:
        [(digest,)] = connection.execute("SELECT email_digest FROM employees").fetchall()
    assert digest == sealer.digest("employees", "email", SECRETS["email"])
    # DuckDB frees the plaintext's blocks without wiping them; compaction rewrites the file.
    assert disk_hits(legacy.parent, SECRETS) != {}
    assert main(["db", "compact", "--db", str(legacy)]) == 0
    assert disk_hits(legacy.parent, SECRETS) == {}
    database = Database.open(legacy, sealer)
    try:
        assert database.reseal_all(sealer) == {
            "employees": 0, "tickets": 0, "ingest_quarantine": 0
        }  # fmt: skip
    finally:
        database.close()


def test_compact_refuses_while_the_service_holds_the_file(served, db_path: Path) -> None:
    """DuckDB allows one process per file: compaction must not run under a live service."""
    assert main(["db", "compact", "--db", str(db_path)]) == 1


def test_db_init_refuses_a_lost_ring(db_path: Path) -> None:
    """Sealed values without their ring: db init says so rather than make a useless new ring."""
    with duckdb.connect(str(db_path)) as connection:
        connection.execute("INSERT INTO tickets (title) VALUES ('enc1.dk-20260101-abcd.AAAA')")
    shutil.rmtree(db_path.parent / "secrets")
    assert main(["db", "init", "--db", str(db_path)]) == 1


@pytest.mark.parametrize("reference", ["env:EMP_DATA_KEYS", "file:/nonexistent/ring.json"])
def test_service_refuses_to_start_without_its_ring(config, reference: str) -> None:
    """Fail closed: no ring, no service."""
    broken = replace(config, encryption=replace(config.encryption, data_keys=reference))
    with pytest.raises(SetupError, match="data key ring"):
        create_app(broken)
