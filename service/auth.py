"""API keys: who may call, and which sessions are whose. Transport-neutral; the adapters pass the raw header.

Keys come from a file (`--api-keys-file`, one key per line, `#` comments) or the environment variable
LSTM_SERVE_API_KEYS (keys separated by commas or whitespace), never from a command-line argument that `ps`
would show. Each key is compared in constant time against every configured key. A caller is identified by a
short digest of its key (its *owner* tag), never by the key itself; sessions are namespaced by that tag, so
another key that names a session (ids can be chosen, like `demo`) finds nothing: the same 404 as for a
session that does not exist, on every operation.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from service.errors import UnauthenticatedError

BEARER = "bearer "
CHALLENGE = 'Bearer realm="lstm-serve"'
UNAUTHENTICATED = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"


class KeyFileError(ValueError):
    """The API keys cannot be read; the message says which file and why (never a key)."""


def owner_tag(key: str) -> str:
    """A caller's stable, non-secret identity: 16 hex digits of SHA-256 of its key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    """The configured keys; `owner(header)` authenticates an Authorization header value."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]
        self._owners = [owner_tag(k) for k in keys]

    @classmethod
    def load(cls, path: Path | None, env_value: str | None) -> ApiKeys | None:
        """Keys from the file and/or the environment; None when neither is set (authentication off)."""
        keys: list[str] = []
        if path is not None:
            try:
                text = path.read_text()
            except OSError as e:
                raise KeyFileError(f"cannot read the API keys file {path.name!r}: {e.strerror}") from None
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if env_value:
            keys += env_value.replace(",", " ").split()
        if path is None and not env_value:
            return None
        short = [n for n, k in enumerate(keys, 1) if len(k) < 16]
        if not keys:
            raise KeyFileError("API keys are configured but none was found: put one key per line in the file")
        if short:
            raise KeyFileError(f"API keys must be at least 16 characters; key number(s) {short} are shorter")
        return cls(keys)

    def owner(self, authorization: str | None) -> str:
        """The owner tag of a valid `Bearer <key>` header; anything else is UnauthenticatedError (one
        message for every failure, so that nothing tells which part was wrong)."""
        if authorization is None or not authorization[: len(BEARER)].lower() == BEARER:
            raise UnauthenticatedError(UNAUTHENTICATED)
        given = authorization[len(BEARER) :].strip().encode()
        found = -1
        for n, key in enumerate(self._keys):
            if hmac.compare_digest(given, key):  # NOTE: every key is compared: no early exit to time
                found = n
        if found < 0:
            raise UnauthenticatedError(UNAUTHENTICATED)
        return self._owners[found]
