"""Operational logging: formats, destinations, and the masking of every kind of planted secret."""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import stat
from pathlib import Path

import pytest
import structlog

from gateway import logs, masking
from gateway.config import ConfigError, LoggingConfig, load_config
from gateway.logs import configure_logging, register_secret
from gateway.masking import MASK, MAX_DEPTH, MaskSecrets

JWT = (
    "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsInJvbGVzIjpbInJlYWRlciJdfQ."
    "c2lnbmF0dXJlLXRoYXQtaXMtbm90LXJlYWwtYnV0LWxvbmc"
)
OPAQUE = "opaque-planted-bearer-7f3c9a1e5d"
BASIC = base64.b64encode(b"ingest-1:planted-client-secret-q9").decode()
PASSWORD = "planted horse battery staple"
CLIENT_SECRET = "pl4nted-cl1ent-s3cret-Zx81_Qw"
TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PEM_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7plantedkeymaterial"
PEM = f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----"
SESSION = "gAAAAABplantedSealedSessionCookieValue"
REFRESH = "ert1_plantedRefreshTokenValue_0123456789"
RECOVERY = "abcd-ef23-ghij-kl45"
EMAIL = "alice.operator@example.com"
EMAIL_PATTERN = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
LITERAL = "upstream-shared-secret-Hk2pW"
TENANT_KEY = "tenant-key-planted-31"


def nested(levels: int, leaf: object) -> object:
    value = leaf
    for _ in range(levels):
        value = {"level": value}
    return value


# (what the log call gets, the secret that must not come out)
PLANTED = {
    "jwt_in_text": ({"detail": f"token {JWT} was refused"}, JWT),
    "bearer_value": ({"header": f"Bearer {OPAQUE}"}, OPAQUE),
    "basic_in_a_header_dump": ({"raw": f"Host: x\r\nAuthorization: Basic {BASIC}\r\n"}, BASIC),
    "authorization_key": ({"authorization": f"Negotiate {OPAQUE}"}, OPAQUE),
    "cookie_key": ({"Cookie": f"__Host-emp_session={SESSION}; theme=dark"}, SESSION),
    "cookie_in_a_headers_mapping": ({"headers": {"Cookie": f"a={SESSION}", "Host": "x"}}, SESSION),
    "header_pairs": ({"headers": [("Host", "x"), ("Proxy-Authorization", OPAQUE)]}, OPAQUE),
    "session_cookie_by_name": ({"cookies": {"__Host-emp_session": SESSION}}, SESSION),
    "cookie_assignment_in_text": ({"note": f"saw __Host-emp_session={SESSION}"}, SESSION),
    "password_field": ({"password": PASSWORD}, PASSWORD),
    "new_password_field": ({"form": {"new_password": PASSWORD}}, PASSWORD),
    "password_in_a_form_body": (
        {"body": f"grant_type=password&username=alice&password={PASSWORD.replace(' ', '+')}"},
        PASSWORD.replace(" ", "+"),
    ),
    "password_in_a_json_body": ({"body": json.dumps({"password": PASSWORD})}, PASSWORD),
    "password_after_a_colon": ({"note": f"Password: {PASSWORD}"}, PASSWORD),
    "client_secret_field": ({"client_secret": CLIENT_SECRET}, CLIENT_SECRET),
    "client_secret_in_a_repr": ({"form": str({"client_secret": CLIENT_SECRET})}, CLIENT_SECRET),
    "client_secret_in_a_query": ({"path": f"/t?client_secret={CLIENT_SECRET}&x=1"}, CLIENT_SECRET),
    "totp_secret_field": ({"totp_secret": TOTP_SECRET}, TOTP_SECRET),
    "totp_secret_in_text": ({"note": f"enrolled with {TOTP_SECRET} today"}, TOTP_SECRET),
    "otpauth_uri": (
        {"uri": f"otpauth://totp/EMP%20gateway:bob?secret={TOTP_SECRET[:16]}&issuer=EMP"},
        TOTP_SECRET[:16],
    ),
    "otp_code_field": ({"otp": "492039"}, "492039"),
    "oauth_code_in_a_query": (
        {"path": "/cb?code=planted-oauth-code-1&state=s"},
        "planted-oauth-code-1",
    ),
    "pem_private_key": ({"material": f"loaded {PEM} ok"}, PEM_BODY),
    "pem_cut_short": ({"material": PEM[:60]}, PEM_BODY[:20]),
    "refresh_token_in_text": ({"note": f"reused {REFRESH}"}, REFRESH[5:]),
    "recovery_codes_field": ({"recovery_codes": [RECOVERY, "mnop-qr23-stuv-wx45"]}, RECOVERY),
    "recovery_code_in_text": ({"note": f"used {RECOVERY.upper()}"}, RECOVERY.upper()),
    "configured_email_pattern": ({"operator": f"set by {EMAIL}"}, EMAIL),
    "registered_literal": ({"note": f"x-gateway-secret was {LITERAL}!"}, LITERAL),
    "configured_key": ({"X-Tenant-Key": TENANT_KEY}, TENANT_KEY),
    "configured_key_in_text": ({"note": f"x_tenant_key={TENANT_KEY}"}, TENANT_KEY),
    "secret_in_an_exception_value": ({"error": ValueError(f"bad token {JWT}")}, JWT),
    "secret_deep_in_a_list": ({"batch": [{"auth": {"access_token": OPAQUE}}]}, OPAQUE),
    "secret_in_the_event_itself": ({"event": f"login with password={PASSWORD[:7]}"}, PASSWORD[:7]),
    "text_below_max_depth": ({"deep": nested(MAX_DEPTH + 5, f"Bearer {OPAQUE}")}, OPAQUE),
    "anything_below_max_depth": ({"deep": nested(MAX_DEPTH + 5, {"x": OPAQUE})}, OPAQUE),
}

