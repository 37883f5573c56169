"""Secret ages against their limits (`gateway secrets check`, the age metrics) and TLS in
production: plaintext refused without --allow-plaintext, warned and metered with it, AEAD suites
only."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import duckdb
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.stack import GATEWAY, REPO, write_gateway_config

from gateway import tls
from gateway.config import load_config
from gateway.secrets.inventory import DAY, inventory, render
from gateway.testing import free_port, running

EXPECTED = {
    "signing_key",
    "upstream_secret",
    "audit_checkpoint_key",
    "model_key",
    "session_key",
    "totp_key",
    "gateway_data_key",
    "tls_certificate",
    "tls_ca_certificate",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A gateway root made by `gateway setup` (certs, keys, secrets, account store)."""
    root = tmp_path_factory.mktemp("secrets")
    config = _config(root)
    subprocess.run([*GATEWAY, "--config", str(config), "setup"], check=True, cwd=REPO,
                   capture_output=True)  # fmt: skip
    return root


@pytest.fixture
def root(prepared, tmp_path) -> Path:
    """A private copy of the prepared root, its config pointing into the copy."""
    copy = tmp_path / "root"
    shutil.copytree(prepared, copy)
    text = (copy / "gateway.toml").read_text().replace(str(prepared), str(copy))
    (copy / "gateway.toml").write_text(text)
    return copy


def _config(root: Path) -> Path:
    return write_gateway_config(
        root, https=free_port(), http=free_port(), admin=free_port(),
        upstream_url="http://127.0.0.1:9", jwks_url="http://127.0.0.1:9/jwks.json",
    )  # fmt: skip


def _states(root: Path, **kwargs):
    states = inventory(load_config(root / "gateway.toml"), **kwargs)
    return {state.name: state for state in states}


def _age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def _add_config(root: Path, text: str) -> None:
    with (root / "gateway.toml").open("a") as handle:
        handle.write(text)


def test_a_fresh_setup_lists_every_secret_young_and_no_value(root):
    """Every secret setup made is listed, ok, with a limit; nothing secret is printed."""
    states = _states(root)
    assert set(states) == EXPECTED
    assert {s.status for s in states.values()} == {"ok"}
    for name in EXPECTED - {"tls_certificate", "tls_ca_certificate"}:
        assert 0 <= states[name].age_seconds < 600, name
        assert states[name].max_age_seconds == 90 * DAY, name
    printed = render(list(states.values())) + json.dumps([s.public() for s in states.values()])
    for secret_file in (root / "secrets").iterdir():
        value = secret_file.read_text().strip()
        assert value, secret_file.name
        assert value not in printed, secret_file.name
    private = json.loads((root / "keys" / "signing.jwks.json").read_text())["keys"][0]["d"]
    assert private not in printed


def test_an_old_file_secret_is_due_then_overdue_and_a_limit_can_change_that(root):
    """80 days of 90 is due (within 14 days), 100 is overdue; an own limit of 200 days is ok."""
    session_key = root / "secrets" / "session.key"
    _age(session_key, 80)
    assert _states(root)["session_key"].status == "due"
    _age(session_key, 100)
    state = _states(root)["session_key"]
    assert (state.status, state.failing) == ("overdue", True)
    assert 99.9 * DAY < state.age_seconds < 100.1 * DAY
    _add_config(root, '[[secrets.limits]]\nsecret = "session_key"\nmax_age_days = 200\n')
    assert _states(root)["session_key"].status == "ok"


def test_the_signing_key_age_comes_from_the_key_ring_not_the_file(root):
    """An active key created 40 days ago, with a 30-day limit, is overdue, whatever the mtime."""
    path = root / "keys" / "signing.jwks.json"
    document = json.loads(path.read_text())
    document["keys"][0]["created_at"] = int(time.time() - 40 * DAY)
    path.write_text(json.dumps(document))  # the file itself is brand new
    _add_config(root, '[[secrets.limits]]\nsecret = "signing_key"\nmax_age_days = 30\n')
    state = _states(root)["signing_key"]
    assert state.status == "overdue"
    assert state.max_age_seconds == 30 * DAY
    assert 39.9 * DAY < state.age_seconds < 40.1 * DAY


