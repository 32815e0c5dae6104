"""The local SeaweedFS launcher: isolation, S3 semantics we rely on, persistence, shutdown.

These tests start their own servers (not the session ``s3_endpoint``, which may be a remote
store) because they inspect the process and its sockets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

botocore = pytest.importorskip("botocore")
from botocore.exceptions import ClientError  # noqa: E402

from lmcache_s3layer.testing.server import (  # noqa: E402
    LocalS3Server,
    LocalS3ServerError,
    _pid_is_our_weed,
    _port_free,
    find_weed_binary,
    server_info,
    wait_for_s3,
)

REPO = Path(__file__).resolve().parents[1]

try:
    find_weed_binary()
except LocalS3ServerError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"SeaweedFS not installed: {e}", allow_module_level=True)


def _client(endpoint_url, access_key, secret_key, **kw):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                      connect_timeout=2, read_timeout=10, **kw),
    )


def _error(exc_info) -> tuple[str, int]:
    r = exc_info.value.response
    return r["Error"]["Code"], r["ResponseMetadata"]["HTTPStatusCode"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LocalS3Server(
        data_dir=tmp_path_factory.mktemp("weed-module"),
        access_key="test-access",
        secret_key="test-secret-value",
    )
    with srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return _client(server.endpoint_url, server.access_key, server.secret_key)


# ------------------------------------------------------------------------------ isolation


def _listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of the TCP sockets in LISTEN state owned by ``pid``, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A = TCP_LISTEN
                continue
            hexip, hexport = local.split(":")
            raw = bytes.fromhex(hexip)
            # /proc prints the address as host-order 32-bit words.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, raw), int(hexport, 16)))
    return found


def _local_ipv4_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces (SIOCGIFADDR; no psutil needed)."""
    addrs = []
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                res = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
            except OSError:
                continue
            addrs.append(socket.inet_ntoa(res[20:24]))
    finally:
        s.close()
    return addrs


def test_listens_on_loopback_only(server):
    # The admin server (and its gRPC port) comes up a moment after S3 answers.
    deadline = time.monotonic() + 15
    while True:
        listening = _listening_sockets(server.pid)
        ports = {p for _, p in listening}
        if server.ports["admin"] in ports or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # master, volume, filer, s3, admin, each with a gRPC twin at +10000
    assert ports == {q for p in server.ports.values() for q in (p, p + 10000)}, listening
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening

    others = [a for a in _local_ipv4_addresses() if not a.startswith("127.")]
    for addr in others:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((addr, server.s3_port)) != 0, f"S3 port reachable on {addr}"


def test_secrets_stay_private(server):
    mode = (server.data_dir / "s3-identities.json").stat().st_mode & 0o777
    assert mode == 0o600
    # The state file and the log are for humans and tools: no secret in them.
    assert server.secret_key not in (server.data_dir / "server.json").read_text()
    assert server.secret_key not in server.log_path.read_text(errors="replace")
    assert server.secret_key not in repr(server)
    # weed gets its memory cap, and no AWS_* credentials that could shadow the identities file.
    raw = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
    env = dict(kv.split(b"=", 1) for kv in raw if b"=" in kv)
    assert env.get(b"GOMEMLIMIT") == b"768MiB"
    assert not {b"AWS_ACCESS_KEY_ID", b"AWS_SECRET_ACCESS_KEY", b"AWS_SESSION_TOKEN"} & set(env)


# ------------------------------------------------------------------------- S3 semantics


def test_put_ranged_get_and_create_only_put(server, client):
    client.create_bucket(Bucket="semantics")
    body = bytes(range(256)) * 64  # 16 KiB
    client.put_object(Bucket="semantics", Key="obj", Body=body)

    r = client.get_object(Bucket="semantics", Key="obj", Range="bytes=1000-1999")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert r["ContentRange"] == f"bytes 1000-1999/{len(body)}"
    assert r["Body"].read() == body[1000:2000]

    r = client.get_object(Bucket="semantics", Key="obj", Range="bytes=-10")
    assert r["Body"].read() == body[-10:]

    with pytest.raises(ClientError) as ei:
        client.get_object(Bucket="semantics", Key="obj", Range=f"bytes={len(body)}-")
    assert _error(ei) == ("InvalidRange", 416)

    client.put_object(Bucket="semantics", Key="ptr", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket="semantics", Key="ptr", Body=b"second", IfNoneMatch="*")
    assert _error(ei) == ("PreconditionFailed", 412)
    assert client.get_object(Bucket="semantics", Key="ptr")["Body"].read() == b"first"


def test_aws_like_errors_for_buckets_and_keys(server, client):
    # -s3.autoCreateBucket=false: a PUT into a missing bucket must not create it.
    with pytest.raises(ClientError) as ei:
        client.put_object(Bucket="no-such-bucket", Key="k", Body=b"x")
    assert _error(ei) == ("NoSuchBucket", 404)
    with pytest.raises(ClientError) as ei:
        client.get_object(Bucket="no-such-bucket", Key="k")
    assert _error(ei) == ("NoSuchBucket", 404)

    client.create_bucket(Bucket="errors")
    with pytest.raises(ClientError) as ei:
        client.get_object(Bucket="errors", Key="missing")
    assert _error(ei) == ("NoSuchKey", 404)
    with pytest.raises(ClientError) as ei:
        client.head_object(Bucket="errors", Key="missing")
    assert _error(ei)[1] == 404  # HEAD has no body, so no error code

    # -s3.allowDeleteBucketNotEmpty=false
    client.put_object(Bucket="errors", Key="k", Body=b"x")
    with pytest.raises(ClientError) as ei:
        client.delete_bucket(Bucket="errors")
    assert _error(ei) == ("BucketNotEmpty", 409)


