"""Typed, frozen gateway configuration loaded once from TOML and validated at start.

An unknown key, a bad value or a missing file stops the start with a message naming the key:
a typo must never silently disable a control. Nothing else in the gateway reads os.environ.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

DEFAULT_CONFIG = Path("config/gateway.toml")
ENV_PREFIX = "GATEWAY__"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and what to do."""


@dataclass(frozen=True)
class ServerConfig:
    """Listening sockets."""

    host: str = "127.0.0.1"
    https_port: int = 8443
    http_port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9464
    public_name: str = "localhost"
    environment: Literal["development", "production"] = "development"
    # `serve --workers N`: worker 0's audit-search socket and the multiprocess metrics files.
    run_dir: Path = Path("var/run")


@dataclass(frozen=True)
class TlsConfig:
    """The server certificate; generate dev ones with `gateway certs dev`.

    enabled = false makes the API listen in plain HTTP (behind a TLS-terminating proxy): in
    production `gateway serve` then refuses to start unless given --allow-plaintext, and warns
    at every start either way (docs/security/tls.md).
    """

    enabled: bool = True
    cert_file: Path = Path("var/certs/server.pem")
    key_file: Path = Path("var/certs/server-key.pem")
    ca_file: Path = Path("var/certs/ca.pem")
    ca_key_file: Path = Path("var/certs/ca-key.pem")


@dataclass(frozen=True)
class UpstreamConfig:
    """Where the EMP service is and how the gateway proves itself to it."""

    url: str = "http://127.0.0.1:8081"
    secret_file: Path = Path("var/secrets/upstream.secret")
    connect_timeout_seconds: float = 2.0
    read_timeout_seconds: float = 30.0
    pool_size: int = 256
    health_path: str = "/healthz"


@dataclass(frozen=True)
class LimitsConfig:
    """Request size limit; a route's own max_body_bytes, when set, replaces it for that route."""

    max_body_bytes: int = 1_048_576
    max_json_depth: int = 32  # arrays and objects nested deeper are refused before any check


@dataclass(frozen=True)
class IssuerConfig:
    """A trusted external token issuer (an OIDC provider): its tokens are verified with its JWKS.

    jwks_uri empty: found by OIDC discovery at {issuer}/.well-known/openid-configuration.
    role_map entries are "external=role" (e.g. "emp-admins=admin"); when any is given, only
    mapped values become roles, so an IdP's group names never grant anything by accident.
    """

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str = ""
    roles_claim: str = "roles"
    role_map: tuple[str, ...] = ()
    ca_file: Path | None = None


@dataclass(frozen=True)
class BuiltinIssuerConfig:
    """The gateway's built-in issuer: keys in key_dir, JWKS at /.well-known/jwks.json."""

    enabled: bool = True
    issuer: str = "https://localhost:8443"
    audience: str = "emp-api"
    key_dir: Path = Path("var/keys")
    algorithm: Literal["EdDSA", "ES256"] = "EdDSA"
    default_ttl_seconds: int = 900  # access tokens: the token endpoint and `token mint`
    max_ttl_seconds: int = 86_400  # the longest `token mint --ttl`; retired keys live this long


@dataclass(frozen=True)
class AuthnConfig:
    """Bearer-token verification."""

    leeway_seconds: int = 30
    jwks_cache_seconds: int = 300
    jwks_refetch_cooldown_seconds: int = 30
    jwks_fetch_timeout_seconds: float = 5.0
    max_token_bytes: int = 8192
    verified_cache_size: int = 10_000
    verified_cache_seconds: int = 60
    allowed_algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    issuers: tuple[IssuerConfig, ...] = ()


@dataclass(frozen=True)
class PasswordConfig:
    """argon2id parameters (OWASP: 19 MiB, t=2, p=1) and the rules for new passwords."""

    time_cost: int = 2
    memory_kib: int = 19_456
    parallelism: int = 1
    min_length: int = 12


@dataclass(frozen=True)
class TokenConfig:
    """Refresh tokens and sessions of the built-in issuer (access token TTL: issuer.*)."""

    refresh_ttl_seconds: int = 28_800  # one refresh token's life; each use rotates it
    session_ttl_seconds: int = 43_200  # a login's whole life (refresh family, browser cookie)


