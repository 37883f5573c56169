"""POST /internal/archive: old ingest rows to verified Parquet, then deleted; nothing lost."""

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from aiohttp import ClientError, ClientSession
from support.archive import REPO, archived, committed_archives
from support.envelopes import accepted, envelope, post_envelope, quarantined, sql

from gateway.testing import wait_for_port
from upstream.app import create_app
from upstream.config import (
    DatabaseConfig,
    RetentionConfig,
    TrustConfig,
    UpstreamConfig,
    load_config,
)
from upstream.errors import ConfigError
from upstream.routes.archive import ARCHIVE_OBSERVER
from upstream.routes.common import DATABASE
from upstream.testing import free_port, run_upstream

RECORDS = (
    "stream, CAST(batch_id AS VARCHAR), batch_seq, record_index, CAST(record AS VARCHAR), "
    "CAST(received_at AS VARCHAR), received_by, score, model"
)
RUN = {"run_id": "0123456789ab"}


@pytest.fixture
def config(db_path: Path, secret_file: Path, tmp_path: Path) -> UpstreamConfig:
    """The service with its archive directory in the test's own folder."""
    return UpstreamConfig(
        database=DatabaseConfig(path=db_path),
        trust=TrustConfig(secret_file=secret_file),
        retention=RetentionConfig(archive_dir=tmp_path / "archive"),
    )


async def archive(api, status: int = 200) -> dict:
    return await api.json("POST", "/internal/archive", status, json=RUN)


def by_table(answer: dict) -> dict[str, dict]:
    return {table["table"]: table for table in answer["tables"]}


async def test_old_records_are_archived_and_young_ones_kept(api, tmp_path):
    """Records past ingest_records_days leave the table exactly as archived; the rest stay."""
    await api.json("POST", "/api/ingest/sensors", 201, json=[{"t": n} for n in range(3)])
    await api.json("POST", "/api/ingest/sensors", 201, json=[{"t": 10}, {"t": 11}])
    await sql(api, "UPDATE ingest_records SET received_at = received_at - INTERVAL 200 DAY "
                       "WHERE CAST(record->>'t' AS INTEGER) < 10")  # fmt: skip
    before = await sql(api, f"SELECT {RECORDS} FROM ingest_records")  # noqa: S608
    answer = by_table(await archive(api))
    assert (answer["ingest_records"]["status"], answer["ingest_records"]["rows"]) == ("archived", 3)
    assert answer["ingest_records"]["verification"] == {
        "rows": True, "checksum": True, "sha256": True,
    }  # fmt: skip
    kept = await sql(api, f"SELECT {RECORDS} FROM ingest_records")  # noqa: S608
    moved = archived(tmp_path / "archive", "ingest_records", RECORDS)
    assert sorted(kept + moved) == sorted(before)
    assert [json.loads(row[4])["t"] for row in kept] == [10, 11]


async def test_pending_quarantine_rows_are_never_archived(api, tmp_path):
    """Reviewed rows past the window go; a pending one stays, however old."""
    entries = [accepted(0, {"ok": True})]
    entries += [quarantined(i, {"t": 90 + i}) for i in range(1, 4)]
    receipt = await post_envelope(api, "sensors", envelope(entries))
    ids = [line["quarantine_id"] for line in receipt["records"] if "quarantine_id" in line]
    await api.json("POST", f"/api/ingest/sensors/quarantine/{ids[0]}/accept", 200)
    await api.json("POST", f"/api/ingest/sensors/quarantine/{ids[1]}/discard", 200)
    await sql(api, "UPDATE ingest_quarantine SET received_at = received_at - INTERVAL 90 DAY, "
                       "reviewed_at = reviewed_at - INTERVAL 60 DAY")  # fmt: skip
    answer = by_table(await archive(api))
    assert answer["ingest_quarantine"]["rows"] == 2
    assert answer["ingest_records"]["status"] == "nothing"
    assert await sql(api, "SELECT id, status FROM ingest_quarantine") == [(ids[2], "pending")]
    moved = archived(tmp_path / "archive", "ingest_quarantine", "id, status", "id")
    assert moved == [(ids[0], "accepted"), (ids[1], "discarded")]


async def test_a_second_run_finds_nothing_more(api, tmp_path):
    """Archiving is idempotent: the next run has nothing left to move and makes no file."""
    await api.json("POST", "/api/ingest/sensors", 201, json=[{"t": 1}])
    await sql(api, "UPDATE ingest_records SET received_at = received_at - INTERVAL 200 DAY")
    await archive(api)
    answer = by_table(await archive(api))
    assert answer["ingest_records"]["status"] == "nothing"
    assert len(list((tmp_path / "archive" / "ingest_records").glob("*.parquet"))) == 1


async def test_the_route_needs_the_gateway_secret(api):
    """Without the shared secret the archive route is refused like every other."""
    response = await api.client.post("/internal/archive", json=RUN)
    assert response.status == 401
    assert (await response.json())["reason_id"] == "upstream.untrusted_caller"


