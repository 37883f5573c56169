"""A real `gateway serve` whose session, TOTP, checkpoint and model keys come from `keystore:`
references: it serves, its environment and command line hold no secret, nor do its logs; a
reference that does not resolve refuses the start; an `env:` key stays in /proc/PID/environ,
as docs/security/secret-providers.md warns."""

from __future__ import annotations

import re
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import pyotp
import pytest
from support.identity import PASSWORDS, IdentityGateway, browser_login, cookies_from
from support.stack import GATEWAY, PYTHON, REPO, start_upstream, write_gateway_config

from empsecrets.providers import Keystore
from gateway.identity.accounts import AccountStore
from gateway.identity.mfa import SecretBox, new_sealing_key
from gateway.identity.provider import totp_context
from gateway.identity.sessions import _COOKIE_CONTEXT
from gateway.testing import free_port, running, stop

KEY_NAMES = ("session-key", "totp-key", "audit-checkpoint-key", "model-key")
# The *_file lines write_gateway_config writes, and the references that replace them.
KEY_LINES = {
    "mfa.secret_key_file": 'mfa.secret_key = "keystore:totp-key"',
    "sessions.key_file": 'sessions.key = "keystore:session-key"',
    "checkpoint_key_file": 'checkpoint_key = "keystore:audit-checkpoint-key"',
    "model_key_file": 'model_key = "keystore:model-key"',
}
MARKER = "EMP_TEST_ENVIRON_MARKER"


def use_key_references(config: Path) -> None:
    """Swap the config's key file settings for keystore: references."""
    lines = []
    for line in config.read_text().splitlines():
        setting = line.split(" = ")[0]
        lines.append(KEY_LINES.get(setting, line))
    config.write_text("\n".join(lines) + "\n")