@dataclass(frozen=True)
class MfaConfig:
    """TOTP second factor: enforcement is off unless `enforced`; then for enforced_roles."""

    enforced: bool = False
    enforced_roles: tuple[str, ...] = ("admin",)
    issuer_name: str = "EMP gateway"  # the label authenticator apps show
    # The key that seals TOTP secrets: a secret reference. secret_key_file is the older
    # spelling of secret_key = "file:PATH"; set one of them, not both.
    secret_key: str | None = None
    secret_key_file: Path | None = None

    @property
    def secret_key_reference(self) -> str:
        """Where the TOTP sealing key comes from: secret_key, secret_key_file, or the keystore."""
        return _key_reference(self.secret_key, self.secret_key_file, "keystore:totp-key")


@dataclass(frozen=True)
class LoginLimitConfig:
    """Brute-force limits (the `limits` library's notation), checked before any password."""

    per_ip: tuple[str, ...] = ("30/minute", "300/hour")
    per_user_ip_failures: tuple[str, ...] = ("5/minute", "20/hour", "100/day")
    per_user_failures: tuple[str, ...] = ("100/hour",)


@dataclass(frozen=True)
class SessionConfig:
    """The browser session cookie (encrypted, HttpOnly, Secure, SameSite=Strict)."""

    cookie_name: str = "__Host-emp_session"
    # The key that seals the cookie: a secret reference; key_file is the older "file:PATH".
    key: str | None = None
    key_file: Path | None = None
    # How often a session's roles and status are compared with the account store: a disabled
    # user's browser session ends within this many seconds.
    revalidate_seconds: float = 60.0

    @property
    def key_reference(self) -> str:
        """Where the cookie sealing key comes from: key, key_file, or the keystore."""
        return _key_reference(self.key, self.key_file, "keystore:session-key")