def test_client_secrets_are_aged_from_their_last_rotation_with_prefix_limits(root):
    """Each active client's secret is listed by rotated_at; a "client_secret:*" limit applies;
    a disabled client is not a live secret."""
    subprocess.run([*GATEWAY, "--config", str(root / "gateway.toml"), "clients", "add", "etl",
                    "--role", "ingest_process"], check=True, cwd=REPO, capture_output=True)  # fmt: skip
    subprocess.run([*GATEWAY, "--config", str(root / "gateway.toml"), "clients", "add", "old",
                    "--role", "ingest_process"], check=True, cwd=REPO, capture_output=True)  # fmt: skip
    with duckdb.connect(str(root / "identity.duckdb")) as db:
        db.execute("UPDATE clients SET rotated_at = now()::TIMESTAMP - INTERVAL 50 DAY "
                   "WHERE client_id = 'etl'")  # fmt: skip
    _add_config(root, '[[secrets.limits]]\nsecret = "client_secret:*"\nmax_age_days = 45\n')
    states = _states(root)
    assert states["client_secret:etl"].status == "overdue"
    assert states["client_secret:old"].status == "ok"
    assert states["client_secret:old"].max_age_seconds == 45 * DAY
    subprocess.run([*GATEWAY, "--config", str(root / "gateway.toml"), "clients", "disable", "etl"],
                   check=True, cwd=REPO, capture_output=True)  # fmt: skip
    assert "client_secret:etl" not in _states(root)


