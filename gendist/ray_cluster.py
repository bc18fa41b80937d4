"""The Ray a sweep runs on: started here with token authentication always on, or joined with the
user's token; and how to open its dashboard, said without ever printing the token.

Ray 2.60 authenticates with a shared token when RAY_AUTH_MODE=token: every process of the cluster
(raylets, GCS, dashboard, drivers) reads it from $RAY_AUTH_TOKEN, else from the file
$RAY_AUTH_TOKEN_PATH, else from ~/.ray/auth_token. Left unset, a new local `ray.init()` turns it
on and writes ~/.ray/auth_token readable by everyone (0644), while `ray start --head` turns it on
only if a token file already happens to exist. gendist sets the mode explicitly on every cluster it
starts and keeps the token file readable by its owner only (0600). slurm/sweep.sbatch does the
same for a cluster job, with a token of the job's own (in the job's folder, which every node reads).
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import sys
from collections.abc import MutableMapping
from pathlib import Path

AUTH_MODE = "RAY_AUTH_MODE"
TOKEN = "RAY_AUTH_TOKEN"
TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
DASHBOARD_PORT = 8265


class RayAuthError(RuntimeError):
    """The cluster to join wants a token this user does not have, or refused the one given."""


def token_file(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Where Ray reads the token from when it is not in $RAY_AUTH_TOKEN itself."""
    return Path(environ.get(TOKEN_PATH) or Path.home() / ".ray" / "auth_token")


def token_hint(environ: MutableMapping[str, str] = os.environ) -> str:
    """How the user gets the token, never the token itself."""
    if environ.get(TOKEN):
        return "it is the value of $RAY_AUTH_TOKEN in the shell that started the sweep"
    path = token_file(environ)
    where = f"RAY_AUTH_TOKEN_PATH={path} " if environ.get(TOKEN_PATH) else ""
    return f"`{where}ray get-auth-token` prints it (it reads {path}, readable by you only)"


def private_token(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """For a cluster gendist starts: token mode on (in `environ`, which the cluster's processes
    inherit) and a token that only this user can read, created if there is none. Returns notes."""
    notes = []
    if environ.get(AUTH_MODE, "token").lower() != "token":
        notes.append(
            f"note: {AUTH_MODE}={environ[AUTH_MODE]} is not used: a Ray cluster gendist starts always asks for a "
            "token (anyone who reaches an unauthenticated Ray can run code as you)"
        )
    environ[AUTH_MODE] = "token"
    _reload_ray_config()
    if environ.get(TOKEN):
        return notes
    path = token_file(environ)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as sink:
            sink.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits
        notes.append(f"created a Ray authentication token in {path} (mode 0600)")
    elif stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
        notes.append(f"made {path} readable by you only (0600): it is the key to your Ray clusters")
    return notes


def _reload_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its config when it is first imported; a process that imported it
    before the mode was set refreshes it, as Ray's own `_enable_token_auth` does."""
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def start_local(dashboard: bool):
    """A new Ray on this machine, token-authenticated, its dashboard (if on) on 127.0.0.1 only."""
    import ray

    notes = private_token()
    context = ray.init(
        address="local",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=DASHBOARD_PORT,
        log_to_driver=False,
    )
    return context, notes


def join(address: str):
    """Connect to a running cluster with the user's token (token mode on whenever a token is at
    hand); a missing or refused token is said as such."""
    import ray
    from ray.exceptions import AuthenticationError

    has_token = bool(os.environ.get(TOKEN)) or token_file().is_file()
    if has_token and AUTH_MODE not in os.environ:
        os.environ[AUTH_MODE] = "token"
        _reload_ray_config()
    try:
        return ray.init(address=address, log_to_driver=False)
    except (AuthenticationError, ConnectionError, RuntimeError) as err:
        if not _is_auth_failure(err):
            raise
        if not has_token:
            raise RayAuthError(
                f"the Ray cluster at {address} asks for an authentication token and none was found ($RAY_AUTH_TOKEN, "
                f"$RAY_AUTH_TOKEN_PATH, {token_file()}): set RAY_AUTH_TOKEN_PATH to the cluster's token file (a "
                "slurm/sweep.sbatch job names it in its log), or copy the token of whoever started the cluster"
            ) from None
        raise RayAuthError(
            f"the Ray cluster at {address} refused the authentication token from "
            f"{'$RAY_AUTH_TOKEN' if os.environ.get(TOKEN) else token_file()}: it is not that cluster's token "
            "(each slurm/sweep.sbatch job makes its own; its log names the file)"
        ) from None


def _is_auth_failure(err: BaseException | None) -> bool:
    """Whether Ray's error, or one it was raised from (ray.init wraps the GCS client's), is about the token."""
    from ray.exceptions import AuthenticationError

    while err is not None:
        if isinstance(err, AuthenticationError) or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def dashboard_lines(url: str, host: str | None = None) -> list[str]:
    """How to open a dashboard served on 127.0.0.1 of `host` (this machine by default)."""
    host = host or socket.gethostname()
    port = url.rsplit(":", 1)[-1].strip("/")
    return [
        f"Ray dashboard: http://127.0.0.1:{port} on {host} (bound to 127.0.0.1 only, token authentication on)",
        f"  from your machine: ssh -N -L {port}:127.0.0.1:{port} {host}   then open http://127.0.0.1:{port}",
        f"  the page asks for the token: {token_hint()}",
    ]