@dataclass(frozen=True)
class IdentityConfig:
    """The built-in identity provider: accounts, logins, MFA, sessions, brute-force limits.

    state_url holds what every worker must share (revoked token ids, refresh families, MFA
    replay guards, login counters): "memory://" for one process, "redis://host:port/db" for many.
    """

    enabled: bool = True
    db_path: Path = Path("var/identity.duckdb")
    state_url: str = "memory://"
    passwords: PasswordConfig = field(default_factory=PasswordConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    mfa: MfaConfig = field(default_factory=MfaConfig)
    login_limits: LoginLimitConfig = field(default_factory=LoginLimitConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)


@dataclass(frozen=True)
class PolicyConfig:
    """Where the Rego lives and what to ask it."""

    dir: Path = Path("policies")
    entrypoint: str = "gateway/authz/decision"
    eval_budget_ms: float = 50.0
    # Decisions remembered per revision by exact input; 0 disables. Policies that call
    # non-deterministic builtins (time.now_ns, http.send, ...) are never memoised.
    decision_memo_size: int = 4096
    # "dry-run": a deny is computed, logged and audited as "would deny", and the request goes
    # on. The feature flag against over-blocking; per route with dry_run_routes, or per policy
    # with a `"dry_run": true` in the decision. Default: enforce.
    mode: Literal["enforce", "dry-run"] = "enforce"
    dry_run_routes: tuple[str, ...] = ()
    # Reload on a change under dir (SIGHUP always reloads); each new revision is tested first.
    watch: bool = True
    reload_test_timeout_seconds: float = 120.0
    # "opa-server": decisions come from an OPA server's Data API (a sidecar) instead of the
    # embedded engine; a timeout or any failure of it is a deny (authz.engine_error).
    engine: Literal["embedded", "opa-server"] = "embedded"
    opa_url: str = ""  # https, or http to a loopback host only
    opa_timeout_ms: float = 25.0  # at most eval_budget_ms: a later answer is thrown away anyway
    opa_pool_size: int = 32
    opa_revision_label: str = "opa-server"  # the revision when OPA reports no bundle revision


@dataclass(frozen=True)
class DecisionLogConfig:
    """The decision log (OPA's decision-log event shape), read back by `policy replay`.

    erase removes and mask replaces ("**REDACTED**") the input fields at these JSON pointers,
    e.g. "/input/request/remote_addr"; credential headers are always erased.
    """

    enabled: bool = True
    path: Path = Path("var/decisions.jsonl")
    erase: tuple[str, ...] = ()
    # The EMP service seals employees' emails at rest; a ?email= lookup must not leave one here.
    mask: tuple[str, ...] = ("/input/request/query/email",)


@dataclass(frozen=True)
class AuditConfig:
    """Where audit events go: JSON lines at once, DuckDB in batches off the event loop."""

    jsonl_path: str = "var/audit.jsonl"
    db_path: Path = Path("var/audit.duckdb")
    # DuckDB's cost is per statement: at 0.1 s a few hundred req/s made batches of ~40 rows and
    # the inserts took a third of a core. The JSON line is written at once either way.
    flush_interval_seconds: float = 0.5
    batch_size: int = 2000
    # Ed25519 key that signs the hash chain's checkpoints (gateway/auditchain.py); made by setup.
    # A secret reference; checkpoint_key_file is the older spelling of "file:PATH".
    checkpoint_key: str | None = None
    checkpoint_key_file: Path | None = None

    @property
    def checkpoint_key_reference(self) -> str:
        """Where the checkpoint key comes from: checkpoint_key, its _file, or the keystore."""
        return _key_reference(
            self.checkpoint_key, self.checkpoint_key_file, "keystore:audit-checkpoint-key"
        )


@dataclass(frozen=True)
class SiemConfig:
    """Audit events shipped to a SIEM as RFC 5424 syslog over TLS (docs/observability.md).

    Plain TCP is for a loopback relay only, unless allow_plaintext says otherwise: the audit
    trail names users, routes and addresses. Past memory_buffer events wait in spool_dir.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 6514  # RFC 5425's syslog over TLS
    transport: Literal["tcp", "tls"] = "tls"
    allow_plaintext: bool = False  # transport "tcp" to a host that is not loopback
    ca_file: Path | None = None  # the CA of the SIEM's certificate; None: the system CAs
    server_name: str = ""  # the name the certificate must carry; empty: host
    client_cert_file: Path | None = None  # mutual TLS, with client_key_file
    client_key_file: Path | None = None
    app_name: str = "emp-gateway"
    hostname: str = ""  # empty: this machine's name
    facility: int = 13  # log audit (RFC 5424 table 1)
    memory_buffer: int = 10_000  # events; past it they go to the spool
    spool_dir: Path = Path("var/siem-spool")  # one per gateway process
    spool_max_bytes: int = 1_073_741_824  # past it, events wait in memory (never dropped)
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    connect_timeout_seconds: float = 5.0
    send_timeout_seconds: float = 30.0  # a SIEM that takes no data this long is reconnected
    # Syslog has no application acknowledgement: an event is forgotten once the SIEM's TCP
    # acknowledged it and the connection stayed open this long (a SIEM that stops with our
    # bytes unread resets the connection, and then they are sent again).
    delivery_grace_seconds: float = 1.0


@dataclass(frozen=True)
class ActivityConfig:
    """The activity anomaly job over the audit store (gateway/activity.py)."""

    enabled: bool = True
    interval_seconds: float = 300.0
    window_minutes: int = 60
    min_events: int = 20  # an entity with fewer events in the window is not judged
    min_entities: int = 5  # fewer entities of a type: nobody is called unusual
    threshold: float = 5.0  # robust z-score
    off_hours_start: int = 22  # UTC hour; off hours run from start to end, across midnight
    off_hours_end: int = 6


@dataclass(frozen=True)
class RoutesConfig:
    """The route table and its request schemas."""

    file: Path = Path("config/routes.toml")
    schema_dir: Path = Path("config/schemas")


@dataclass(frozen=True)
class ValidationConfig:
    """Ingest streams (docs/validation.md): per-stream checks and the outlier models."""

    streams_file: Path = Path("config/streams.toml")
    model_dir: Path = Path("var/models")
    # The HMAC key that signs model files: a secret reference; model_key_file is "file:PATH".
    model_key: str | None = None
    model_key_file: Path | None = None
    model_check_seconds: float = 5.0  # how often a stream in use looks for a newer model

    @property
    def model_key_reference(self) -> str:
        """Where the model signing key comes from: model_key, model_key_file, or the keystore."""
        return _key_reference(self.model_key, self.model_key_file, "keystore:model-key")


@dataclass(frozen=True)
class LoggingConfig:
    """Operational logs (the audit trail is separate), masked before they are written.

    format "json" is ECS (Elastic Common Schema) JSON, one object a line. destination "file"
    rotates at file_max_bytes; "syslog" is a unix socket path or "host:port" (UDP).
    mask_keys and mask_patterns add to the built-in masking rules (docs/observability.md).
    """

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    destination: Literal["stderr", "stdout", "file", "syslog"] = "stderr"
    file_path: Path = Path("var/log/gateway.log")
    file_max_bytes: int = 10_485_760
    file_backups: int = 5
    syslog_address: str = "/dev/log"
    mask_keys: tuple[str, ...] = ()  # key names whose values are masked whole, e.g. "x-tenant-key"
    mask_patterns: tuple[str, ...] = ()  # regexes masked inside any text, e.g. e-mail addresses


@dataclass(frozen=True)
class SecretAgeLimit:
    """One secret's own age limit.

    `secret` is a name `gateway secrets check` lists, or a prefix ending in "*"
    (e.g. "client_secret:*").
    """

    secret: str
    max_age_days: float


@dataclass(frozen=True)
class SecretsConfig:
    """Age limits of the secrets the gateway holds (`gateway secrets check`, the age metrics).

    A secret past its limit is overdue (the check exits 1, an alert fires); within due_days of
    it, due. A certificate is expiring when fewer than certificate_min_days remain.
    """

    max_age_days: float = 90.0
    due_days: float = 14.0
    certificate_min_days: float = 21.0
    limits: tuple[SecretAgeLimit, ...] = ()
    refresh_seconds: float = 60.0  # how often the running gateway re-reads the ages
    # The encrypted local keystore (`keystore:NAME` references, `gateway secrets keystore`).
    keystore_file: Path = Path("var/secrets/keystore.json")
    master_key_file: Path = Path("var/secrets/keystore.master")
    # Vault, for `vault:MOUNT/PATH#FIELD` references; an empty address: no Vault.
    vault_address: str = ""  # https://vault.example:8200 (plain http only to a loopback host)
    vault_token: str = ""  # a reference to the token (file: or keystore:), never the token
    vault_ca_file: Path | None = None  # None: the system's trust store
    vault_namespace: str = ""


@dataclass(frozen=True)
class EncryptionConfig:
    """The data key ring that encrypts the audit store's sensitive columns (gateway/auditcrypt.py).

    `data_keys` is a secret reference to the ring's JSON (`keystore:NAME`, `file:PATH`, ...),
    never the keys. keystore_file and master_key_file say where `keystore:` references are
    read; unset, the [secrets] keystore (a keystore of its own keeps the data keys apart).
    """

    data_keys: str = "keystore:gateway-data-keys"
    keystore_file: Path | None = None
    master_key_file: Path | None = None


@dataclass(frozen=True)
class RetentionConfig:
    """How long the gateway keeps its records before archiving them (docs/security/retention.md).

    Rows older than a window are exported to Parquet under archive_dir, verified, and only then
    deleted. A window is whole days, at least 1: no value means "delete everything". The EMP
    service's tables have their windows in its own config (config/upstream.toml); with
    upstream = true each run asks it to archive them.
    """

    enabled: bool = True  # the periodic run in the gateway; `gateway archive run` works either way
    interval_seconds: float = 86_400.0
    start_delay_seconds: float = 300.0  # the first run after a start (deploys restart it daily)
    archive_dir: Path = Path("var/archive")
    audit_days: int = 365
    decision_log_days: int = 90
    upstream: bool = True
    upstream_timeout_seconds: float = 900.0


@dataclass(frozen=True)
class ConsoleConfig:
    """The admin console under /console and its Content-Security-Policy (docs/console.md).

    csp_mode "enforce" blocks what the policy forbids; "report-only" only reports it (to
    /console/csp-report, counted and audited), and in production needs
    allow_report_only_in_production. report_limit bounds the reports per client address.
    """

    enabled: bool = True
    csp_mode: Literal["enforce", "report-only"] = "enforce"
    allow_report_only_in_production: bool = False
    report_max_bytes: int = 16_384
    report_limit: str = "60/minute"  # the `limits` library's notation, per client address
    page_size: int = 50  # audit events per console page


@dataclass(frozen=True)
class GatewayConfig:
    """The whole gateway configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    authn: AuthnConfig = field(default_factory=AuthnConfig)
    issuer: BuiltinIssuerConfig = field(default_factory=BuiltinIssuerConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    decision_log: DecisionLogConfig = field(default_factory=DecisionLogConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    siem: SiemConfig = field(default_factory=SiemConfig)
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    activity: ActivityConfig = field(default_factory=ActivityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)


T = TypeVar("T")


def load_config(
    path: Path | None = None, env: typing.Mapping[str, str] | None = None
) -> GatewayConfig:
    """Load, override from the environment, validate and freeze the gateway configuration.

    Environment overrides are `GATEWAY__SECTION__KEY=value` (TOML syntax for the value, bare
    strings allowed), e.g. `GATEWAY__SERVER__HTTPS_PORT=9443`.
    """
    path = path or DEFAULT_CONFIG
    raw = read_toml(path, "config file")
    _apply_env(raw, os.environ if env is None else env)
    config = _build(GatewayConfig, raw, "")
    _check(config)
    return config


def read_toml(
    path: Path, what: str, *, error: type[Exception] = ConfigError, hint: str = ""
) -> dict[str, Any]:
    """A TOML file's tables; missing or malformed raises `error` naming the file and `what`."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found{hint}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def _apply_env(raw: dict[str, Any], env: typing.Mapping[str, str]) -> None:
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        target = raw
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        target[keys[-1]] = value


def _build(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]!s} (known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        key = f"{where}{name}"
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(options[0], value, key)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        item = get_args(hint)[0]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty path string")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def _check(config: GatewayConfig) -> None:
    """Cross-field checks that a type cannot express."""
    _check_server(config)
    _check_authn(config)
    if config.limits.max_body_bytes <= 0:
        raise ConfigError("limits.max_body_bytes must be positive")
    if not 2 <= config.limits.max_json_depth <= 256:  # noqa: PLR2004 - sane nesting bounds
        raise ConfigError("limits.max_json_depth must be from 2 to 256")
    if config.validation.model_check_seconds <= 0:
        raise ConfigError("validation.model_check_seconds must be positive")
    activity = config.activity
    if activity.interval_seconds <= 0 or activity.window_minutes < 1 or activity.threshold <= 0:
        raise ConfigError("activity: interval_seconds, window_minutes, threshold must be positive")
    if not (0 <= activity.off_hours_start < 24 and 0 <= activity.off_hours_end < 24):  # noqa: PLR2004
        raise ConfigError("activity: off_hours_start and off_hours_end are hours, 0 to 23")
    dev = config.issuer
    if not 0 < dev.default_ttl_seconds <= dev.max_ttl_seconds:
        raise ConfigError("issuer.default_ttl_seconds must be within 1..max_ttl_seconds")
    _check_identity(config)
    _check_policy(config)
    _check_siem(config.siem)
    _check_logging(config.logging)
    _check_secrets(config.secrets)
    _check_key_references(config)
    _check_retention(config.retention)
    _check_encryption(config)
    _check_console(config)
    for pointer in (*config.decision_log.erase, *config.decision_log.mask):
        if not pointer.startswith("/input/"):
            raise ConfigError(f"decision_log: {pointer!r} must be a JSON pointer into /input/")


def _key_reference(reference: str | None, path: Path | None, default: str) -> str:
    """The secret reference a key setting means: the reference, else the path, else default."""
    if reference is not None:
        return reference
    return default if path is None else f"file:{path}"


def _check_key_references(config: GatewayConfig) -> None:
    """Each key setting is a well-formed reference, set one way only; vault: needs a Vault."""
    identity, secrets = config.identity, config.secrets
    settings = (
        ("identity.mfa.secret_key", identity.mfa.secret_key, identity.mfa.secret_key_file),
        ("identity.sessions.key", identity.sessions.key, identity.sessions.key_file),
        ("audit.checkpoint_key", config.audit.checkpoint_key, config.audit.checkpoint_key_file),
        ("validation.model_key", config.validation.model_key, config.validation.model_key_file),
    )
    for name, reference, path in settings:
        if reference is not None and path is not None:
            raise ConfigError(
                f"{name} and {name}_file are both set: keep {name} (a secret reference; "
                f'{name}_file = "PATH" is the older spelling of {name} = "file:PATH")'
            )
        if reference is not None:
            _check_reference(name, reference, vault=bool(secrets.vault_address))
    if bool(secrets.vault_address) != bool(secrets.vault_token):
        raise ConfigError("secrets.vault_address and secrets.vault_token go together")
    if secrets.vault_token:
        _check_reference("secrets.vault_token", secrets.vault_token, vault=False)


def _check_reference(name: str, reference: str, *, vault: bool) -> None:
    from empsecrets.providers import SecretReferenceError, VaultReference, parse_reference  # noqa: PLC0415 - config stays light

    try:
        parsed = parse_reference(reference)
    except SecretReferenceError as exc:  # its message never quotes the text: it may be a secret
        raise ConfigError(f"{name}: {exc}") from None
    if isinstance(parsed, VaultReference) and not vault:
        if name == "secrets.vault_token":
            raise ConfigError(f"{name}: the Vault token cannot come from Vault; use file:")
        raise ConfigError(f"{name}: a vault: reference needs secrets.vault_address and vault_token")


def _check_secrets(secrets: SecretsConfig) -> None:
    if secrets.max_age_days <= 0 or secrets.refresh_seconds <= 0:
        raise ConfigError("secrets.max_age_days and secrets.refresh_seconds must be positive")
    if secrets.due_days < 0 or secrets.certificate_min_days < 0:
        raise ConfigError("secrets.due_days and secrets.certificate_min_days must be >= 0")
    seen: set[str] = set()
    for limit in secrets.limits:
        if limit.max_age_days <= 0:
            raise ConfigError(f"secrets.limits: {limit.secret!r}: max_age_days must be positive")
        if not limit.secret or "*" in limit.secret[:-1] or limit.secret in seen:
            raise ConfigError(f"secrets.limits: {limit.secret!r}: empty, duplicate or a "
                              '"*" that is not at the end')  # fmt: skip
        seen.add(limit.secret)


def _check_console(config: GatewayConfig) -> None:
    import limits  # noqa: PLC0415 - only to read the notation; config stays light

    console = config.console
    production = config.server.environment == "production"
    if (
        console.csp_mode == "report-only"
        and production
        and not console.allow_report_only_in_production
    ):
        # Report-only blocks nothing: in production it must be a deliberate, visible choice.
        raise ConfigError(
            'console.csp_mode = "report-only" in production needs '
            "console.allow_report_only_in_production = true"
        )
    if not 1024 <= console.report_max_bytes <= 1_048_576:  # noqa: PLR2004 - one report .. a flood
        raise ConfigError("console.report_max_bytes must be from 1024 to 1048576")
    if not 1 <= console.page_size <= 500:  # noqa: PLR2004 - a page a browser renders quickly
        raise ConfigError("console.page_size must be from 1 to 500")
    try:
        limits.parse(console.report_limit)
    except ValueError:
        raise ConfigError(
            f'console.report_limit: {console.report_limit!r} is not like "60/minute"'
        ) from None


MAX_RETENTION_DAYS = 36_500  # a century: beyond it a typo, not a policy


def _check_encryption(config: GatewayConfig) -> None:
    encryption = config.encryption
    _check_reference(
        "encryption.data_keys", encryption.data_keys, vault=bool(config.secrets.vault_address)
    )
    if (encryption.keystore_file is None) != (encryption.master_key_file is None):
        raise ConfigError("encryption.keystore_file and encryption.master_key_file go together")


def _check_retention(retention: RetentionConfig) -> None:
    for name in ("audit_days", "decision_log_days"):
        days = getattr(retention, name)
        if not 1 <= days <= MAX_RETENTION_DAYS:
            # 0 would archive (and delete) every row at once: never what a typo should do.
            raise ConfigError(
                f"retention.{name} = {days}: a window is 1 to {MAX_RETENTION_DAYS} days; "
                "to stop the periodic run set retention.enabled = false"
            )
    if retention.interval_seconds < 60 or retention.start_delay_seconds < 0:  # noqa: PLR2004
        raise ConfigError(
            "retention.interval_seconds must be at least 60 and start_delay_seconds 0 or more"
        )
    if retention.upstream_timeout_seconds <= 0:
        raise ConfigError("retention.upstream_timeout_seconds must be positive")


def _check_logging(logging: LoggingConfig) -> None:
    from gateway.logs import syslog_address  # noqa: PLC0415 - logs imports structlog; config stays light
    from gateway.masking import compile_pattern  # noqa: PLC0415 - beside it

    if logging.file_max_bytes < 4096:  # noqa: PLR2004 - a few lines at least, or it rotates forever
        raise ConfigError("logging.file_max_bytes must be at least 4096")
    if not 1 <= logging.file_backups <= 1000:  # noqa: PLR2004 - 0 would never rotate: unbounded
        raise ConfigError("logging.file_backups must be from 1 to 1000")
    try:
        syslog_address(logging.syslog_address)
    except ValueError as exc:
        raise ConfigError(f"logging.syslog_address: {exc}") from None
    for i, key in enumerate(logging.mask_keys):
        if not key.strip():
            raise ConfigError(f"logging.mask_keys[{i}] must not be empty")
    for i, pattern in enumerate(logging.mask_patterns):
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise ConfigError(f"logging.mask_patterns[{i}]: {exc}") from None


def _check_policy(config: GatewayConfig) -> None:
    from gateway.oidc import is_safe_url  # noqa: PLC0415 - oidc imports aiohttp; config stays light

    policy = config.policy
    if policy.engine == "embedded":
        if policy.opa_url:
            raise ConfigError('policy.opa_url is set but policy.engine is "embedded": set both')
        return
    if not is_safe_url(policy.opa_url):
        raise ConfigError("policy.opa_url must be https (or http to a loopback host)")
    if not 0 < policy.opa_timeout_ms <= policy.eval_budget_ms:
        raise ConfigError("policy.opa_timeout_ms must be within 0..eval_budget_ms")
    if policy.opa_pool_size < 1:
        raise ConfigError("policy.opa_pool_size must be at least 1")
    if not policy.opa_revision_label:
        raise ConfigError("policy.opa_revision_label must not be empty")


def _check_siem(siem: SiemConfig) -> None:
    import ipaddress  # noqa: PLC0415 - only this check needs it

    if not 0 < siem.port < 65536:  # noqa: PLR2004 - the TCP port range
        raise ConfigError(f"siem.port {siem.port} is outside 1..65535")
    if not siem.host:
        raise ConfigError("siem.host must not be empty")
    try:
        loopback = siem.host == "localhost" or ipaddress.ip_address(siem.host).is_loopback
    except ValueError:
        loopback = False
    if siem.transport == "tcp":
        if not loopback and not siem.allow_plaintext:
            # The audit trail names users, routes and client addresses: not in clear on a network.
            raise ConfigError(
                f'siem.transport = "tcp" would send the audit trail in clear to {siem.host}: '
                'use transport = "tls", or set siem.allow_plaintext = true'
            )
        tls_only = ("ca_file", "server_name", "client_cert_file", "client_key_file")
        for name in tls_only:
            if getattr(siem, name):
                raise ConfigError(f'siem.{name} is set but siem.transport is "tcp": use "tls"')
    elif siem.allow_plaintext:
        raise ConfigError('siem.allow_plaintext applies to transport = "tcp" only')
    if (siem.client_cert_file is None) != (siem.client_key_file is None):
        raise ConfigError("siem.client_cert_file and siem.client_key_file go together")
    _check_siem_names(siem)
    _check_siem_numbers(siem)


def _check_siem_names(siem: SiemConfig) -> None:
    # RFC 5424 section 6.2: header fields are printable US-ASCII; say so rather than rewrite.
    for name, limit in (("app_name", 48), ("hostname", 255)):
        value = getattr(siem, name)
        if len(value) > limit or not all("!" <= char <= "~" for char in value):
            raise ConfigError(f"siem.{name} must be at most {limit} printable ASCII characters")
    if not siem.app_name:
        raise ConfigError("siem.app_name must not be empty")


def _check_siem_numbers(siem: SiemConfig) -> None:
    if not 0 <= siem.facility <= 23:  # noqa: PLR2004 - RFC 5424 table 1
        raise ConfigError("siem.facility must be from 0 to 23 (13: log audit)")
    if siem.memory_buffer < 1 or siem.spool_max_bytes < 1:
        raise ConfigError("siem.memory_buffer and siem.spool_max_bytes must be positive")
    if not 0 < siem.retry_initial_seconds <= siem.retry_max_seconds:
        raise ConfigError("siem.retry_initial_seconds must be within 0..retry_max_seconds")
    if siem.connect_timeout_seconds <= 0 or siem.send_timeout_seconds <= 0:
        raise ConfigError("siem.connect_timeout_seconds and send_timeout_seconds must be positive")
    if not 0 <= siem.delivery_grace_seconds < siem.send_timeout_seconds:
        raise ConfigError("siem.delivery_grace_seconds must be within 0..send_timeout_seconds")


def _check_server(config: GatewayConfig) -> None:
    ports = [config.server.https_port, config.server.admin_port]
    if config.server.http_port:
        ports.append(config.server.http_port)
    if len(set(ports)) != len(ports):
        raise ConfigError("server: https_port, http_port and admin_port must differ")
    for port in ports:
        if not 0 < port < 65536:  # noqa: PLR2004 - the TCP port range
            raise ConfigError(f"server: port {port} is outside 1..65535")


def _check_authn(config: GatewayConfig) -> None:
    from gateway.oidc import is_safe_url  # noqa: PLC0415 - oidc imports aiohttp; config stays light

    allowed = {"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"}
    bad = set(config.authn.allowed_algorithms) - allowed
    if bad:
        # Symmetric and 'none' algorithms are never acceptable for tokens from a JWKS.
        raise ConfigError(
            f"authn.allowed_algorithms: {sorted(bad)} not allowed; use {sorted(allowed)}"
        )
    if not config.authn.issuers and not config.issuer.enabled:
        raise ConfigError("authn.issuers is empty and issuer is disabled: no token could pass")
    if sum(i.ca_file is not None for i in config.authn.issuers) > 1:
        raise ConfigError("authn.issuers: at most one issuer may set ca_file")
    for i, issuer in enumerate(config.authn.issuers):
        if not issuer.audiences:
            raise ConfigError(f"authn.issuers[{i}].audiences must name at least one audience")
        for name in ("issuer", "jwks_uri"):
            url = getattr(issuer, name)
            if (name == "issuer" or url) and not is_safe_url(url):
                raise ConfigError(f"authn.issuers[{i}].{name} must be https (or loopback http)")
        for entry in issuer.role_map:
            external, sep, role = entry.rpartition("=")  # LDAP group names contain '='
            if not sep or not external.strip() or not role.strip() or "," in role:
                raise ConfigError(f"authn.issuers[{i}].role_map: {entry!r} is not external=role")


def _check_identity(config: GatewayConfig) -> None:
    identity = config.identity
    if identity.enabled and not config.issuer.enabled:
        raise ConfigError("identity.enabled needs issuer.enabled: logins issue its tokens")
    if not identity.state_url.startswith(("memory://", "redis://", "rediss://")):
        raise ConfigError("identity.state_url must be memory:// or redis:// (or rediss://)")
    passwords = identity.passwords
    if passwords.time_cost < 1 or passwords.memory_kib < 8 * passwords.parallelism:
        raise ConfigError("identity.passwords: time_cost >= 1 and memory_kib >= 8 * parallelism")
    if passwords.min_length < 8:  # noqa: PLR2004 - NIST SP 800-63B's floor
        raise ConfigError("identity.passwords.min_length must be at least 8")
    tokens = identity.tokens
    if not 0 < tokens.refresh_ttl_seconds <= tokens.session_ttl_seconds:
        raise ConfigError("identity.tokens: refresh_ttl_seconds must be within 1..session_ttl")
    if identity.sessions.revalidate_seconds < 0:
        raise ConfigError("identity.sessions.revalidate_seconds must be 0 or more")
    cookie = identity.sessions.cookie_name
    if not cookie.startswith("__Host-"):
        # The __Host- prefix makes the browser insist on Secure, Path=/ and no Domain.
        raise ConfigError("identity.sessions.cookie_name must start with __Host-")
