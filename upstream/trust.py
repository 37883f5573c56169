"""Loads the secret the gateway presents in ``X-Gateway-Secret``.

It must never put the secret, or any part of it, into a message or log line.
"""

from pathlib import Path

from upstream.errors import SecretError

MIN_SECRET_LENGTH = 16


def read_secret(path: Path) -> bytes:
    """The stripped one-line secret, or SecretError saying how to create it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SecretError(
            f"secret file {path} does not exist; create it with `gateway keys init`"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SecretError(f"secret file {path} cannot be read: {type(error).__name__}") from None
    if not text:
        raise SecretError(f"secret file {path} is empty; create it with `gateway keys init`")
    if len(text) < MIN_SECRET_LENGTH or not text.isascii():
        raise SecretError(
            f"secret file {path} must hold at least {MIN_SECRET_LENGTH} ASCII characters"
        )
    return text.encode("ascii")