def test_wrong_credentials_are_rejected(server, client):
    client.create_bucket(Bucket="auth")
    client.put_object(Bucket="auth", Key="k", Body=b"x")
    cases = [
        (server.access_key, "not-the-secret", "SignatureDoesNotMatch"),
        ("unknown-key", server.secret_key, "InvalidAccessKeyId"),
    ]
    for access, secret, code in cases:
        bad = _client(server.endpoint_url, access, secret)
        calls = [
            (bad.list_buckets, {}),
            (bad.get_object, {"Bucket": "auth", "Key": "k"}),
            (bad.put_object, {"Bucket": "auth", "Key": "k2", "Body": b"y"}),
        ]
        for call, kwargs in calls:
            with pytest.raises(ClientError) as ei:
                call(**kwargs)
            assert _error(ei) == (code, 403)

    anon = _client(server.endpoint_url, None, None, signature_version=botocore.UNSIGNED)
    with pytest.raises(ClientError) as ei:
        anon.get_object(Bucket="auth", Key="k")
    assert _error(ei) == ("AccessDenied", 403)

    with pytest.raises(PermissionError):
        wait_for_s3(server.endpoint_url, server.access_key, "wrong", timeout=10, auth_grace=0.3)


def test_wait_for_s3_times_out_without_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            wait_for_s3(f"http://127.0.0.1:{port}", "a", "b", timeout=1.0)
        assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ lifecycle, persistence


def test_data_dir_is_locked_while_in_use(server):
    with pytest.raises(LocalS3ServerError, match="in use"):
        LocalS3Server(data_dir=server.data_dir).start(timeout=5)
    assert server.running


@pytest.mark.slow  # two SeaweedFS start/stop cycles (~6 s)
def test_persists_across_restart_and_stop_ends_process(tmp_path, server):
    srv = LocalS3Server(data_dir=tmp_path / "persist")
    srv.start()
    try:
        assert srv.s3_port != server.s3_port  # coexists with the module's server
        c = _client(srv.endpoint_url, srv.access_key, srv.secret_key)
        c.create_bucket(Bucket="persist")
        c.put_object(Bucket="persist", Key="a/b", Body=b"kept")
        first_pid, first_port = srv.pid, srv.s3_port
    finally:
        srv.stop()

    assert srv.pid is None and not srv.running
    assert not _runs_weed_on(first_pid, srv.weed_dir), "weed still running after stop()"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", first_port)) != 0, "S3 port still open after stop()"
    srv.stop()  # idempotent

    with LocalS3Server(data_dir=tmp_path / "persist") as again:
        c = _client(again.endpoint_url, again.access_key, again.secret_key)
        assert c.get_object(Bucket="persist", Key="a/b")["Body"].read() == b"kept"
        assert [b["Name"] for b in c.list_buckets()["Buckets"]] == ["persist"]


def test_restart_reuses_free_ports(tmp_path):
    # A stable endpoint across restarts (and the master keeps its raft dir, weed/m<port>).
    srv = LocalS3Server(data_dir=tmp_path)
    ports = {"master": 15001, "volume": 15002, "filer": 15003, "s3": 15004, "admin": 15005}
    (tmp_path / "server.json").write_text(json.dumps({"pid": None, "ports": ports}))
    if all(_port_free(p) and _port_free(p + 10000) for p in ports.values()):
        assert srv._choose_ports(reuse=True) == ports
    fresh = srv._choose_ports(reuse=False)
    assert set(fresh) == set(ports)
    assert len({q for p in fresh.values() for q in (p, p + 10000)}) == 10
    assert LocalS3Server(data_dir=tmp_path, s3_port=15999)._choose_ports(reuse=True)["s3"] == 15999


def _runs_weed_on(pid: int, weed_dir: Path) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and _pid_is_our_weed(pid, weed_dir)


def test_cli_detach_status_stop(tmp_path):
    data = tmp_path / "cli"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    env.pop("AWS_ACCESS_KEY_ID", None)

    def cli(*args, timeout=90):
        return subprocess.run(
            [sys.executable, "-m", "lmcache_s3layer.testing.server", *args, "--data-dir", str(data)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
        )

    r = cli("start", "--detach")
    assert r.returncode == 0, r.stdout + r.stderr
    info = server_info(data)
    try:
        assert info and info["endpoint_url"] in r.stdout
        assert cli("status").returncode == 0
        from lmcache_s3layer.testing.server import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

        _client(info["endpoint_url"], DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY).list_buckets()
    finally:
        r = cli("stop")
    assert r.returncode == 0 and f"stopped pid {info['pid']}" in r.stdout, r.stdout + r.stderr
    assert not _runs_weed_on(info["pid"], data / "weed")
    assert server_info(data) is None
    assert cli("status").returncode == 3


# ---------------------------------------------------------------------- conftest fixtures


def test_bucket_fixture_round_trip(bucket, s3_boto_client, s3_endpoint):
    assert repr(s3_endpoint.secret_key) not in repr(s3_endpoint)
    s3_boto_client.put_object(Bucket=bucket, Key="x", Body=b"y")
    assert s3_boto_client.get_object(Bucket=bucket, Key="x")["Body"].read() == b"y"
