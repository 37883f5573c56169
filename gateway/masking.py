"""Secret masking for log lines: one structlog processor, run just before the renderer.

It must never raise (a log call that raises would fail the request) and never hand the renderer
a value it has not looked at: anything that is not a plain JSON scalar is masked as text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from structlog.typing import EventDict, WrappedLogger

MASK = "***"
# Event dicts here are two or three levels deep; a cycle or a pathological value stops here.
MAX_DEPTH = 10
_MAX_REMEMBERED_KEYS = 4096  # key verdicts cached: log keys come from code, a bound for the rest

# Key names (lowercased, "-" read as "_") whose values are credentials. Exact names only where
# a suffix would hit innocent keys: "key" but not "kid" or "key_id", "code" but not "status_code".
SENSITIVE_KEYS = frozenset({
    "authorization", "proxy_authorization", "cookie", "set_cookie", "x_gateway_secret",
    "password", "passwd", "new_password", "secret", "client_secret", "token", "access_token",
    "refresh_token", "id_token", "csrf_token", "otp", "totp", "totp_secret", "recovery_code",
    "recovery_codes", "code", "private_key", "key", "api_key", "x_api_key",
})  # fmt: skip
SENSITIVE_SUFFIXES = ("_password", "_passwd", "_secret", "_token", "_private_key", "_api_key")
SENSITIVE_PREFIXES = ("__host_", "__secure_")  # cookie names: the session and login cookies

# The same names as they appear inside text ("password=...", "'cookie': '...'"): one alternation.
_TEXT_NAMES = (
    r"[\w-]*?(?:password|passwd|secret|token|private[_-]key|api[_-]key)"
    r"|(?:proxy-)?authorization|(?:set-)?cookie|otp|totp|code|key|recovery[_-]codes?"
    r"|__(?:host|secure)-[\w.-]+"
)
# Names whose value, after "name:", is the rest of the line (an HTTP header dump, a form field).
_LINE_NAMES = (
    r"(?:proxy-)?authorization|(?:set-)?cookie|x-gateway-secret|x-api-key|[\w-]*passw(?:or)?d"
)
_PEM = r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----(?s:.*?)(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)"
# "name": "value" and 'name': 'value' (JSON, a Python repr), also with a bare value.
_QUOTED = (
    r"(?P<quoted_p>[\"'](?i:NAMES)[\"']\s*[:=]\s*)"
    r"(?:(?P<quoted_q>[\"'])(?:(?!(?P=quoted_q))[^\\\r\n]|\\.)*(?P=quoted_q)?|[^\s,;}\])\"']+)"
)
# Parts of the names in _TEXT_NAMES and _LINE_NAMES: a name rule needs one, next to ":" or "=".
_NAME_STEMS = r"pass|secret|token|key|auth|cookie|otp|code|__host-|__secure-"
# Rule combinations compiled at most; crafted values could ask for each of 2^12, and past this
# many they get the regex of all rules.
_MAX_COMBINATIONS = 64
_BACKREFERENCE = re.compile(r"(?<!\\)(?:\\\\)*\\[1-9]")  # \1 .. \9, not an escaped backslash
_RECOVERY_SHAPE = re.compile(r"-[A-Za-z2-7]{4}-")
_BASE32_SHAPE = re.compile(r"[A-Z2-7]{32}")


def _rules(names: str) -> list[tuple[str, str]]:
    """The built-in text rules, (group name, regex) in the order they are tried at a position."""
    return [
        ("pem", _PEM),  # also a block cut short (by a length limit), to its end
        # JWS (three parts) and JWE (five): their header is base64url JSON, so it starts "eyJ".
        ("jwt", r"\beyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){2,4}"),
        ("otpauth", r"(?P<otpauth_p>(?i:otpauth://))[^\s\"'<>]*"),
        ("refresh", r"(?P<refresh_p>\bert1_)[A-Za-z0-9_-]{8,}"),  # gateway/identity/tokens.py
        ("scheme", r"(?P<scheme_p>(?i:\b(?:bearer|basic)[ \t]+))[A-Za-z0-9._~+/-]+=*"),
        ("quoted", _QUOTED.replace("NAMES", names)),
        # The lookaheads skip, in one cheap scan, a word not followed by its separator.
        (
            "line",
            rf"(?P<line_p>(?<![\w-])(?=[\w-]+[ \t]*:)(?i:{_LINE_NAMES})[ \t]*:[ \t]*)[^\r\n]+",
        ),
        ("assign", rf"(?P<assign_p>(?<![\w-])(?=[\w.-]+=)(?i:{names})=)[^\s&;,\"'<>]+"),
        # Recovery codes (gateway/identity/mfa.py) and TOTP secrets (base32, 160 bits and up).
        ("recovery", r"(?i:\b[a-z2-7]{4}(?:-[a-z2-7]{4}){3}\b)"),
        ("base32", r"(?<![A-Za-z0-9])[A-Z2-7]{32,}=*(?![A-Za-z0-9])"),
    ]


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A configured mask pattern, compiled; ValueError says what is wrong with it."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a regex: {exc}") from None
    try:
        compiled = re.compile(f"(?:{pattern})")  # as it is combined with the other rules
    except re.error:
        raise ValueError(f"{pattern!r} has a global flag; scope it, as in (?i:...)") from None
    if compiled.groupindex or _BACKREFERENCE.search(pattern):
        # Combined with the masker's rules, a group name could collide and \1 would point elsewhere.
        raise ValueError(f"{pattern!r} has a named group or a backreference: use (...) or (?:...)")
    if compiled.match("") is not None:
        # It would match between every two characters and bury each line in masks.
        raise ValueError(f"{pattern!r} matches the empty string")
    return compiled


class MaskSecrets:
    """structlog processor: credentials in an event dict become "***" before it is rendered.

    A value is masked whole when its key names a credential (SENSITIVE_KEYS, the suffixes,
    plus `keys`); inside every string, JWTs, Bearer/Basic credentials, otpauth:// URIs, PEM
    private keys, refresh tokens, recovery codes, TOTP secrets, `name=value` pairs with a
    credential's name, registered literals and the configured `patterns` are masked.
    """

    def __init__(
        self,
        *,
        keys: Iterable[str] = (),
        patterns: Iterable[str] = (),
        literals: Iterable[str] = (),
    ) -> None:
        self._extra_keys = frozenset(_normalise_key(key) for key in keys if key.strip())
        extra_names = "".join(f"|{_text_name(key)}" for key in sorted(self._extra_keys))
        self._names = _TEXT_NAMES + extra_names
        self._named = re.compile(f"(?i:{_NAME_STEMS}{extra_names})")
        self._patterns = tuple(compile_pattern(p).pattern for p in patterns)
        self._literals: set[str] = set()
        self._verdicts: dict[str, bool] = {}
        self._compiled = self._compile()
        for literal in literals:
            self.add_literal(literal)

    def add_literal(self, literal: str) -> None:
        """Mask this exact text from now on (a secret the gateway loaded, e.g. a shared secret)."""
        literal = literal.strip()
        if literal and literal not in self._literals:
            self._literals.add(literal)
            self._compiled = self._compile()  # one assignment: a log call sees old or new, whole

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """The event dict with every credential masked (top level in place, nested copied)."""
        for key, value in list(event_dict.items()):
            event_dict[key] = self._mask_field(key, value, 0)
        return event_dict

    def mask_text(self, text: str) -> str:
        """The text with every secret the rules find replaced by "***"."""
        compiled = self._compiled
        needed = self._rules_needed(text, compiled)
        if not needed:
            return text
        return compiled.regex_for(needed).sub(_replacement, text)

    def _rules_needed(self, text: str, compiled: _Compiled) -> tuple[str, ...]:
        """The rules that could match, by tests made mostly of str methods (~1 us a value).

        A regex pays for each rule at each character (all rules: ~8 us for "request.done"
        here); most values (event names, ids, routes) need none, the rest one or two.
        """
        needed: list[str] = []
        if compiled.literals is not None and compiled.literals.search(text) is not None:
            needed.append("literal")
        needed += _token_rules_needed(text)
        if ("=" in text or ":" in text) and self._named.search(text) is not None:
            needed += ("quoted", "line", "assign")  # "name=value", '"name": "value"', ...
        if "-" in text and _RECOVERY_SHAPE.search(text) is not None:
            needed.append("recovery")
        if len(text) >= 32 and _BASE32_SHAPE.search(text) is not None:  # noqa: PLR2004 - the rule's length
            needed.append("base32")
        if self._patterns:
            needed.append("custom")
        return tuple(needed)

    def is_sensitive_key(self, key: str) -> bool:
        """True when a value under this key is a credential and is masked whole."""
        verdict = self._verdicts.get(key)
        if verdict is None:
            name = _normalise_key(key)
            verdict = (
                name in SENSITIVE_KEYS
                or name in self._extra_keys
                or name.endswith(SENSITIVE_SUFFIXES)
                or name.startswith(SENSITIVE_PREFIXES)
            )
            if len(self._verdicts) < _MAX_REMEMBERED_KEYS:
                self._verdicts[key] = verdict
        return verdict

    def _mask_field(self, key: object, value: Any, depth: int) -> Any:
        if value is None:
            return None  # an absent credential is worth seeing, and is no secret
        if isinstance(key, str) and self.is_sensitive_key(key):
            return MASK
        return self._mask_value(value, depth)

    def _mask_value(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self.mask_text(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth >= MAX_DEPTH:
            return MASK
        if isinstance(value, Mapping):
            return {k: self._mask_field(k, v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return self._mask_sequence(value, depth + 1)
        return self.mask_text(_as_text(value))

    def _mask_sequence(self, items: Iterable[Any], depth: int) -> list[Any] | tuple[Any, ...]:
        items = list(items) if not isinstance(items, list | tuple) else items
        if len(items) == 2 and isinstance(items[0], str) and self.is_sensitive_key(items[0]):  # noqa: PLR2004 - a (name, value) pair, as in headers.items()
            masked: list[Any] = [items[0], MASK if items[1] is not None else None]
        else:
            masked = [self._mask_value(item, depth) for item in items]
        return tuple(masked) if isinstance(items, tuple) else masked

    def _compile(self) -> _Compiled:
        """Every rule's regex by name, in the order they are tried at one position."""
        sources: dict[str, str] = {}
        literals = None
        if self._literals:
            # Longest first: a secret that contains another is masked whole.
            ordered = sorted(self._literals, key=len, reverse=True)
            sources["literal"] = "|".join(re.escape(literal) for literal in ordered)
            literals = re.compile(sources["literal"])
        sources.update(_rules(self._names))
        if self._patterns:
            sources["custom"] = "|".join(self._patterns)
        return _Compiled(sources, literals)