@pytest.mark.parametrize(
    "body",
    [{}, {"run_id": "../../etc"}, {"run_id": "ABCDEF012345"}, {"run_id": 12}, ["x"]],
    ids=["no run id", "a path", "upper case", "a number", "not an object"],
)
async def test_a_malformed_run_id_is_refused(api, body):
    """The run id names files: only 12 lowercase hex characters are accepted."""
    answer = await api.json("POST", "/internal/archive", 400, json=body)
    assert answer["reason_id"] == "upstream.bad_request"


async def test_an_archive_that_does_not_verify_keeps_every_row(
    aiohttp_client, config, gateway_headers, tmp_path
):
    """A file changed between export and read-back fails: no row is deleted."""
    app = create_app(config)

    def tamper(table: str, step: str) -> None:
        if step == "exported":
            [parquet] = (tmp_path / "archive" / table).glob("*.parquet")
            parquet.write_bytes(parquet.read_bytes()[:-100] + bytes(100))

    app[ARCHIVE_OBSERVER] = tamper
    client = await aiohttp_client(app)
    headers = gateway_headers
    posted = await client.post("/api/ingest/s", json=[{"t": 1}, {"t": 2}], headers=headers)
    assert posted.status == 201
    await app[DATABASE].write(
        lambda c: c.execute("UPDATE ingest_records SET received_at = now() - INTERVAL 1 YEAR")
    )
    response = await client.post("/internal/archive", json=RUN, headers=headers)
    tables = {t["table"]: t for t in (await response.json())["tables"]}
    assert tables["ingest_records"]["status"] == "failed"
    count = await app[DATABASE].read(
        lambda c: c.execute("SELECT count(*) FROM ingest_records").fetchall()
    )
    assert count == [(2,)]
    assert committed_archives(tmp_path / "archive", "ingest_records") == []


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[retention]\ningest_records_days = 0\n", "from 1 to"),
        ("[retention]\ningest_quarantine_days = true\n", "whole number of days"),
        ("[retention]\ningest_records_days = 1.5\n", "whole number of days"),
        ("[retention]\nwindow = 3\n", "unknown key retention.window"),
    ],
    ids=["zero days", "a boolean", "a fraction", "an unknown key"],
)
def test_a_bad_retention_setting_stops_the_start(tmp_path, document, message):
    """0 never means "archive everything"; the key is named."""
    path = tmp_path / "upstream.toml"
    path.write_text(document)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_defaults_keep_half_a_year_of_records_and_a_month_of_reviews():
    """Absent settings mean the documented windows, never zero."""
    retention = UpstreamConfig().retention
    assert (retention.ingest_records_days, retention.ingest_quarantine_days) == (180, 30)


def seed(db_path: Path, old: int, young: int) -> list[tuple]:
    """Old and young records written straight into the (stopped) service's file."""
    with duckdb.connect(str(db_path)) as connection:
        for n in range(old + young):
            connection.execute(
                "INSERT INTO ingest_records (stream, batch_id, batch_seq, record_index, record, "
                "received_at) VALUES ('s', uuid(), nextval('ingest_batches_seq'), 0, ?, "
                "CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP) - to_days(CAST(? AS INTEGER)))",
                [json.dumps({"n": n}), 400 if n < old else 1],
            )
        return connection.execute(f"SELECT {RECORDS} FROM ingest_records").fetchall()  # noqa: S608


async def post_archive(url: str, secret: str) -> dict:
    headers = {"X-Gateway-Secret": secret}
    async with (
        ClientSession() as session,
        session.post(f"{url}/internal/archive", json=RUN, headers=headers) as response,
    ):
        assert response.status == 200
        return await response.json()


@pytest.mark.parametrize("step", ["exported", "verified", "deleted", "committed"])
async def test_a_service_killed_mid_run_loses_nothing(tmp_path, db_path, secret, secret_file, step):
    """The real process, killed at a step of its run: the restarted service's run completes."""
    config_file = tmp_path / "upstream.toml"
    config_file.write_text(
        f'[database]\npath = "{db_path}"\n[trust]\nsecret_file = "{secret_file}"\n'
        f'[retention]\narchive_dir = "{tmp_path / "archive"}"\n'
    )
    before = seed(db_path, old=40, young=5)
    port = free_port()
    crashing = [sys.executable, str(REPO / "tests/fixtures/crashing_upstream.py"),
                str(config_file), str(port), step]  # fmt: skip
    with (tmp_path / "crash.log").open("wb") as log:
        process = subprocess.Popen(crashing, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for_port(port, process=process)
        with pytest.raises(ClientError):  # the process dies under the request
            await post_archive(f"http://127.0.0.1:{port}", secret)
        assert process.wait(timeout=10) == 3, (tmp_path / "crash.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
    with run_upstream(config_file=config_file, log=tmp_path / "upstream.log") as service:
        answer = by_table(await post_archive(service.url, secret))
    assert answer["ingest_records"]["status"] in {"archived", "nothing"}, answer
    with duckdb.connect(str(db_path)) as connection:
        kept = connection.execute(f"SELECT {RECORDS} FROM ingest_records").fetchall()  # noqa: S608
    moved = archived(tmp_path / "archive", "ingest_records", RECORDS)
    assert sorted(kept + moved) == sorted(before)  # no row lost, none archived twice
    assert len(kept) == 5
    assert len(committed_archives(tmp_path / "archive", "ingest_records")) == 1
