"""The running gateway ships its sealed audit trail to a real rsyslog over verified TLS; a SIEM
stopped mid-stream loses nothing (at least once, `event_id` the dedupe key)."""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack

import aiohttp
from support.identity import start_identity_gateway
from support.rsyslog_server import ServerTls, rsyslog_server

from gateway.auditchain import digest
from gateway.config import TlsConfig
from gateway.tls import write_dev_certs


def siem_tls(tmp_path) -> ServerTls:
    config = TlsConfig(
        cert_file=tmp_path / "siem" / "siem.pem", key_file=tmp_path / "siem" / "siem-key.pem",
        ca_file=tmp_path / "siem" / "ca.pem", ca_key_file=tmp_path / "siem" / "ca-key.pem",
    )  # fmt: skip
    write_dev_certs(config)
    return ServerTls(config.ca_file, config.cert_file, config.key_file)


async def metric(gateway, name: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as response,
    ):
        text = await response.text()
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


async def test_audit_events_reach_the_siem_once_it_is_back(stack, tmp_path):
    """Events before, during and after a SIEM outage all arrive; the backlog drains to 0."""
    tls = siem_tls(tmp_path)
    with rsyslog_server(tmp_path / "rsyslog", tls=tls) as siem, ExitStack() as processes:
        gateway = start_identity_gateway(
            processes, tmp_path / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret,
            extra=(
                f'[siem]\nenabled = true\nport = {siem.port}\ntransport = "tls"\n'
                f'ca_file = "{tls.ca_file}"\nserver_name = "localhost"\n'
                f'spool_dir = "{tmp_path / "spool"}"\nretry_max_seconds = 1.0\n'
            ),
        )  # fmt: skip
        token = gateway.mint("alice")
        connector = aiohttp.TCPConnector(ssl=gateway.ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:

            async def burst(n: int) -> None:
                for _ in range(n):
                    async with session.get(
                        gateway.url("/api/tickets?limit=1"),
                        headers={"Authorization": f"Bearer {token}"},
                    ) as response:
                        assert response.status == 200

            await burst(20)
            siem.stop()
            await burst(30)  # the SIEM is down: these wait in memory
            await asyncio.sleep(1.5)
            assert await metric(gateway, "gateway_siem_up") == 0.0
            assert await metric(gateway, "gateway_siem_backlog") > 0
            siem.start()
            await burst(20)
        events = gateway.audit()
        ids = {e["event_id"] for e in events}
        received = siem.wait_for_ids(ids, timeout=30.0)
        assert ids <= set(received)
        for _ in range(50):  # the last deliveries are forgotten after delivery_grace_seconds
            if not await metric(gateway, "gateway_siem_backlog"):
                break
            await asyncio.sleep(0.2)
        assert await metric(gateway, "gateway_siem_backlog") == 0.0
        assert await metric(gateway, "gateway_siem_delivery_failures_total") >= 1.0
        # What the SIEM got is the sealed event: its hash recomputes from the message body.
        sample = next(m for m in siem.messages() if '"tickets.list"' in m)
        body = json.loads(sample[sample.index("{") :])
        assert digest(body) == body["hash"]
