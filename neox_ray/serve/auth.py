"""API keys: where they come from (an environment variable and/or a file) and how a request is checked.

Keys are read inside the replica, never passed through Serve's config (which is stored in the cluster's
GCS and shown by ``serve status``): the config names the variable or file, the secret stays in the
replica's environment (a Kubernetes secret, say). Several keys may be given, comma- or line-separated,
so they can be rotated. Which routes are protected is decided by the app (:mod:`neox_ray.serve.server`).
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from neox_ray.serve.errors import unauthorized

logger = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "NEOX_RAY_API_KEY"


def _split_keys(raw: str) -> list[str]:
    return [key.strip() for line in raw.splitlines() for key in line.split(",") if key.strip()]


def load_api_keys(api_key_env: str | None, api_key_file: str | None) -> list[str]:
    """Keys from ``api_key_env`` (default ``NEOX_RAY_API_KEY``) and ``api_key_file``. A variable or file
    that was named explicitly but is missing or empty is an error: the server must not start open by
    accident. No keys at all (nothing named, default variable unset) leaves the server open, with a warning.
    """
    keys: list[str] = []
    env_name = api_key_env or DEFAULT_API_KEY_ENV
    env_value = os.environ.get(env_name, "")
    if api_key_env and not env_value.strip():
        raise ValueError(f"api_key_env names {api_key_env!r}, but that environment variable is unset or empty "
                         "in the replica's environment")
    keys += _split_keys(env_value)
    if api_key_file:
        path = Path(api_key_file).expanduser()
        if not path.is_file():
            raise ValueError(f"api_key_file {str(path)!r} does not exist")
        file_keys = _split_keys(path.read_text())
        if not file_keys:
            raise ValueError(f"api_key_file {str(path)!r} holds no keys")
        keys += file_keys
    if not keys:
        logger.warning("no API key configured (set %s or api_key_file): every route is open", env_name)
    return keys


class APIKeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [key.encode() for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raises a 401 :class:`APIError` unless ``authorization`` is ``Bearer <a configured key>``."""
        if not self._keys:
            return
        if not authorization:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        candidate = token.strip().encode()
        # Compare against every key so the timing does not reveal which (or whether a prefix) matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise unauthorized("incorrect API key provided")
