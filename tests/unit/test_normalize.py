"""Path and query normalisation, without the network."""

from __future__ import annotations

import pytest

from gateway.pipeline import Denial
from gateway.stages.normalize import normalise_path, parse_query

RESOLVED = [
    ("plain", "/api/tickets", "/api/tickets"),
    ("trailing_slash", "/api/tickets/", "/api/tickets"),
    ("repeated_slashes", "//api///tickets//", "/api/tickets"),
    ("dot", "/api/./tickets/.", "/api/tickets"),
    ("dotdot_inside", "/api/a/b/../../tickets", "/api/tickets"),
    ("encoded_dots", "/api/x/%2e%2E/tickets", "/api/tickets"),
    ("encoded_letter", "/api/%74ickets", "/api/tickets"),
    ("root", "/", "/"),
    ("space_reencoded", "/api/a%20b", "/api/a%20b"),
    ("utf8_reencoded", "/api/%C3%A9t%C3%A9", "/api/%C3%A9t%C3%A9"),
]

REFUSED = [
    ("climb_root", "/.."),
    ("climb_after_resolve", "/api/../.."),
    ("encoded_slash", "/api%2Ftickets"),
    ("encoded_backslash", "/api%5Ctickets"),
    ("encoded_nul", "/api%00"),
    ("raw_backslash", "/api\\tickets"),
    ("lone_percent", "/api/%"),
    ("short_percent", "/api/%4"),
    ("non_hex_percent", "/api/%g1"),
    ("double_encoded", "/api/%252e%252e"),
    ("invalid_utf8", "/api/%ff"),
    ("overlong_utf8_dot", "/api/%c0%ae"),
    ("control_char", "/api/%0a"),
    ("relative", "api/tickets"),
]


@pytest.mark.parametrize(
    ("raw", "canonical"), [r[1:] for r in RESOLVED], ids=[r[0] for r in RESOLVED]
)
def test_path_resolves_to_canonical_form(raw, canonical):
    """Ambiguities that can be resolved are, into one canonical, re-encoded path."""
    assert normalise_path(raw)[0] == canonical


@pytest.mark.parametrize("raw", [r[1] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_ambiguous_path_is_refused(raw):
    """Anything that could mean two paths to two parsers is refused as request.bad_path."""
    with pytest.raises(Denial) as refused:
        normalise_path(raw)
    assert refused.value.reason_id == "request.bad_path"
    assert refused.value.status == 400


def test_segments_are_decoded():
    """The policy sees decoded segments, the upstream gets them re-encoded."""
    assert normalise_path("/api/a%20b/../c")[1] == ("api", "c")
    assert normalise_path("/api/a%20b")[1] == ("api", "a b")


def test_query_is_strictly_decoded_with_repeats():
    """Repeated keys are kept in order; '+' is a space; bad encoding is refused."""
    query = parse_query("status=open&status=closed&q=a+b%21")
    assert query.getall("status") == ["open", "closed"]
    assert query["q"] == "a b!"
    for bad in ("q=%zz", "q=%ff", "q=%00"):
        with pytest.raises(Denial) as refused:
            parse_query(bad)
        assert refused.value.reason_id == "request.bad_query"