INNOCUOUS = {
    "kid": "es256-1a2b3c4d5e6f",
    "kids": ["es256-1a2b3c4d5e6f"],
    "key_id": "audit-2026",
    "request_id": "4f1c2a9be07d4c5e8a1f3b6d9c0e2f71",
    "route": "tickets.update",
    "reason_id": "authn.expired",
    "digest": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "at": "2026-05-09T07:35:25.123456+00:00",
    "status_code": 401,
    "token_type": "Bearer",
    "max_token_bytes": 8192,
    "secret_file": "var/secrets/upstream.secret",
    "path": "/api/tickets/42?limit=5",
    "user_agent": "curl/8.5.0",
}


def config(**overrides: object) -> LoggingConfig:
    base: dict[str, object] = {
        "mask_patterns": (EMAIL_PATTERN,),
        "mask_keys": ("x-tenant-key",),
    }
    return LoggingConfig(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def restore_logging():
    """Each test configures logging for the process: put structlog and the root logger back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler.get_name() == logs.HANDLER_NAME:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**saved)
    logs._ACTIVE.clear()


def log_lines(capsys, fmt: str, fields: dict[str, object], **overrides: object) -> str:
    configure_logging(config(format=fmt, **overrides), literals=[LITERAL])
    event = fields.get("event", "test.planted")
    rest = {k: v for k, v in fields.items() if k != "event"}
    structlog.get_logger("test").warning(event, **rest)
    return capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize(("fields", "secret"), list(PLANTED.values()), ids=list(PLANTED))
def test_a_planted_secret_never_reaches_the_output(capsys, fmt, fields, secret):
    """Whatever the format, the planted secret is masked and the line is still written."""
    out = log_lines(capsys, fmt, fields)
    assert out.strip(), "the line must still be written"
    assert secret not in out
    assert MASK in out


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_innocuous_values_are_left_alone(capsys, fmt):
    """kid, request ids, route names, hashes, times and token_type come out exactly as logged."""
    out = log_lines(capsys, fmt, INNOCUOUS)
    assert MASK not in out
    for value in INNOCUOUS.values():
        shown = value[0] if isinstance(value, list) else value
        assert str(shown) in out


def test_ecs_line_is_json_with_the_ecs_fields(capsys):
    """format json writes one ECS object a line: @timestamp, log.level, message, ecs.version."""
    out = log_lines(capsys, "json", {"event": "gateway.listening", "port": 8443})
    [line] = out.splitlines()
    document = json.loads(line)
    assert document["message"] == "gateway.listening"
    assert document["log.level"] == "warning"
    assert document["@timestamp"].endswith("Z")
    assert document["ecs.version"]
    assert document["port"] == 8443


def test_the_callers_objects_are_not_changed(capsys):
    """Masking copies nested values: the dict the caller logged still holds its own data."""
    headers = {"Authorization": f"Bearer {OPAQUE}", "Host": "x"}
    log_lines(capsys, "json", {"headers": headers})
    assert headers["Authorization"] == f"Bearer {OPAQUE}"


def test_a_value_whose_str_raises_does_not_fail_the_log_call(capsys):
    """A broken __str__ is shown as unprintable instead of raising into the request."""

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError(OPAQUE)

    out = log_lines(capsys, "json", {"thing": Broken()})
    assert "unprintable Broken" in out
    assert OPAQUE not in out


def raising(error: Exception) -> None:
    raise error


def test_an_exception_traceback_is_masked(capsys):
    """log.exception's traceback text passes the mask: the secret in the message is gone."""
    configure_logging(config())
    try:
        raising(ValueError(f"upstream said Authorization: Bearer {OPAQUE}"))
    except ValueError:
        structlog.get_logger("test").exception("pipeline.unexpected_error")
    [line] = capsys.readouterr().err.splitlines()
    document = json.loads(line)
    assert "ValueError" in document["error"]["stack_trace"]
    assert OPAQUE not in line


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_stdlib_loggers_are_masked_and_formatted_too(capsys, fmt):
    """aiohttp's own loggers go through the same mask and renderer, tracebacks included."""
    configure_logging(config(format=fmt))
    aiohttp_log = logging.getLogger("aiohttp.server")
    aiohttp_log.warning("bad header Cookie: %s", f"__Host-emp_session={SESSION}")
    try:
        raising(RuntimeError(f"echo of {JWT}"))
    except RuntimeError:
        aiohttp_log.exception("Error handling request")
    out = capsys.readouterr().err
    assert SESSION not in out
    assert JWT not in out
    assert "Error handling request" in out
    if fmt == "json":
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["log.level"] for line in lines] == ["warning", "error"]
        assert "RuntimeError" in lines[1]["error"]["stack_trace"]


