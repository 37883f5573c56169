"""RFC 5424 messages and RFC 6587 framing for the SIEM: hostile event fields never break the
header, the structured data or the frame; each message is parsed back with a strict grammar."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.audit import protocol_error_event, system_event
from gateway.config import ConfigError, SiemConfig, _check_siem, load_config
from gateway.siem import (
    BOM,
    SD_VALUE_MAX_CHARS,
    format_rfc5424,
    frame_octet_counted,
    sd_name,
)

# RFC 5424 section 6, strictly: PRINTUSASCII header fields within their lengths, one SD-ELEMENT
# whose PARAM-VALUEs escape '"', '\' and ']', then a space, the BOM and the MSG.
_PRINT = rb"[\x21-\x7e]"
_SD_NAME = rb"[\x21-\x3c\x3e-\x5c\x5e-\x7e]{1,32}"  # PRINTUSASCII but '=', ']' and '"'
_SYSLOG = re.compile(
    rb"<(?P<pri>\d{1,3})>1 "
    rb"(?P<timestamp>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<hostname>" + _PRINT + rb"{1,255}) "
    rb"(?P<app_name>" + _PRINT + rb"{1,48}) "
    rb"(?P<procid>" + _PRINT + rb"{1,128}) "
    rb"(?P<msgid>" + _PRINT + rb"{1,32}) "
    rb"\[(?P<sd_id>" + _SD_NAME + rb")"
    rb"(?P<params>(?: "
    + _SD_NAME
    + rb'="(?:[^"\\\]]|\\.)*")*)\] '
    + re.escape(BOM)
    + rb"(?P<msg>.*)",
    re.DOTALL,
)
_PARAM = re.compile(rb" (" + _SD_NAME + rb')="((?:[^"\\\]]|\\.)*)"', re.DOTALL)
_UNESCAPE = re.compile(r'\\(["\\\]])')


def parse(message: bytes) -> dict:
    """The fields of one RFC 5424 message, or an AssertionError naming what is malformed."""
    match = _SYSLOG.fullmatch(message)
    assert match is not None, f"not strict RFC 5424: {message[:200]!r}"
    params = {
        name.decode(): _UNESCAPE.sub(r"\1", value.decode("utf-8"))
        for name, value in _PARAM.findall(match["params"])
    }
    fields = {k: v.decode() for k, v in match.groupdict().items() if k not in ("params", "msg")}
    return {**fields, "params": params, "event": json.loads(match["msg"].decode("utf-8"))}


def unframe(stream: bytes) -> list[bytes]:
    """Split an octet-counted stream the way a receiver does (RFC 6587 section 3.4.1)."""
    messages = []
    while stream:
        length, space, rest = stream.partition(b" ")
        assert space, stream[:20]
        assert re.fullmatch(rb"[1-9][0-9]*", length), stream[:20]  # MSG-LEN: NONZERO-DIGIT *DIGIT
        size = int(length)
        assert len(rest) >= size, "frame shorter than its count"
        messages.append(rest[:size])
        stream = rest[size:]
    return messages


def shipped(event: dict, **overrides) -> dict:
    options = {"app_name": "emp-gateway", "hostname": "gw-1", "facility": 13, "procid": 4242}
    return parse(format_rfc5424(event, **{**options, **overrides}))


def request(**fields) -> dict:
    return {**protocol_error_event("req-1", 400, "request.malformed_http", "127.0.0.1"), **fields}


def test_a_request_event_reads_back_whole():
    """Header, SD and MSG carry the event: its time, kind, ids and the whole JSON."""
    event = request(subject="alice", route="tickets.list")
    fields = shipped(event)
    assert fields["hostname"] == "gw-1"
    assert fields["app_name"] == "emp-gateway"
    assert fields["procid"] == "4242"
    assert fields["msgid"] == "request"
    assert fields["sd_id"] == "emp@32473"
    assert fields["params"] == {
        "event_id": "req-1", "request_id": "req-1", "kind": "request", "subject": "alice",
        "decision": "deny", "reason_id": "request.malformed_http", "route": "tickets.list",
        "status": "400",
    }  # fmt: skip
    assert fields["event"] == event
    parsed_time = datetime.fromisoformat(fields["timestamp"])
    assert parsed_time == datetime.fromisoformat(event["time"])


@pytest.mark.parametrize(
    ("decision", "facility", "pri"),
    [
        ("deny", 13, 13 * 8 + 4),
        ("allow", 13, 13 * 8 + 5),
        (None, 13, 13 * 8 + 6),
        ("maybe", 13, 13 * 8 + 6),
        ("deny", 0, 4),
        ("allow", 23, 23 * 8 + 5),
    ],
    ids=["deny-warning", "allow-notice", "system-info", "unknown-info", "kern", "local7"],
)
def test_pri_is_facility_times_8_plus_severity(decision, facility, pri):
    """A deny is a warning, an allow a notice, anything else info (RFC 5424 6.2.1)."""
    assert shipped(request(decision=decision), facility=facility)["pri"] == str(pri)


HOSTILE = [
    ("newline", "alice\n<13>1 - forged - - - - injected"),
    ("carriage-return-and-nul", "alice\r\n\x00bob"),
    ("closing-bracket", 'alice] [forged@1 admin="yes"]'),
    ("quote", 'alice" admin="yes'),
    ("backslash-before-quote", 'alice\\" x="'),
    ("trailing-backslash", "alice\\"),
    ("non-ascii", "Zoë Ålund ☃ 社員"),
    ("bidi-override", "alice\u202eevil"),
    ("c1-control", "alice\x85\x9bbob"),
    ("lone-surrogate", "alice\udcff\udc80"),
    ("octet-count-lookalike", "12 <13>1 2024-01-01T00:00:00Z h a p m - x"),
    ("very-long", "A" * 100_000),
]


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for _, v in HOSTILE for f in ("subject", "route", "event_id")],
    ids=[f"{f}-{n}" for n, _ in HOSTILE for f in ("subject", "route", "event_id")],
)
def test_hostile_sd_values_stay_inside_their_param(field, value):
    """Whatever an SD field holds, the message stays strict RFC 5424 with the same params."""
    fields = shipped(request(**{"subject": "alice", field: value}))
    assert set(fields["params"]) == {
        "event_id", "request_id", "kind", "subject", "decision", "reason_id", "route", "status",
    }  # fmt: skip
    got = fields["params"][field]
    assert len(got) <= SD_VALUE_MAX_CHARS
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", got), "control characters reach the SIEM"
    assert fields["event"][field] == value, "the MSG JSON keeps the value exactly"


@pytest.mark.parametrize(("name", "value"), HOSTILE, ids=[n for n, _ in HOSTILE])
def test_hostile_kind_becomes_a_printable_msgid_of_at_most_32(name, value):
    """The kind is the MSGID: printable US-ASCII only, 32 characters at most, never empty."""
    msgid = shipped(system_event(value))["msgid"]
    assert 1 <= len(msgid) <= 32
    assert re.fullmatch(r"[\x21-\x7e]+", msgid)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (("gw 1\nforged", "emp gateway", "1 2"), ("gw_1_forged", "emp_gateway", "1_2")),
        (("h" * 300, "a" * 60, "p" * 200), ("h" * 255, "a" * 48, "p" * 128)),
        (("", "", ""), ("-", "-", "-")),
        (("gwé", "app☃", None), ("gw_", "app_", "-")),
    ],
    ids=["spaces-and-newline", "too-long", "empty", "non-ascii"],
)
def test_header_fields_are_sanitised_and_cut_to_their_rfc_lengths(given, expected):
    """HOSTNAME, APP-NAME, PROCID: printable ASCII, within 255/48/128 chars, "-" when empty."""
    hostname, app_name, procid = given
    fields = shipped(request(), hostname=hostname, app_name=app_name, procid=procid)
    assert (fields["hostname"], fields["app_name"], fields["procid"]) == expected


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        ("2024-03-01T12:00:00.123+00:00", "2024-03-01T12:00:00.123000Z"),
        ("2024-03-01T13:00:00+01:00", "2024-03-01T12:00:00.000000Z"),
        ("2024-03-01T12:00:00Z", "2024-03-01T12:00:00.000000Z"),
        (datetime(2024, 3, 1, 12, tzinfo=UTC), "2024-03-01T12:00:00.000000Z"),
        (
            datetime(2024, 3, 1, 14, tzinfo=timezone(timedelta(hours=2))),
            "2024-03-01T12:00:00.000000Z",
        ),
        ("2024-03-01T12:00:00", "-"),
        ("yesterday", "-"),
        ("2024-03-01T12:00:00+00:00" + " " * 100, "-"),
        (None, "-"),
        (1709294400, "-"),
    ],
    ids=[
        "ms",
        "offset",
        "zulu",
        "datetime",
        "datetime-offset",
        "naive",
        "garbage",
        "long",
        "missing",
        "epoch",
    ],
)
def test_timestamp_is_the_event_time_in_utc_or_nil(time, expected):
    """TIMESTAMP is RFC 3339 in UTC; a time without a zone or not a time is NILVALUE."""
    assert shipped(request(time=time))["timestamp"] == expected


def test_missing_fields_are_absent_params_and_nil_header_fields():
    """A system event has no request id, decision or status: no empty params, MSGID kept."""
    fields = shipped({"event_id": "e1", "kind": "keys.rotated"})
    assert fields["params"] == {"event_id": "e1", "kind": "keys.rotated"}
    assert fields["timestamp"] == "-"
    fields = shipped({})
    assert fields["msgid"] == "-"
    assert fields["params"] == {}


def test_nested_values_stay_out_of_sd_and_in_the_json():
    """A list or object in an SD field is not flattened into SD; the MSG keeps it."""
    fields = shipped(request(subject={"sub": "x"}, status=[1, 2]))
    assert "subject" not in fields["params"]
    assert "status" not in fields["params"]
    assert fields["event"]["subject"] == {"sub": "x"}


def test_the_msg_is_bom_then_ascii_json_even_for_undecodable_input():
    """MSG is BOM + JSON with every non-ASCII character escaped: never invalid UTF-8."""
    message = format_rfc5424(
        request(user_agent="\udcff\u00e9\n", detail={"k": "☃"}),
        app_name="a",
        hostname="h",
        facility=13,
    )
    body = message.split(BOM, 1)[1]
    assert body.isascii()
    assert json.loads(body)["user_agent"] == "\udcff\u00e9\n"


def test_values_that_are_not_json_types_are_shipped_as_text():
    """A stray non-JSON value (a Path, a datetime) in detail is text, not a crash."""
    fields = shipped(request(detail={"file": Path("/x"), "at": datetime(2024, 1, 1, tzinfo=UTC)}))
    assert fields["event"]["detail"] == {"file": "/x", "at": "2024-01-01 00:00:00+00:00"}


@pytest.mark.parametrize(
    "name",
    ["event_id", "has space", 'q"uote', "eq=ual", "br]acket", "ünï", "x" * 40, ""],
)
def test_sd_names_are_sanitised(name):
    """SD-NAMEs are 1..32 printable ASCII characters without '=', ' ', ']' or '"'."""
    assert re.fullmatch(rb"[\x21-\x3c\x3e-\x5c\x5e-\x7e]{1,32}", sd_name(name).encode())


@pytest.mark.parametrize(
    "message",
    [b"x", b"12 <13>1 -", b"a\nb\r\n", "☃".encode() * 1000, b"9" * 70_000],
    ids=["one", "count-lookalike", "newlines", "multibyte", "long"],
)
def test_octet_counting_frames_by_bytes_not_characters(message):
    """The count is the byte length: a receiver splits exactly one message back out."""
    framed = frame_octet_counted(message)
    assert unframe(framed) == [message]


def test_a_stream_of_hostile_frames_splits_back_into_the_same_messages():
    """Concatenated frames of hostile events split back one for one, each strict RFC 5424."""
    events = [request(event_id=f"e{i}", subject=value) for i, (_, value) in enumerate(HOSTILE)]
    messages = [
        format_rfc5424(e, app_name="emp-gateway", hostname="gw", facility=13) for e in events
    ]
    stream = b"".join(frame_octet_counted(m) for m in messages)
    assert unframe(stream) == messages
    assert [parse(m)["params"]["event_id"] for m in unframe(stream)] == [
        e["event_id"] for e in events
    ]


# SiemConfig cross-checks: a bad SIEM setting stops the start with the key named.
@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"transport": "tcp", "host": "siem.example.com"}, "allow_plaintext"),
        ({"transport": "tcp", "host": "10.0.0.8"}, "allow_plaintext"),
        ({"transport": "tcp", "host": "127.0.0.1.attacker.example"}, "allow_plaintext"),
        ({"transport": "tls", "allow_plaintext": True}, "allow_plaintext"),
        ({"transport": "tcp", "ca_file": Path("ca.pem")}, "siem.ca_file"),
        ({"port": 0}, "siem.port"),
        ({"port": 70000}, "siem.port"),
        ({"host": ""}, "siem.host"),
        ({"facility": 24}, "siem.facility"),
        ({"memory_buffer": 0}, "siem.memory_buffer"),
        ({"retry_initial_seconds": 60.0}, "retry_initial_seconds"),
        ({"client_cert_file": Path("c.pem")}, "client_key_file"),
        ({"app_name": "emp gateway"}, "siem.app_name"),
        ({"hostname": "h\n"}, "siem.hostname"),
        ({"delivery_grace_seconds": 60.0}, "delivery_grace_seconds"),
    ],
    ids=[
        "tcp-remote-name",
        "tcp-remote-ip",
        "tcp-loopback-lookalike",
        "tls-with-plaintext-flag",
        "tcp-with-ca",
        "port-zero",
        "port-high",
        "no-host",
        "facility",
        "no-buffer",
        "retry-order",
        "cert-without-key",
        "app-name-space",
        "hostname-newline",
        "grace",
    ],
)
def test_bad_siem_settings_stop_the_start(changes, named):
    """Plaintext to a remote host, conflicting TLS keys and out-of-range values are refused."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        _check_siem(replace(SiemConfig(), **changes))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"transport": "tcp", "host": "127.0.0.1"},
        {"transport": "tcp", "host": "::1"},
        {"transport": "tcp", "host": "localhost"},
        {"transport": "tcp", "host": "siem.example.com", "allow_plaintext": True},
        {"host": "siem.example.com", "client_cert_file": Path("c"), "client_key_file": Path("k")},
    ],
    ids=[
        "defaults",
        "tcp-loopback",
        "tcp-ipv6-loopback",
        "tcp-localhost",
        "tcp-remote-allowed",
        "mutual-tls",
    ],
)
def test_good_siem_settings_pass(changes):
    """TLS anywhere, plain TCP to loopback, or plain TCP with allow_plaintext said out loud."""
    _check_siem(replace(SiemConfig(), **changes))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[siem]\nhots = "siem.example.com"\n', "siem.hots"),
        ('[siem]\ntransport = "udp"\n', "siem.transport"),
        ('[siem]\nport = "6514"\n', "siem.port"),
        ('[siem]\ntransport = "tcp"\nhost = "siem.example.com"\n', "allow_plaintext"),
    ],
    ids=["typo", "udp", "port-as-string", "plaintext-remote"],
)
def test_the_siem_table_is_checked_when_the_config_loads(tmp_path, text, named):
    """A [siem] typo, an unknown transport or plaintext to a remote host stops load_config."""
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(path, env={})


def test_siem_is_off_by_default_and_the_shipped_config_loads():
    """Without a [siem] table, shipping is off and the defaults pass their own checks."""
    config = load_config(Path(__file__).parents[2] / "config" / "gateway.toml", env={})
    assert config.siem == SiemConfig()
    assert not config.siem.enabled
    assert config.siem.transport == "tls"