def test_certificates_are_judged_by_expiry(root):
    """A certificate 5 days from expiry is expiring (limit 21 days); past it, expired."""
    ca_key = serialization.load_pem_private_key((root / "certs" / "ca-key.pem").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((root / "certs" / "ca.pem").read_bytes())
    _, cert = tls.make_server_cert(ca_key, ca_cert, days=5)
    (root / "certs" / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    state = _states(root)["tls_certificate"]
    assert state.status == "expiring"
    assert state.expires_at == cert.not_valid_after_utc.timestamp()
    assert _states(root, now=time.time() + 6 * DAY)["tls_certificate"].status == "expired"
    assert _states(root)["tls_ca_certificate"].status == "ok"


def test_a_missing_secret_is_listed_as_missing(root):
    (root / "secrets" / "totp.key").unlink()
    state = _states(root)["totp_key"]
    assert (state.status, state.failing) == ("missing", True)


def _check(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, "--config", str(root / "gateway.toml"), "secrets", "check", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_cli_exits_1_on_a_deployment_with_an_old_key(root):
    """`gateway secrets check`: 0 when all are within limits, 1 naming the overdue one."""
    fresh = _check(root)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "0 of 9 need attention" in fresh.stdout
    _age(root / "secrets" / "upstream.secret", 120)
    old = _check(root)
    assert old.returncode == 1
    assert re.search(
        r"^upstream_secret\s+shared_secret\s+120d\s+90d\s+overdue", old.stdout, re.MULTILINE
    )
    assert "1 of 9 need attention: upstream_secret" in old.stdout
    report = json.loads(_check(root, "--json").stdout)
    assert report["failing"] == ["upstream_secret"]
    assert (root / "secrets" / "upstream.secret").read_text().strip() not in old.stdout


# --- in the running gateway -------------------------------------------------------------------


def _metrics(admin_port: int) -> str:
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _value(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_for(admin_port: int, series: str, wanted, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = _metrics(admin_port)
        value = _value(text, series)
        if value is not None and wanted(value):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{series} = {value}")
        time.sleep(0.2)


def test_the_gateway_exports_ages_limits_and_expiry_and_follows_changes(make_gateway):
    """The age metrics are the inventory's, re-read every refresh_seconds: an aged secret shows
    up as failing without a restart."""
    gateway = make_gateway("http://127.0.0.1:9", secrets="refresh_seconds = 0.3\n")
    # The first inventory runs in the background after start: wait for its series.
    upstream_age = 'gateway_secret_age_seconds{secret="upstream_secret"}'
    text = _wait_for(gateway.admin_port, upstream_age, lambda v: v >= 0)
    assert _value(text, "gateway_secrets_failing") == 0
    age = _value(text, upstream_age)
    assert age is not None
    assert 0 <= age < 600
    assert _value(text, 'gateway_secret_max_age_seconds{secret="session_key"}') == 90 * DAY
    cert = x509.load_pem_x509_certificate((gateway.root / "certs" / "server.pem").read_bytes())
    expiry = _value(
        text, 'gateway_certificate_expiry_timestamp_seconds{certificate="tls_certificate"}'
    )
    assert expiry == cert.not_valid_after_utc.timestamp()
    assert _value(text, "gateway_tls_enabled") == 1
    _age(gateway.root / "secrets" / "session.key", 95)
    text = _wait_for(gateway.admin_port, "gateway_secrets_failing", lambda v: v == 1)
    assert _value(text, 'gateway_secret_age_seconds{secret="session_key"}') > 94 * DAY
    log = (gateway.root / "gateway.log").read_text()
    assert '"message":"secrets.attention","ecs.version":"1.6.0","item":"session_key"' in log


def _handshake(port: int, ciphers: str) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as s,
    ):
        return s.cipher()[0]


def _tls11_works_against_a_permissive_server(client: ssl.SSLContext, certs: Path) -> bool:
    """The control: this client really speaks TLS 1.1, so a refusal is the gateway's."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    server.load_cert_chain(certs / "server.pem", certs / "server-key.pem")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        accepted = threading.Thread(
            target=lambda: server.wrap_socket(listener.accept()[0], server_side=True).close()
        )
        accepted.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw) as wrapped,
        ):
            version = wrapped.version()
        accepted.join(timeout=5)
    return version == "TLSv1.1"


def test_tls_offers_aead_suites_only(make_gateway):
    """TLS 1.2 with a CBC suite is refused; the same client with an AES-GCM suite gets in; TLS
    1.1 is refused."""
    gateway = make_gateway("http://127.0.0.1:9")
    assert (
        _handshake(gateway.https_port, "ECDHE-ECDSA-AES128-GCM-SHA256")
        == "ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    with pytest.raises(ssl.SSLError):
        _handshake(gateway.https_port, "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    old = ssl.create_default_context()
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    assert _tls11_works_against_a_permissive_server(old, gateway.root / "certs")
    with (
        socket.create_connection(("127.0.0.1", gateway.https_port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(raw)


def test_production_without_tls_refuses_to_start(make_gateway):
    """tls.enabled = false in production: exit 2, naming the flag that would allow it."""
    gateway = make_gateway("http://127.0.0.1:9", server='environment = "production"', start=False)
    text = gateway.config_file.read_text().replace("[tls]\n", "[tls]\nenabled = false\n", 1)
    gateway.config_file.write_text(text)
    result = subprocess.run([*GATEWAY, "--config", str(gateway.config_file), "serve"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "refusing to start" in result.stderr
    assert "--allow-plaintext" in result.stderr


def test_allow_plaintext_serves_http_with_a_warning_and_a_metric(make_gateway):
    """With the flag the API answers in plain HTTP, the start logs gateway.plaintext, and
    gateway_tls_enabled is 0."""
    gateway = make_gateway("http://127.0.0.1:9", server='environment = "production"', start=False)
    text = gateway.config_file.read_text().replace("[tls]\n", "[tls]\nenabled = false\n", 1)
    gateway.config_file.write_text(text)
    command = [*GATEWAY, "--config", str(gateway.config_file), "serve", "--allow-plaintext"]
    log_file = gateway.root / "plain.log"
    with ExitStack() as stack:
        stack.enter_context(running(command, port=gateway.https_port, log_file=log_file, cwd=REPO))
        url = f"http://127.0.0.1:{gateway.https_port}/api/tickets"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["reason_id"] == "authn.missing_token"
        assert _value(_metrics(gateway.admin_port), "gateway_tls_enabled") == 0
    assert "gateway.plaintext" in log_file.read_text()


# --- browser hardening headers on every API answer ---------------------------------------------


async def test_every_answer_carries_the_hardening_headers(stack, client):
    """An allowed read, a refusal and the login page: nosniff, no referrer, no framing, HSTS
    over HTTPS; an answer to a credential is never cached; the login page keeps its own CSP."""
    token = stack.mint("headers-probe", ("reader",))
    answers = {}
    for name, path, headers in (
        ("allowed", "/api/tickets", {"Authorization": f"Bearer {token}"}),
        ("refused", "/api/tickets", {}),
        ("login_page", "/auth/login", {}),
    ):
        async with client.get(stack.url(path), headers=headers) as response:
            answers[name] = (response.status, response.headers)
    assert answers["allowed"][0] == 200
    assert answers["refused"][0] == 401
    for name, (_status, headers) in answers.items():
        assert headers["X-Content-Type-Options"] == "nosniff", name
        assert headers["Strict-Transport-Security"].startswith("max-age=31536000"), name
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], name
        assert "unsafe-inline" not in headers["Content-Security-Policy"], name
        assert headers["Referrer-Policy"] == "no-referrer", name
    assert answers["allowed"][1]["Cache-Control"] == "no-store"
    assert answers["allowed"][1]["Content-Security-Policy"].startswith("default-src 'none'")
    assert "form-action 'self'" in answers["login_page"][1]["Content-Security-Policy"]


# --- the keystore from the command line --------------------------------------------------------


def _gateway(root: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, "--config", str(root / "gateway.toml"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, input=stdin,
    )  # fmt: skip


def test_the_keystore_commands_keep_values_out_of_every_output(root):
    """init, put (from stdin), list, rotate-master, delete: each audited by name and version;
    no value in argv, output, audit, or the keystore file; `secrets check` lists its entries
    and its master key."""
    value = "planted-keystore-value-7d1f0c"
    assert _gateway(root, "secrets", "keystore", "list").returncode == 2  # none yet: no key made
    assert not (root / "secrets" / "keystore.master").exists()
    assert _gateway(root, "secrets", "keystore", "init").returncode == 0
    put = _gateway(root, "secrets", "keystore", "put", "upstream", stdin=value + "\n")
    assert put.returncode == 0, put.stderr
    assert put.stdout.strip() == "keystore:upstream version 1"
    again = _gateway(root, "secrets", "keystore", "put", "upstream", stdin=value + "-2\n")
    assert again.stdout.strip() == "keystore:upstream version 2"
    assert _gateway(root, "secrets", "keystore", "put", "empty", stdin="\n").returncode == 2
    before = (root / "secrets" / "keystore.json").read_bytes()
    assert _gateway(root, "secrets", "keystore", "rotate-master").returncode == 0
    assert (root / "secrets" / "keystore.json").read_bytes() != before
    listing = _gateway(root, "secrets", "keystore", "list").stdout
    assert re.fullmatch(r"keystore:upstream  version 2  \S+\n", listing)
    states = _states(root)
    assert states["keystore:upstream"].status == "ok"
    assert states["keystore_master"].kind == "key"
    assert _gateway(root, "secrets", "keystore", "delete", "upstream").returncode == 0
    assert "keystore:upstream" not in _states(root)
    kinds = [json.loads(line)["kind"] for line in (root / "audit.jsonl").read_text().splitlines()]
    assert kinds == ["secrets.keystore_created", "secrets.keystore_put", "secrets.keystore_put",
                     "secrets.master_rotated", "secrets.keystore_deleted"]  # fmt: skip
    for path in root.rglob("*"):
        if path.is_file():
            assert value.encode() not in path.read_bytes(), path