def test_a_secret_registered_after_start_is_masked(capsys):
    """register_secret (the upstream secret, once read) masks that literal in later lines."""
    configure_logging(config())
    register_secret("  late-loaded-secret-88\n")
    structlog.get_logger("test").info("upstream.ready", note="late-loaded-secret-88 in use")
    out = capsys.readouterr().err
    assert "late-loaded-secret-88" not in out


def test_the_level_filters_structlog_and_stdlib_lines(capsys):
    """At level warning, info lines of both kinds are dropped and warnings are kept."""
    configure_logging(config(level="warning"))
    structlog.get_logger("test").info("quiet.ours")
    logging.getLogger("aiohttp.access").info("quiet.theirs")
    structlog.get_logger("test").warning("loud.ours")
    out = capsys.readouterr().err
    assert "quiet" not in out
    assert "loud.ours" in out


def test_file_destination_rotates_and_is_private(tmp_path):
    """The rotating file and its backups are 0600 in a 0700 directory, rotated at max bytes."""
    path = tmp_path / "logs" / "gateway.log"
    configure_logging(
        config(destination="file", file_path=path, file_max_bytes=4096, file_backups=2)
    )
    log = structlog.get_logger("gateway.test")
    for i in range(120):
        log.info("filler.line", index=i, token=OPAQUE, note="x" * 40)
    logging.getLogger("aiohttp.server").error("raw Authorization: Bearer %s", OPAQUE)
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["gateway.log", "gateway.log.1", "gateway.log.2"]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    lines = []
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
        assert file.stat().st_size <= 4096
        lines += file.read_text().splitlines()
    assert all(json.loads(line)["token"] == MASK for line in lines[:-1] if "filler" in line)
    assert json.loads(path.read_text().splitlines()[-1])["message"] == "raw Authorization: ***"
    assert all(OPAQUE not in line for line in lines)