class _Compiled:
    """The rules' regexes, and the combinations of them that texts needed, compiled once each."""

    def __init__(self, sources: dict[str, str], literals: re.Pattern[str] | None) -> None:
        self.sources = sources
        self.literals = literals
        self.everything = self._combine(tuple(sources))
        self._combined: dict[tuple[str, ...], re.Pattern[str]] = {}

    def regex_for(self, names: tuple[str, ...]) -> re.Pattern[str]:
        """One regex of these rules, in their order; all of them past _MAX_COMBINATIONS."""
        regex = self._combined.get(names)
        if regex is None:
            if len(self._combined) >= _MAX_COMBINATIONS:
                return self.everything  # a superset: slower, never wrong
            regex = self._combined[names] = self._combine(names)
        return regex

    def _combine(self, names: tuple[str, ...]) -> re.Pattern[str]:
        return re.compile("|".join(f"(?P<{name}>{self.sources[name]})" for name in names))


def _token_rules_needed(text: str) -> list[str]:
    """The token-shape rules whose marks the text holds, in rule order."""
    needed = []
    if "-----BEGIN" in text:
        needed.append("pem")
    if "eyJ" in text:
        needed.append("jwt")
    lower = text.lower()
    if "otpauth:" in lower:
        needed.append("otpauth")
    if "ert1_" in text:
        needed.append("refresh")
    if "bearer" in lower or "basic" in lower:
        needed.append("scheme")
    return needed


_KEEPS_PREFIX = frozenset({"otpauth", "refresh", "scheme", "quoted", "line", "assign"})


def _replacement(match: re.Match[str]) -> str:
    rule = match.lastgroup or ""
    kept = match.group(f"{rule}_p") if rule in _KEEPS_PREFIX else ""
    if rule == "quoted" and match.group("quoted_q"):
        quote = match.group("quoted_q")
        return f"{kept}{quote}{MASK}{quote}"
    return f"{kept}{MASK}"


def _normalise_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def _text_name(key: str) -> str:
    """A configured key as it may be written in text: "-" and "_" alike."""
    return "[_-]".join(re.escape(part) for part in key.split("_"))


def _as_text(value: object) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not fail the log call (or the request)
        return f"<unprintable {type(value).__name__}>"