def run(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, "--config", str(config), *args],
        cwd=REPO, capture_output=True, text=True, input=stdin, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A root set up by `gateway setup` with every key in the keystore, the EMP database and
    two users; nothing running."""
    root = tmp_path_factory.mktemp("keyrefs")
    config = write_gateway_config(
        root, https=free_port(), http=free_port(), admin=free_port(),
        upstream_url="http://127.0.0.1:9", jwks_url="http://127.0.0.1:9/jwks.json",
    )  # fmt: skip
    use_key_references(config)
    setup = run(config, "setup")
    assert setup.returncode == 0, setup.stderr
    for name in KEY_NAMES:
        assert f"wrote keystore:{name} (version 1" in setup.stdout
    subprocess.run([PYTHON, "-m", "upstream", "db", "init", "--db", str(root / "emp.duckdb")],
                   check=True, cwd=REPO, capture_output=True)  # fmt: skip
    for user in ("alice", "bob"):
        added = run(config, "users", "add", user, "--role", "reader", "--password-stdin",
                    stdin=PASSWORDS[user] + "\n")  # fmt: skip
        assert added.returncode == 0, added.stderr
    return root


@pytest.fixture
def root(prepared, tmp_path) -> Path:
    """A private copy of the prepared root, with fresh ports, its config pointing into it."""
    copy = tmp_path / "root"
    shutil.copytree(prepared, copy)
    config = copy / "gateway.toml"
    text = config.read_text().replace(str(prepared), str(copy))
    for name in ("https_port", "http_port", "admin_port"):
        text = re.sub(rf"^{name} = \d+$", f"{name} = {free_port()}", text, flags=re.MULTILINE)
    text = text.replace('http://127.0.0.1:9"', f'http://127.0.0.1:{free_port()}"', 1)
    config.write_text(text)
    return copy


def port_of(root: Path, name: str) -> int:
    found = re.search(rf"^{name} = (\d+)$", (root / "gateway.toml").read_text(), re.MULTILINE)
    assert found
    return int(found.group(1))


def upstream_port(root: Path) -> int:
    found = re.search(r'^url = "http://127.0.0.1:(\d+)"$', (root / "gateway.toml").read_text(),
                      re.MULTILINE)  # fmt: skip
    assert found
    return int(found.group(1))


def keystore(root: Path) -> Keystore:
    return Keystore.open(root / "secrets/keystore.json", root / "secrets/keystore.master")


def secret_values(root: Path) -> dict[str, str]:
    """Every secret the gateway holds as text, and the base64 body of the checkpoint key's PEM
    (a PEM's lines could show up one by one)."""
    store = keystore(root)
    values = {name: store.get(name).value for name in KEY_NAMES}
    pem_body = "".join(values["audit-checkpoint-key"].splitlines()[1:-1])
    values["audit-checkpoint-key (PEM body)"] = pem_body
    values["upstream secret"] = (root / "secrets/upstream.secret").read_text().strip()
    return values


def gateway_of(root: Path) -> IdentityGateway:
    return IdentityGateway(root, port_of(root, "https_port"), port_of(root, "admin_port"),
                           root / "gateway.toml")  # fmt: skip


async def enrol_totp(gateway: IdentityGateway, session: aiohttp.ClientSession) -> str:
    """bob enrols TOTP and confirms it (the gateway seals, then opens, his secret)."""
    _, tokens = await gateway.login(session, "bob")
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    async with session.post(gateway.url("/auth/mfa/enroll"), headers=headers) as r:
        assert r.status == 200
        secret: str = (await r.json())["secret"]
    code = {"code": pyotp.TOTP(secret).now()}
    async with session.post(gateway.url("/auth/mfa/confirm"), headers=headers, json=code) as r:
        assert r.status == 200, await r.text()
    return secret


async def test_a_gateway_with_keystore_keys_serves_and_no_secret_is_in_its_environment(root):
    """With every key from the keystore: an API call reaches the EMP service, a browser login
    gets a cookie sealed with the keystore's session key, bob's TOTP secret is sealed with its
    TOTP key, checkpoints verify with its checkpoint key. /proc/PID/environ and cmdline of the
    gateway hold none of the secrets (a marker variable shows the read works), nor do its log,
    its audit trail and its config file."""
    gateway = gateway_of(root)
    secrets = secret_values(root)
    with ExitStack() as processes:
        start_upstream(processes, root, upstream_port(root))
        command = [*GATEWAY, "--config", str(gateway.config_file), "serve"]
        log_file, env = root / "gateway.log", {MARKER: "visible-in-environ"}
        process = processes.enter_context(
            running(command, port=gateway.https_port, log_file=log_file, cwd=REPO, env=env)
        )
        async with gateway.session() as session:
            headers = {"Authorization": f"Bearer {gateway.mint()}"}
            async with session.get(gateway.url("/api/tickets?limit=5"), headers=headers) as r:
                assert r.status == 200, await r.text()
            _, _, response = await browser_login(gateway, session)
            cookie = cookies_from(response)["__Host-emp_session"]
            totp_secret = await enrol_totp(gateway, session)
        environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert f"{MARKER}=visible-in-environ".encode() in environ.split(b"\0")
        for what, value in secrets.items():
            assert value.encode() not in environ, what
            assert value.encode() not in cmdline, what
        stop(process)  # drains the audit queue: the checkpoints are written
    session_box = SecretBox.from_text(secrets["session-key"], "keystore:session-key")
    assert session_box.open(cookie, context=_COOKIE_CONTEXT)
    with AccountStore.open(root / "identity.duckdb") as store:
        sealed = store.get_user("bob").mfa_secret_sealed
    totp_box = SecretBox.from_text(secrets["totp-key"], "keystore:totp-key")
    assert totp_box.open(sealed, context=totp_context("bob")).decode() == totp_secret
    verified = run(gateway.config_file, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "intact" in verified.stdout
    assert not re.search(r" 0 checkpoints", verified.stdout)
    written = [root / "gateway.log", root / "audit.jsonl", root / "decisions.jsonl",
               gateway.config_file]  # fmt: skip
    for path in written:
        text = path.read_text()
        for what, value in secrets.items():
            assert value not in text, f"{what} in {path.name}"


def _delete(name: str):
    def breaks(root: Path) -> None:
        keystore(root).delete(name)

    return breaks


def _garble(name: str):
    def breaks(root: Path) -> None:
        keystore(root).put(name, "no key at all")

    return breaks


def _other_master(root: Path) -> None:
    (root / "secrets/keystore.master").write_bytes(b"\x01" * 32)


def _unset_env(root: Path) -> None:
    config = root / "gateway.toml"
    text = config.read_text().replace('"keystore:session-key"', '"env:EMP_TEST_NEVER_SET"')
    config.write_text(text)


@pytest.mark.parametrize(
    ("break_it", "named"),
    [
        (_delete("session-key"), "identity.sessions.key (keystore:session-key): "),
        (_garble("totp-key"), "identity.mfa.secret_key: keystore:totp-key: sealing key is not base64"),
        (_garble("audit-checkpoint-key"), "audit.checkpoint_key: keystore:audit-checkpoint-key: the audit checkpoint key is not a PEM"),
        (_delete("model-key"), "validation.model_key (keystore:model-key): "),
        (_other_master, "does not open"),
        (_unset_env, "identity.sessions.key (env:EMP_TEST_NEVER_SET): "),
    ],
    ids=["session key missing", "totp key garbled", "checkpoint key garbled", "model key missing",
         "another master key", "env variable unset"],
)  # fmt: skip
def test_a_key_that_does_not_resolve_refuses_the_start(root, break_it, named):
    """`gateway serve` exits 2 before listening, naming the setting and reference; no value,
    no traceback."""
    values = secret_values(root)
    break_it(root)
    refused = run(root / "gateway.toml", "serve")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert named in refused.stderr
    assert "Traceback" not in refused.stderr
    for what, value in values.items():
        assert value not in refused.stdout + refused.stderr, what


def test_an_env_key_serves_but_stays_in_proc_environ_as_documented(root):
    """An env: session key works, and the gateway deletes the variable from its os.environ;
    /proc/PID/environ still shows the environment the process started with. This is why env:
    is the weakest provider."""
    config = root / "gateway.toml"
    config.write_text(
        config.read_text().replace('"keystore:session-key"', '"env:EMP_TEST_SESSION_KEY"')
    )
    value = new_sealing_key()
    gateway = gateway_of(root)
    command = [*GATEWAY, "--config", str(config), "serve"]
    with running(command, port=gateway.https_port, log_file=root / "gateway.log", cwd=REPO,
                 env={"EMP_TEST_SESSION_KEY": value}) as process:  # fmt: skip
        environ = Path(f"/proc/{process.pid}/environ").read_bytes()
    assert f"EMP_TEST_SESSION_KEY={value}".encode() in environ.split(b"\0")
    assert value not in (root / "gateway.log").read_text()
