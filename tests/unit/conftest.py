"""Fixtures of the unit tests: an account store in tmp_path and fast password hashing."""

from __future__ import annotations

import pytest
from support.identity import FAST_PASSWORDS

from gateway.identity.accounts import AccountStore
from gateway.identity.passwords import Passwords


@pytest.fixture(scope="module")
def passwords() -> Passwords:
    """argon2id with tiny parameters: the tests are about the logic, not the cost."""
    return Passwords(FAST_PASSWORDS)


@pytest.fixture
def store(tmp_path):
    """An account store of the test's own."""
    with AccountStore.open(tmp_path / "var" / "identity.duckdb") as opened:
        yield opened
