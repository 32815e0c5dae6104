"""Behaviour tests for lmcache_s3layer.testing.proxy.LatencyProxy against a tiny local HTTP/1.1 server.

Timing assertions are one-sided with generous slack (lower bound 0.9 x expected, upper
bounds seconds away) because CI machines are noisy; the point is to catch a proxy that
does not delay / throttle at all, or that stalls.
"""

from __future__ import annotations

import gc
import http.client
import logging
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmcache_s3layer.testing.proxy import LatencyProxy

MiB = 1 << 20
PAYLOAD = random.Random(1234).randbytes(8 * MiB)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 + Content-Length on every response keeps the connection alive between requests.
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _reply(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        # /bytes/<n>: the first n bytes of PAYLOAD
        n = int(self.path.rsplit("/", 1)[1])
        self._reply(PAYLOAD[:n])

    def do_PUT(self):
        # echo the body back so both directions can be checked byte for byte
        n = int(self.headers.get("Content-Length", "0"))
        self._reply(self.rfile.read(n))

    do_POST = do_PUT

    def log_message(self, *args):
        pass


class _Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.connections = 0

    def handle_error(self, request, client_address):
        # Fault tests cut connections on purpose; the handler's broken pipes are expected.
        pass


@pytest.fixture(scope="module")
def upstream():
    srv = _Upstream()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture
def make_proxy(upstream):
    made = []

    def _make(**kw):
        p = LatencyProxy("127.0.0.1", upstream.server_address[1], **kw).start()
        made.append(p)
        return p

    yield _make
    for p in made:
        p.stop()


def _conn(proxy: LatencyProxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=15)


def _get(c: http.client.HTTPConnection, n: int) -> tuple:
    """GET n bytes; return (body, seconds to headers, seconds total)."""
    t0 = time.perf_counter()
    c.request("GET", f"/bytes/{n}")
    r = c.getresponse()
    t_first = time.perf_counter() - t0
    body = r.read()
    assert r.status == 200
    return body, t_first, time.perf_counter() - t0


def test_bytes_pass_through_both_directions_on_one_keepalive_connection(make_proxy, upstream):
    proxy = make_proxy()
    before = upstream.connections
    c = _conn(proxy)
    sizes = [0, 1, 100_000, 5 * MiB + 123, 64 * 1024]
    sent_up = 0
    try:
        for i, n in enumerate(sizes):
            body, _, _ = _get(c, n)
            assert body == PAYLOAD[:n]
            up = PAYLOAD[-(n or 1):] if i % 2 else bytes(reversed(PAYLOAD[: n + 7]))
            c.request("PUT", "/echo", body=up)
            r = c.getresponse()
            assert r.status == 200 and r.read() == up
            sent_up += len(up)
    finally:
        c.close()
    assert proxy.connections == 1
    assert upstream.connections - before == 1
    assert proxy.responses == 2 * len(sizes)
    assert proxy.bytes_up >= sent_up
    assert proxy.bytes_down >= 2 * sum(sizes)


def test_delay_applies_to_every_request_on_one_keepalive_connection(make_proxy):
    d = 0.15
    proxy = make_proxy(delay_ms=d * 1000)
    c = _conn(proxy)
    try:
        for n in (10, 300_000, 0, 2 * MiB):
            body, t_first, _ = _get(c, n)
            assert body == PAYLOAD[:n]
            assert 0.9 * d <= t_first < d + 2.0, (n, t_first)
        t0 = time.perf_counter()
        c.request("PUT", "/echo", body=b"x" * 1000)
        r = c.getresponse()
        t_first = time.perf_counter() - t0
        assert r.read() == b"x" * 1000
        assert 0.9 * d <= t_first < d + 2.0, t_first
    finally:
        c.close()
    assert proxy.connections == 1
    assert proxy.responses == 5


def test_set_delay_while_running(make_proxy):
    proxy = make_proxy()
    c = _conn(proxy)
    try:
        _get(c, 10)
        proxy.set_delay(250)
        _, t_first, _ = _get(c, 10)
        assert 0.9 * 0.25 <= t_first < 2.25
        proxy.set_delay(0)
        assert proxy.delay_ms == 0
    finally:
        c.close()


def test_jitter_is_seeded_and_clamped():
    a = LatencyProxy("127.0.0.1", 1, delay_ms=10, jitter_ms=30, seed=7)
    b = LatencyProxy("127.0.0.1", 1, delay_ms=10, jitter_ms=30, seed=7)
    sa = [a._sample_delay() for _ in range(200)]
    assert sa == [b._sample_delay() for _ in range(200)]
    assert all(0.0 <= s <= 0.040 for s in sa)
    assert any(s == 0.0 for s in sa) and max(sa) > 0.030


def test_connection_bandwidth_cap(make_proxy):
    proxy = make_proxy(conn_bandwidth_bps=4 * MiB)
    c = _conn(proxy)
    try:
        body, _, elapsed = _get(c, 2 * MiB)
    finally:
        c.close()
    assert body == PAYLOAD[: 2 * MiB]
    assert 0.4 <= elapsed < 0.5 + 2.0, elapsed


def test_total_bandwidth_shared_across_parallel_connections(make_proxy):
    proxy = make_proxy(total_bandwidth_bps=4 * MiB)
    results = {}
    barrier = threading.Barrier(2)

    def worker(i):
        c = _conn(proxy)
        try:
            c.connect()
            barrier.wait()
            results[i] = _get(c, MiB)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    total = time.perf_counter() - t0
    assert len(results) == 2
    for body, _, elapsed in results.values():
        assert body == PAYLOAD[:MiB]
        # alone at 4 MiB/s each would take 0.25 s; sharing makes both take about 0.5 s
        assert elapsed >= 0.3, elapsed
    assert 0.4 <= total < 0.5 + 2.0, total
    assert proxy.connections == 2


def test_bandwidth_can_be_changed_while_running(make_proxy):
    proxy = make_proxy()
    c = _conn(proxy)
    try:
        _get(c, 10)
        proxy.set_bandwidth(conn_bps=2 * MiB)
        _, _, elapsed = _get(c, MiB)
        assert elapsed >= 0.4, elapsed
        proxy.set_bandwidth(None, None)
        assert proxy.conn_bandwidth_bps is None
        body, _, _ = _get(c, MiB)
        assert body == PAYLOAD[:MiB]
    finally:
        c.close()


def _raw_get(port: int, n: int) -> tuple:
    """GET over a raw socket; return (header bytes, body bytes, exception or None)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = bytearray()
    err = None
    try:
        s.sendall(f"GET /bytes/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        err = e
    finally:
        s.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body, err


def test_reset_next_gives_client_connection_error(make_proxy):
    proxy = make_proxy()
    proxy.reset_next(1)
    head, body, err = _raw_get(proxy.port, 4 * MiB)
    assert isinstance(err, ConnectionResetError), (err, len(body))
    assert len(body) < 4 * MiB
    assert proxy.faults_injected == 1 and proxy.pending_faults == 0

    # through an HTTP client the same fault surfaces as an exception, never as a full body
    proxy.reset_next(1)
    c = _conn(proxy)
    try:
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _get(c, 4 * MiB)
    finally:
        c.close()
    assert proxy.faults_injected == 2

    # faults are consumed: the next request is fine
    c = _conn(proxy)
    try:
        body, _, _ = _get(c, MiB)
        assert body == PAYLOAD[:MiB]
    finally:
        c.close()


def test_truncate_next_gives_short_body(make_proxy):
    proxy = make_proxy()
    proxy.truncate_next(1, after_bytes=1000)
    head, body, err = _raw_get(proxy.port, 3 * MiB)
    assert err is None
    assert b"Content-Length: %d" % (3 * MiB) in head
    assert len(body) == 1000 and body == PAYLOAD[:1000]
    assert proxy.faults_injected == 1

    # a small body is still cut inside the body (at half its Content-Length)
    proxy.truncate_next(1)
    c = _conn(proxy)
    try:
        with pytest.raises(http.client.IncompleteRead) as ei:
            _get(c, 100)
        assert len(ei.value.partial) == 50
    finally:
        c.close()


def test_fault_skips_bodiless_responses_and_survives_connection_close(make_proxy):
    proxy = make_proxy()
    c = _conn(proxy)
    try:
        _get(c, 10)  # before arming: untouched
        proxy.reset_next(1, after_bytes=10_000)
        c.request("PUT", "/echo", body=b"")  # Content-Length: 0 reply has no body to cut
        r = c.getresponse()
        assert r.status == 200 and r.read() == b""
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _get(c, MiB)  # same keep-alive connection, next response
    finally:
        c.close()
    assert proxy.faults_injected == 1

    proxy.truncate_next(1)
    c = _conn(proxy)
    c.request("PUT", "/echo", body=b"")
    assert c.getresponse().read() == b""
    c.close()  # connection gone with the fault unspent: it goes back to the queue
    deadline = time.monotonic() + 5
    while proxy.pending_faults == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.pending_faults == 1
    head, body, err = _raw_get(proxy.port, 1000)
    assert err is None and len(body) == 500
    assert proxy.faults_injected == 2


def test_upstream_down_closes_client(upstream):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    with LatencyProxy("127.0.0.1", dead_port) as proxy:
        c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert c.recv(100) == b""
            except ConnectionResetError:
                pass
        finally:
            c.close()
        assert proxy.upstream_errors == 1


def test_stop_with_open_connections_leaves_nothing_running(upstream, caplog):
    caplog.set_level(logging.WARNING, logger="asyncio")
    proxy = LatencyProxy("127.0.0.1", upstream.server_address[1], conn_bandwidth_bps=256 * 1024)
    with proxy:
        idle = _conn(proxy)
        _get(idle, 10)  # keep-alive connection left idle
        busy = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        busy.sendall(f"GET /bytes/{4 * MiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert busy.recv(10)  # transfer is in progress, throttled
        thread = proxy._thread
        assert thread.is_alive()
        t0 = time.perf_counter()
    # __exit__ stopped it mid-transfer
    assert time.perf_counter() - t0 < 3.0
    assert not thread.is_alive()
    assert thread not in threading.enumerate()
    assert proxy._loop.is_closed()
    busy.settimeout(5)
    rest = b""
    try:
        while chunk := busy.recv(65536):
            rest += chunk
    except ConnectionError:
        pass
    assert len(rest) < 4 * MiB
    busy.close()
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    proxy.stop()  # idempotent
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_start_fails_cleanly_when_port_taken(upstream):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        p = LatencyProxy("127.0.0.1", upstream.server_address[1], listen_port=s.getsockname()[1])
        with pytest.raises(OSError):
            p.start()
        assert not p.running
    finally:
        s.close()


def test_command_line(upstream):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcache_s3layer.testing.proxy", "--upstream",
         f"127.0.0.1:{upstream.server_address[1]}", "--delay-ms", "20", "--stats-interval", "0.1"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 15
        url = None
        while url is None and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if not line:
                    break
                out.append(line)
                if line.startswith("endpoint_url="):
                    url = line.split()[0].split("=", 1)[1]
        assert url, "".join(out)
        c = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        c.request("GET", "/bytes/1000")
        assert c.getresponse().read() == PAYLOAD[:1000]
        c.close()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=10)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(out)
    assert proc.returncode == 0, text
    assert "proxy listening on" in text
    assert "final connections=1" in text and "responses=1" in text, text
