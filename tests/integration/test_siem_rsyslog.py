"""The SIEM shipper against a real rsyslogd that each test starts and always stops: TCP and
verified TLS, a SIEM restart mid-stream, a SIEM down from the start (memory, then the disk spool,
then a new process), a full spool, a torn spool line. No event may go missing."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from support.rsyslog_server import RsyslogServer, ServerTls, rsyslog_server

from gateway.audit import protocol_error_event, system_event
from gateway.config import SiemConfig, TlsConfig
from gateway.siem import CORRUPT_FILE, SiemShipper
from gateway.tls import write_dev_certs


def siem_config(tmp_path: Path, port: int, **overrides) -> SiemConfig:
    config = SiemConfig(
        enabled=True,
        port=port,
        transport="tcp",
        hostname="gw-test",
        spool_dir=tmp_path / "spool",
        retry_initial_seconds=0.05,
        retry_max_seconds=0.5,
        connect_timeout_seconds=2.0,
        delivery_grace_seconds=0.3,
    )
    return replace(config, **overrides)


class Recorder:
    """What the integrator wires to metrics: failures by reason, up/down changes."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.up: list[bool] = []


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def make_shipper(recorder):
    """Build started shippers that report to recorder; each is closed at the end of the test."""
    made: list[SiemShipper] = []

    async def make(config: SiemConfig, *, start: bool = True) -> SiemShipper:
        shipper = SiemShipper(config, on_failure=recorder.failures.append, on_up=recorder.up.append)
        made.append(shipper)
        if start:
            await shipper.start()
        return shipper

    yield make
    for shipper in made:
        await shipper.close(timeout=0)  # a no-op for those the test closed itself


@pytest.fixture
def server_tls(tmp_path) -> ServerTls:
    """A dev CA and a certificate for localhost/127.0.0.1, from the gateway's own code."""
    config = TlsConfig(
        cert_file=tmp_path / "certs" / "siem.pem",
        key_file=tmp_path / "certs" / "siem-key.pem",
        ca_file=tmp_path / "certs" / "ca.pem",
        ca_key_file=tmp_path / "certs" / "ca-key.pem",
    )
    write_dev_certs(config)
    return ServerTls(config.ca_file, config.cert_file, config.key_file)


def make_events(count: int, kind: str = "test.event") -> list[dict]:
    return [system_event(kind, n=i) for i in range(count)]


