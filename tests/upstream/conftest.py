"""Fixtures for the EMP service: a secret, a migrated DuckDB file, the app in-process, or
the real ``python -m upstream serve`` process on a free port (always stopped)."""

import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from upstream.app import create_app
from upstream.cli import main
from upstream.config import DatabaseConfig, TrustConfig, UpstreamConfig
from upstream.testing import UpstreamProcess, run_upstream


@pytest.fixture
def secret() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def secret_file(tmp_path: Path, secret: str) -> Path:
    path = tmp_path / "secrets" / "upstream.secret"
    path.parent.mkdir()
    path.write_text(secret + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One DuckDB file migrated through the real CLI, copied by each test that needs one."""
    path = tmp_path_factory.mktemp("template") / "emp.duckdb"
    assert main(["db", "init", "--db", str(path)]) == 0
    return path


@pytest.fixture
def db_path(tmp_path: Path, migrated_template: Path) -> Path:
    """A private, fully migrated DuckDB file, with its keystore (the data key ring) beside it."""
    path = tmp_path / "var" / "emp.duckdb"
    path.parent.mkdir()
    shutil.copyfile(migrated_template, path)
    shutil.copytree(migrated_template.parent / "secrets", path.parent / "secrets")
    return path


@pytest.fixture
def config_file(tmp_path: Path, db_path: Path, secret_file: Path) -> Path:
    path = tmp_path / "upstream.toml"
    path.write_text(
        f'[database]\npath = "{db_path}"\n[trust]\nsecret_file = "{secret_file}"\n',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def config(db_path: Path, secret_file: Path) -> UpstreamConfig:
    return UpstreamConfig(
        database=DatabaseConfig(path=db_path), trust=TrustConfig(secret_file=secret_file)
    )


@pytest.fixture
def subject() -> str:
    return "alice@example.com"


@pytest.fixture
def request_id() -> str:
    return "req-0001"


@pytest.fixture
def gateway_headers(secret: str, subject: str, request_id: str) -> dict[str, str]:
    """What the gateway sends on every forwarded request."""
    return {
        "X-Gateway-Secret": secret,
        "X-Gateway-Subject": subject,
        "X-Gateway-Roles": "admin,agent",
        "X-Request-Id": request_id,
    }


@dataclass
class Api:
    """The in-process app, called as the gateway would call it."""

    client: TestClient  # type: ignore[type-arg]
    headers: dict[str, str]

    async def call(self, method: str, path: str, **kwargs: object) -> ClientResponse:
        headers = {**self.headers, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def json(self, method: str, path: str, status: int, **kwargs: object) -> object:
        """Call, assert the status, and return the JSON body."""
        response = await self.call(method, path, **kwargs)
        body = await response.json() if response.status != 204 else None
        assert response.status == status, body
        return body

    async def create(self, resource: str, body: dict[str, object]) -> dict[str, object]:
        created = await self.json("POST", f"/api/{resource}", 201, json=body)
        assert isinstance(created, dict)
        return created


@pytest.fixture
async def client(aiohttp_client, config: UpstreamConfig) -> TestClient:  # type: ignore[type-arg]
    return await aiohttp_client(create_app(config))


@pytest.fixture
def api(client, gateway_headers: dict[str, str]) -> Api:
    return Api(client=client, headers=gateway_headers)


@pytest.fixture
def served(tmp_path: Path, config_file: Path) -> Iterator[UpstreamProcess]:
    """The real ``python -m upstream serve`` on a free port, stopped after the test."""
    with run_upstream(config_file=config_file, log=tmp_path / "upstream.log") as service:
        yield service