def test_file_destination_tightens_an_old_files_permissions(tmp_path):
    """A log file left world-readable by an older run is made 0600 when opened."""
    path = tmp_path / "gateway.log"
    path.write_text("")
    path.chmod(0o644)
    configure_logging(config(destination="file", file_path=path))
    structlog.get_logger("gateway.test").info("hello")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["message"] == "hello"


def test_a_lost_line_is_reported_without_its_unmasked_fields(tmp_path, capsys):
    """When the destination fails, stderr says a line was lost and shows none of its values."""

    class FullDisk:
        def write(self, *_args: object) -> int:
            raise OSError(28, "No space left on device")

        seek = tell = write

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    configure_logging(config(destination="file", file_path=tmp_path / "gateway.log"))
    [handler] = [h for h in logging.getLogger().handlers if h.get_name() == logs.HANDLER_NAME]
    handler.stream.close()
    handler.stream = FullDisk()
    structlog.get_logger("gateway.test").warning("login.failed", password=PASSWORD)
    err = capsys.readouterr().err
    assert err == "gateway: a log line was lost (OSError errno 28)\n"


@pytest.mark.parametrize("family", ["unix", "udp"])
def test_syslog_destination_delivers_masked_lines(tmp_path, family):
    """A real SysLogHandler sends one tagged datagram per line to a socket the test binds."""
    if family == "unix":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(str(tmp_path / "log.sock"))
        address = str(tmp_path / "log.sock")
    else:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{server.getsockname()[1]}"
    server.settimeout(5)
    with server:
        configure_logging(config(destination="syslog", syslog_address=address))
        structlog.get_logger("gateway.test").warning("login.failed", password=PASSWORD)
        logging.getLogger("aiohttp.server").error("Cookie: %s", SESSION)
        datagrams = [server.recv(65536).decode() for _ in range(2)]
    # <facility * 8 + severity>: daemon (3), warning (4) then error (3); RFC 3164's TAG.
    assert [d[: d.index(" ") + 1] for d in datagrams] == ["<28>emp-gateway: ", "<27>emp-gateway: "]
    for datagram in datagrams:
        assert PASSWORD not in datagram
        assert SESSION not in datagram
    ours = json.loads(datagrams[0].split(": ", 1)[1].rstrip("\0"))
    assert (ours["message"], ours["password"], ours["log.level"]) == (
        "login.failed",
        MASK,
        "warning",
    )


def write_config(tmp_path: Path, logging_table: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[logging]\n{logging_table}\n")
    return path


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('mask_patterns = ["("]', r"logging\.mask_patterns\[0\]: '\(' is not a regex"),
        ('mask_patterns = ["ok", "a*"]', r"logging\.mask_patterns\[1\]: .* matches the empty string"),
        ('mask_patterns = ["(?P<jwt>x)"]', r"logging\.mask_patterns\[0\]: .* named group"),
        (r"mask_patterns = ['(a)\1']", r"logging\.mask_patterns\[0\]: .* backreference"),
        ('mask_patterns = ["(?i)secret-[0-9]+"]', r"logging\.mask_patterns\[0\]: .* global flag; scope it"),
        ('mask_keys = [" "]', r"logging\.mask_keys\[0\] must not be empty"),
        ("file_backups = 0", r"logging\.file_backups"),
        ("file_max_bytes = 100", r"logging\.file_max_bytes"),
        ('syslog_address = "loghost"', r"logging\.syslog_address"),
        ('syslog_address = "loghost:70000"', r"logging\.syslog_address"),
        ('destination = "kafka"', r"logging\.destination"),
        ('format = "ecs"', r"logging\.format"),
    ],
    ids=["bad_regex", "empty_match", "named_group", "backreference", "inner_global_flag", "blank_key",
         "no_backups", "tiny_file", "syslog_no_port", "syslog_bad_port", "bad_destination",
         "bad_format"],
)  # fmt: skip
def test_bad_logging_config_names_the_key(tmp_path, table, named):
    """Each logging mistake stops the start with the key (and the pattern's index) named."""
    with pytest.raises(ConfigError, match=named):
        load_config(write_config(tmp_path, table), env={})