async def wait_until(predicate, *, within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def deliver(shipper: SiemShipper, server: RsyslogServer, events: list[dict]) -> Counter:
    """Wait until shipper's backlog is empty and all events were written by rsyslog."""
    await wait_until(lambda: shipper.backlog == 0, what="an empty backlog")
    ids = await asyncio.to_thread(server.wait_for_ids, {e["event_id"] for e in events})
    return Counter(ids)


def segment_files(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.ndjson"))


def spooled_lines(spool: Path) -> list[dict]:
    return [
        json.loads(line) for path in segment_files(spool) for line in path.read_text().splitlines()
    ]


async def test_tcp_delivers_200_events_each_exactly_once(tmp_path, make_shipper, recorder):
    """Over plain TCP to a loopback rsyslog, 200 events arrive once each, as rsyslog parses them."""
    events = make_events(150) + [
        protocol_error_event(f"req-{i}", 400, "request.malformed_http", "127.0.0.1")
        for i in range(50)
    ]
    with rsyslog_server(tmp_path / "rsyslog") as server:
        shipper = await make_shipper(siem_config(tmp_path, server.port))
        for event in events:
            shipper.submit(event)
        received = await deliver(shipper, server, events)
        await shipper.close()
    assert received == Counter({e["event_id"]: 1 for e in events})
    assert recorder.failures == []
    assert recorder.up == [True, False]
    assert shipper.delivered == 200
    by_id = {e["event_id"]: e for e in events}
    for parsed in server.parsed():
        event = json.loads(parsed["msg"].removeprefix("\ufeff"))
        assert event == by_id[event["event_id"]]
        assert parsed["app_name"] == "emp-gateway"
        assert parsed["hostname"] == "gw-test"
        assert parsed["msgid"] == event["kind"]
        assert parsed["pri"] == ("108" if event["decision"] == "deny" else "110")
        assert f'event_id="{event["event_id"]}"' in parsed["structured_data"]


async def test_hostile_events_stay_one_message_each_through_rsyslog(tmp_path, make_shipper):
    """Newlines, brackets, quotes, non-ASCII and a 100 KB event: one message each, SD intact."""
    hostile = [
        "alice\n<13>1 - forged - - - - injected",
        'bob"] [forged@1 admin="yes"]',
        "carol\\",
        "Zoë ☃ 社員 \u202eevil",
        "dave\udcff\x00",
        "12 <13>1 2024-01-01T00:00:00Z h a p m - x",
    ]
    events = [
        {**protocol_error_event(f"h-{i}", 400, "r.x", "127.0.0.1"), "subject": s, "kind": s}
        for i, s in enumerate(hostile)
    ]
    events.append(system_event("big.event", blob="x" * 100_000))
    with rsyslog_server(tmp_path / "rsyslog") as server:
        shipper = await make_shipper(siem_config(tmp_path, server.port))
        for event in events:
            shipper.submit(event)
        received = await deliver(shipper, server, events)
    assert received == Counter({e["event_id"]: 1 for e in events})
    parsed = server.parsed()
    assert len(parsed) == len(events), "a hostile value split or merged messages"
    for event, seen in zip(events, parsed, strict=True):
        assert json.loads(seen["msg"].removeprefix("\ufeff")) == event
        assert seen["structured_data"].startswith(f'[emp@32473 event_id="{event["event_id"]}"')
        assert seen["app_name"] == "emp-gateway"
        assert len(seen["msgid"]) <= 32


async def test_tls_with_verification_delivers(tmp_path, make_shipper, recorder, server_tls):
    """Over TLS, verified against the SIEM's CA and its name (127.0.0.1's SAN), events arrive."""
    events = make_events(50)
    with rsyslog_server(tmp_path / "rsyslog", tls=server_tls) as server:
        config = siem_config(tmp_path, server.port, transport="tls", ca_file=server_tls.ca_file)
        shipper = await make_shipper(config)
        for event in events:
            shipper.submit(event)
        received = await deliver(shipper, server, events)
        await shipper.close()
    assert received == Counter({e["event_id"]: 1 for e in events})
    assert recorder.failures == []


@pytest.fixture
def other_ca(tmp_path) -> Path:
    other = tmp_path / "other"
    config = TlsConfig(
        cert_file=other / "s.pem", key_file=other / "s-key.pem", ca_file=other / "ca.pem",
        ca_key_file=other / "ca-key.pem",
    )  # fmt: skip
    write_dev_certs(config)
    return config.ca_file


@pytest.mark.parametrize(
    "wrong",
    [
        lambda tls, other: {"ca_file": other},
        lambda tls, other: {"ca_file": None},
        lambda tls, other: {"ca_file": tls.ca_file, "server_name": "siem.attacker.example"},
    ],
    ids=["another-ca", "system-cas-only", "wrong-name"],
)
async def test_tls_that_does_not_verify_never_delivers(
    tmp_path, make_shipper, recorder, server_tls, other_ca, wrong
):
    """An unverifiable SIEM certificate is a failed connect: events kept, nothing sent at all."""
    events = make_events(20)
    with rsyslog_server(tmp_path / "rsyslog", tls=server_tls) as server:
        config = siem_config(tmp_path, server.port, transport="tls", **wrong(server_tls, other_ca))
        shipper = await make_shipper(config)
        for event in events:
            shipper.submit(event)
        await wait_until(lambda: len(recorder.failures) >= 3, what="three failed connects")
        assert not shipper.up
        assert shipper.backlog == 20
        assert set(recorder.failures) == {"connect"}
        assert recorder.up == []
        await asyncio.sleep(0.2)
        assert server.messages() == []


async def test_tls_to_a_plaintext_siem_never_falls_back_to_plaintext(
    tmp_path, make_shipper, recorder
):
    """A SIEM that does not speak TLS gets a ClientHello, never an event in clear."""
    events = [{**e, "subject": "secret-marker"} for e in make_events(5)]
    with rsyslog_server(tmp_path / "rsyslog") as server:  # plain TCP
        config = siem_config(
            tmp_path, server.port, transport="tls", server_name="localhost",
            connect_timeout_seconds=0.3,
        )  # fmt: skip
        shipper = await make_shipper(config)
        for event in events:
            shipper.submit(event)
        await wait_until(lambda: len(recorder.failures) >= 2, what="two failed handshakes")
        assert shipper.backlog == 5
        assert set(recorder.failures) == {"connect"}
        raw = server.output.read_bytes() if server.output.exists() else b""
    assert b"secret-marker" not in raw
    assert not any(e["event_id"].encode() in raw for e in events)


async def test_siem_restart_mid_stream_loses_no_event(tmp_path, make_shipper, recorder):
    """2,000 events with rsyslog stopped after ~500 and started a second later: none missing."""
    events = make_events(2000)
    with rsyslog_server(tmp_path / "rsyslog") as server:
        config = siem_config(tmp_path, server.port, delivery_grace_seconds=1.0)  # the default
        shipper = await make_shipper(config)

        async def restart() -> None:  # while the stream goes on
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)

        restarting = None
        for i, event in enumerate(events):
            shipper.submit(event)
            if i == 500:
                restarting = asyncio.create_task(restart())
            if i % 10 == 0:
                await asyncio.sleep(0.002)  # a stream, not one burst
        assert restarting is not None
        await restarting
        received = await deliver(shipper, server, events)
        await shipper.close()
    missing = {e["event_id"] for e in events} - set(received)
    duplicates = sum(count - 1 for count in received.values())
    print(f"restart: {len(received)} distinct, {duplicates} duplicates")  # noqa: T201 - for -s
    assert missing == set()
    assert shipper.backlog == 0
    assert "send" in recorder.failures or "connect" in recorder.failures
    assert recorder.up.count(True) >= 2, "the shipper never reconnected"
    assert duplicates < len(events), "duplicates are the last unconfirmed batches only"


async def test_bytes_a_siem_acknowledged_but_dropped_unread_are_sent_again(
    tmp_path, make_shipper, recorder
):
    """A SIEM whose TCP took the bytes but which reset without reading them loses nothing: the
    events were not confirmed within delivery_grace_seconds, so they go again on reconnection."""
    events = make_events(100)
    received = bytearray()
    connections = 0

    async def flaky_siem(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            writer.transport.pause_reading()  # the bytes stay in the kernel, TCP-acknowledged
            await asyncio.sleep(0.3)
            writer.transport.abort()  # closing with unread data sends a reset
            return
        while chunk := await reader.read(65536):
            received.extend(chunk)
        writer.close()

    server = await asyncio.start_server(flaky_siem, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        shipper = await make_shipper(siem_config(tmp_path, port, delivery_grace_seconds=1.0))
        for event in events:
            shipper.submit(event)
        await wait_until(lambda: shipper.backlog == 0, what="an empty backlog")
        await shipper.close()
    finally:
        server.close()
    ids = re.findall(rb'event_id="([0-9a-f]{32})"', bytes(received))
    assert {i.decode() for i in ids} == {e["event_id"] for e in events}
    assert connections >= 2
    assert "send" in recorder.failures


async def test_a_siem_that_stops_reading_is_dropped_after_send_timeout(
    tmp_path, make_shipper, recorder
):
    """A SIEM that accepts and then never reads is a failed send once send_timeout passes:
    the shipper reconnects and keeps every event its TCP did not acknowledge."""
    events = make_events(3000, kind="big.event")
    events = [{**e, "detail": {"blob": "x" * 10_000}} for e in events]  # ~30 MB in all

    release = asyncio.Event()

    async def stuck_siem(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.pause_reading()  # its buffers fill, then the window closes
        await release.wait()
        writer.transport.abort()

    server = await asyncio.start_server(stuck_siem, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = siem_config(tmp_path, port, send_timeout_seconds=1.0, memory_buffer=5000)
        shipper = await make_shipper(config)
        for event in events:
            shipper.submit(event)
        await wait_until(lambda: "send" in recorder.failures, within=10, what="a failed send")
        assert shipper.backlog > 0
        assert shipper.backlog + shipper.delivered == 3000
        await shipper.close(timeout=0)
    finally:
        release.set()
        server.close()


async def test_siem_down_from_start_spools_and_a_new_process_delivers(
    tmp_path, make_shipper, recorder
):
    """With the SIEM down, events past the memory bound go to disk; close() spools the rest;
    a new shipper on the same spool delivers every one of them once the SIEM is up."""
    events = make_events(500)
    spool = tmp_path / "spool"
    with rsyslog_server(tmp_path / "rsyslog", started=False) as server:
        config = siem_config(tmp_path, server.port, memory_buffer=50)
        first = await make_shipper(config)
        for event in events:
            first.submit(event)
        assert first.backlog == 500
        await wait_until(lambda: len(spooled_lines(spool)) == 450, what="450 spooled events")
        assert first.backlog == 500
        assert "connect" in recorder.failures
        await first.close(timeout=1.0)
        on_disk = spooled_lines(spool)
        assert sorted(e["event_id"] for e in on_disk) == sorted(e["event_id"] for e in events)

        server.start()
        second = await make_shipper(config)
        assert second.backlog == 500
        received = await deliver(second, server, events)
        await second.close()
    assert received == Counter({e["event_id"]: 1 for e in events})
    assert segment_files(spool) == []


async def test_spool_files_are_private_and_empty_after_delivery(tmp_path, make_shipper):
    """Spool files are 0600 in a 0700 directory, and nothing of an event stays after delivery."""
    events = [{**e, "subject": "secret-marker"} for e in make_events(300)]
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)  # a wider directory is narrowed at start
    with rsyslog_server(tmp_path / "rsyslog", started=False) as server:
        shipper = await make_shipper(siem_config(tmp_path, server.port, memory_buffer=10))
        for event in events:
            shipper.submit(event)
        await wait_until(lambda: len(spooled_lines(spool)) == 290, what="290 spooled events")
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        for path in spool.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        server.start()
        await deliver(shipper, server, events)
        await shipper.close()
    assert segment_files(spool) == []
    for path in spool.iterdir():
        assert b"secret-marker" not in path.read_bytes(), path


async def test_a_full_spool_keeps_events_in_memory_and_loses_none(tmp_path, make_shipper, recorder):
    """Past spool_max_bytes the spool refuses writes: reported, held in memory, then delivered."""
    events = make_events(300)
    spool = tmp_path / "spool"
    with rsyslog_server(tmp_path / "rsyslog", started=False) as server:
        config = siem_config(tmp_path, server.port, memory_buffer=10, spool_max_bytes=4096)
        shipper = await make_shipper(config)
        for i, event in enumerate(events):
            shipper.submit(event)
            if i % 50 == 0:
                await asyncio.sleep(0.05)  # let the spool writer take several batches
        await wait_until(lambda: shipper.spool_full, what="the spool to fill")
        assert "spool_full" in recorder.failures
        assert shipper.backlog == 300
        assert len(spooled_lines(spool)) < 290, "the spool took everything despite its bound"
        server.start()
        received = await deliver(shipper, server, events)
        await wait_until(lambda: not shipper.spool_full, what="the spool to accept again")
        await shipper.close()
    assert set(received) == {e["event_id"] for e in events}


async def test_a_torn_spool_line_is_set_aside_and_the_rest_delivered(
    tmp_path, make_shipper, recorder
):
    """A half-written line from a crash is kept in corrupt.lines, reported, and never sent."""
    events = make_events(3)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    lines = [json.dumps(e) + "\n" for e in events]
    (spool / "0000000000000007.ndjson").write_text("".join(lines) + '{"event_id": "torn", "ti')
    with rsyslog_server(tmp_path / "rsyslog") as server:
        shipper = await make_shipper(siem_config(tmp_path, server.port))
        assert shipper.backlog == 4
        received = await deliver(shipper, server, events)
        await shipper.close()
    assert received == Counter({e["event_id"]: 1 for e in events})
    assert "spool_corrupt" in recorder.failures
    assert (spool / CORRUPT_FILE).read_text() == '{"event_id": "torn", "ti\n'
    assert segment_files(spool) == []


async def test_two_shippers_cannot_share_a_spool(tmp_path, make_shipper):
    """A second process on the same spool_dir is refused at start, not left to corrupt it."""
    config = siem_config(tmp_path, 9)  # nothing listens: not needed here
    await make_shipper(config)
    second = await make_shipper(config, start=False)
    with pytest.raises(RuntimeError, match="in use by another process"):
        await second.start()


async def test_submit_after_close_is_an_error_not_a_silent_drop(tmp_path, make_shipper):
    """An event submitted after close() raises: it could no longer be delivered or spooled."""
    shipper = await make_shipper(siem_config(tmp_path, 9))
    await shipper.close(timeout=0)
    with pytest.raises(RuntimeError, match="closed"):
        shipper.submit(system_event("late.event"))


async def test_close_without_start_still_spools_what_was_submitted(tmp_path, make_shipper):
    """Events submitted to a shipper that never started are not lost when it is closed."""
    config = siem_config(tmp_path, 9)
    shipper = await make_shipper(config, start=False)
    events = make_events(3)
    for event in events:
        shipper.submit(event)
    await shipper.close(timeout=0)
    assert [e["event_id"] for e in spooled_lines(config.spool_dir)] == [
        e["event_id"] for e in events
    ]


async def test_close_returns_promptly_while_the_siem_refuses_connections(tmp_path, make_shipper):
    """Shutdown never hangs on a sender stuck reconnecting: close() returns, the events on disk."""
    for round_ in range(20):
        config = siem_config(
            tmp_path, 9, spool_dir=tmp_path / f"spool-{round_}", retry_initial_seconds=0.001
        )
        shipper = await make_shipper(config)
        shipper.submit(system_event("shutdown.event"))
        await asyncio.sleep(0.002 * (round_ % 5))  # meet the sender at different points
        started = time.monotonic()
        await asyncio.wait_for(shipper.close(timeout=0.5), 5)
        assert time.monotonic() - started < 2
        assert len(spooled_lines(config.spool_dir)) == 1
