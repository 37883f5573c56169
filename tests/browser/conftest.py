"""The console's test gateway: one per test module, in production mode (the CSP is then
enforced by default), with the probe stream of console_helpers.py. A module may set
CONSOLE_CONFIG to lines for its [console] table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from console_helpers import STREAMS_TOML
from support.identity import IdentityGateway, start_identity_gateway


@pytest.fixture(scope="module")
def console_gateway(stack, tmp_path_factory, request) -> Iterator[IdentityGateway]:
    """A production gateway with alice (reader), root (admin) and bob, and the module's
    CONSOLE_CONFIG; always stopped."""
    root = tmp_path_factory.mktemp("console")
    streams = root / "streams.toml"
    streams.write_text(STREAMS_TOML)
    console = getattr(request.module, "CONSOLE_CONFIG", "")
    with ExitStack() as processes:
        yield start_identity_gateway(
            processes, root / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, streams_file=streams,
            server='environment = "production"',
            identity='login_limits.per_ip = ["300/minute", "3000/hour"]',
            extra=f"[console]\n{console}\n",
        )  # fmt: skip