def test_good_logging_config_loads(tmp_path):
    """Every new key reads from TOML into its typed, frozen field."""
    table = (
        'destination = "syslog"\nsyslog_address = "[::1]:514"\nfile_path = "x/g.log"\n'
        'mask_keys = ["x-tenant-key"]\nmask_patterns = ["(?i:acct-[0-9]+)"]'
    )
    loaded = load_config(write_config(tmp_path, table), env={}).logging
    assert loaded.destination == "syslog"
    assert logs.syslog_address(loaded.syslog_address) == ("::1", 514)
    assert loaded.file_path == Path("x/g.log")
    assert loaded.mask_keys == ("x-tenant-key",)
    assert MaskSecrets(patterns=loaded.mask_patterns).mask_text("ACCT-991 paid") == "*** paid"


@pytest.mark.parametrize(
    ("key", "sensitive"),
    [
        ("Authorization", True), ("Set-Cookie", True), ("x-gateway-secret", True),
        ("X-Api-Key", True), ("upstream_secret", True), ("csrf_token", True),
        ("__Host-emp_session", True), ("recovery_codes", True), ("code", True), ("key", True),
        ("kid", False), ("key_id", False), ("status_code", False), ("token_type", False),
        ("tokens", False), ("max_token_bytes", False), ("secret_file", False),
        ("request_id", False), ("password_changed_at", False),
    ],
)  # fmt: skip
def test_which_keys_are_masked_whole(key, sensitive):
    """Credential names (exact, by suffix, cookie prefixes) are masked; their neighbours are not."""
    assert MaskSecrets().is_sensitive_key(key) is sensitive


FRAGMENTS = [
    "password", "Passwd", "client_secret", "token", "KEY", "otp", "code", "cookie", "auth",
    "Authorization", "__Host-emp_session", "x-tenant-key", "=", ":", ": ", '"', "'", " ", "&",
    "eyJ", "eyJhbGci.eyJzdWIi.c2ln", "Bearer ", "basic ", "otpauth://totp/x", "ert1_abcdefghij",
    "-abcd-", "abcd-ef23-ghij-kl45", TOTP_SECRET, "-----BEGIN PRIVATE KEY-----", "request",
    "2026-05-09T07:35:25Z", "tickets.update", "4f1c2a9b", EMAIL, LITERAL, "\n", "x" * 40,
    "EYJ", "ERT1_x", "-----begin", "set-cookie:", "X_TENANT_KEY=", "\\", "}", "PRIVATE KEY-----",
]  # fmt: skip


def test_the_quick_test_never_skips_a_text_the_rules_would_change():
    """On random mixes of names, separators and token shapes, the guarded mask equals the full one."""
    mask = MaskSecrets(keys=["x-tenant-key"], patterns=[EMAIL_PATTERN], literals=[LITERAL])
    rules = mask._compiled.everything
    rng = random.Random(20)  # noqa: S311 - reproducible test input, not a secret
    for _ in range(20000):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 6)))
        assert mask.mask_text(text) == rules.sub(masking._replacement, text), text
    assert len(mask._compiled._combined) == masking._MAX_COMBINATIONS  # the fallback ran too
