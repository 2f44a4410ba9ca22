"""Ray token authentication, set explicitly rather than left to Ray's defaults.

Ray >= 2.59 decides on token authentication from the environment and the home directory:
``ray.init()`` of a new cluster turns it on and writes ``~/.ray/auth_token`` if that file is
missing; ``ray start --head`` turns it on only if a token already exists; joining by an explicit
address never turns it on by itself. So the same script behaves differently on a fresh machine, on
a machine where some other Ray session once wrote ``~/.ray/auth_token``, and in CI. Ray reads
three environment variables (in its C++ ``AuthenticationTokenLoader``, cached per process):

- ``RAY_AUTH_MODE``: ``token`` or ``disabled``; when set, Ray never guesses.
- ``RAY_AUTH_TOKEN``: the token itself (takes precedence over a path).
- ``RAY_AUTH_TOKEN_PATH``: a file holding the token (instead of ``~/.ray/auth_token``).

edgemeta always sets ``RAY_AUTH_MODE`` and a token source itself, so ``~/.ray/auth_token`` is
neither read nor written by anything edgemeta starts.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_ENV_VARS = (AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV)


def new_token() -> str:
    """A fresh token: 256 random bits as hex, the same shape Ray's own generator makes."""
    return secrets.token_hex(32)


def write_token_file(path: str | Path, token: str | None = None) -> Path:
    """Create ``path`` holding a token, readable by its owner only (mode 0600).

    An existing file is kept (so a restarted cluster keeps its token) but its mode is tightened.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token or new_token())
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


def read_token(path: str | Path) -> str:
    path = Path(path).expanduser()
    token = path.read_text().strip() if path.exists() else ""
    if not token:
        raise FileNotFoundError(f"no authentication token in {path}")
    return token


def token_env(token_path: str | Path) -> dict[str, str | None]:
    """Environment for a process that must use the token in ``token_path`` (None = unset)."""
    return {AUTH_MODE_ENV: "token", TOKEN_PATH_ENV: str(Path(token_path).expanduser()),
            TOKEN_ENV: None}


def ephemeral_token_env() -> dict[str, str | None]:
    """Token auth with a random in-memory token: nothing is written to disk.

    For an embedded cluster, whose processes are all children of this one and inherit it.
    """
    return {AUTH_MODE_ENV: "token", TOKEN_ENV: new_token(), TOKEN_PATH_ENV: None}


def disabled_env() -> dict[str, str | None]:
    return {AUTH_MODE_ENV: "disabled", TOKEN_ENV: None, TOKEN_PATH_ENV: None}


def bearer_headers(token: str) -> dict[str, str]:
    """HTTP headers for Ray's dashboard / job API when token auth is on."""
    return {"Authorization": f"Bearer {token}"}


def merged_env(base: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """``base`` with ``changes`` applied (a None value removes the variable)."""
    env = dict(base)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def apply_to_process(changes: Mapping[str, str | None]) -> dict[str, str | None]:
    """Apply auth settings to this process's environment and Ray's cached view of it.

    Ray caches its config and the token per process, so changing ``os.environ`` alone is not
    seen after the first ``ray.init``; this refreshes both caches (config first, then the token,
    the order Ray's own test helpers use). Call it only while Ray is not connected. Returns the
    previous values, for :func:`restore_process`.
    """
    previous = {key: os.environ.get(key) for key in AUTH_ENV_VARS}
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _refresh_ray_caches()
    return previous


def restore_process(previous: Mapping[str, str | None]) -> None:
    apply_to_process(previous)


def _refresh_ray_caches() -> None:
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # noqa: PLC2701 - no public API
    except ImportError:  # an older Ray without token auth: nothing is cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
