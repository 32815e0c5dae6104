"""Latency / bandwidth / fault-injecting TCP proxy for testing against a local S3 server.

The kernel on the test machines has no netem and toxiproxy is unavailable, so this proxy
is how tests and benchmarks see "realistic" object-store behaviour from a 127.0.0.1
server (moto, SeaweedFS): a first-byte latency per request, a download bandwidth cap and
mid-body connection failures.

It is deliberately a byte pump, not an HTTP proxy. The only HTTP knowledge is:

* response boundaries: any client->upstream bytes seen since the current response started
  mean a new request was sent, so the next upstream chunk starts a new response. With
  non-pipelined HTTP/1.1 (what boto3/urllib3 do) this is exact and needs no parsing;
* for faults only, the end of the response header block and its Content-Length, so that
  a cut lands inside the body rather than in the headers.

Usage::

    with LatencyProxy("127.0.0.1", 8333, delay_ms=20) as proxy:
        s3 = boto3.client("s3", endpoint_url=proxy.endpoint_url, ...)

or from a shell: ``python -m lmcache_s3layer.testing.proxy --upstream 127.0.0.1:8333 --delay-ms 50``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from typing import Deque, Optional, Set

__all__ = ["LatencyProxy", "TokenBucket", "main"]

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
# Chunks are paced in slices of about this many seconds' worth of bytes so a slow cap
# produces a steady stream instead of one 64 KiB burst followed by a long stall.
_PACE_SLICE_S = 0.02
_MIN_SLICE = 1024
# Unused allowance a bucket may bank while idle. It is what an idle connection sends
# without waiting, so it is capped in bytes too: at 50 MiB/s a 20 ms burst (1 MiB) would make
# a 4 MiB download ~30% faster than the cap. It must still cover one slice plus timer
# overshoot, or late wake-ups would be lost and the rate would fall below the cap.
_BURST_S = 0.02
_MIN_BURST = 4096
_MAX_BURST = READ_SIZE
# How much of a response we look at to find the end of its headers (fault cut point).
_MAX_HEAD = 64 * 1024
DEFAULT_FAULT_AFTER_BYTES = 64 * 1024
_NEVER = 1 << 62

_CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class TokenBucket:
    """Rate limiter where a caller reserves bytes up front and sleeps off the debt.

    Reservation is synchronous (the event loop is single-threaded), so several connections
    sharing one bucket get a consistent order of service without any lock, and timer
    overshoot is self-correcting because refill is computed from real elapsed time.
    """

    __slots__ = ("rate", "tokens", "stamp", "_lock")

    def __init__(self) -> None:
        self.rate: Optional[float] = None
        self.tokens = 0.0
        self.stamp = 0.0
        # A host-wide cap is one bucket shared by several proxies, each with its own loop thread.
        self._lock = threading.Lock()

    def reserve(self, n: int, rate: Optional[float], now: float) -> float:
        """Take n bytes at ``rate`` bytes/s; return seconds to wait before sending them."""
        if not rate:
            self.rate = None
            return 0.0
        with self._lock:
            return self._reserve_locked(n, rate, now)

    def _reserve_locked(self, n: int, rate: float, now: float) -> float:
        burst = min(max(rate * _BURST_S, _MIN_BURST), _MAX_BURST)
        if self.rate is None:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.rate = rate
        self.stamp = now
        self.tokens -= n
        return -self.tokens / rate if self.tokens < 0 else 0.0


class _Conn:
    __slots__ = (
        "cid", "creader", "cwriter", "ureader", "uwriter", "bucket", "request_pending",
        "fault", "fault_after", "resp_pos", "head", "cut", "fault_fired",
    )

    def __init__(self, cid: int, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter):
        self.cid = cid
        self.creader = creader
        self.cwriter = cwriter
        self.ureader: Optional[asyncio.StreamReader] = None
        self.uwriter: Optional[asyncio.StreamWriter] = None
        self.bucket = TokenBucket()
        self.request_pending = False
        self.fault: Optional[str] = None  # "reset" | "truncate" while armed on this conn
        self.fault_after = 0
        self.resp_pos = 0  # bytes of the current response forwarded so far
        self.head = bytearray()
        self.cut: Optional[int] = None  # offset in the current response where the fault fires
        self.fault_fired = False


def _is_informational(first_chunk: bytes) -> bool:
    # "HTTP/1.1 100 Continue": a fault must not be spent on a response without a body.
    return first_chunk.startswith(b"HTTP/1.") and first_chunk[9:10] == b"1"


class LatencyProxy:
    """Asyncio TCP proxy, run in its own thread, that delays and throttles responses.

    * Delay: the first byte of every response (upstream->client) is held back by
      ``delay_ms`` +- uniform ``jitter_ms`` (clamped at 0, drawn from ``random.Random(seed)``).
      A response starts with the first upstream chunk after the client sent any bytes.
    * Bandwidth: ``conn_bandwidth_bps`` caps each connection and ``total_bandwidth_bps``
      all connections together, upstream->client only, in bytes/s; None = unlimited. Pass
      one ``total_bucket`` to several proxies to cap their sum (one host's link).
    * Faults: :meth:`reset_next` / :meth:`truncate_next` cut future responses mid-body.

    All setters are thread-safe and take effect on the next chunk while running.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        conn_bandwidth_bps: Optional[float] = None,
        total_bandwidth_bps: Optional[float] = None,
        seed: int = 0,
        total_bucket: Optional[TokenBucket] = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = int(upstream_port)
        self.listen_host = listen_host
        self._listen_port = int(listen_port)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._delay_s = 0.0
        self._jitter_s = 0.0
        self._conn_bps: Optional[float] = None
        self._total_bps: Optional[float] = None
        self.set_delay(delay_ms, jitter_ms)
        self.set_bandwidth(conn_bandwidth_bps, total_bandwidth_bps)
        self._faults: Deque[tuple] = collections.deque()

        # Counters are only written from the loop thread; reads from other threads see a
        # consistent int thanks to the GIL, which is all a test needs.
        self.connections = 0
        self.active_connections = 0
        self.responses = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.faults_injected = 0
        self.upstream_errors = 0

        # Pass one bucket to several proxies to cap their sum: a per-host link, not per port.
        self._total_bucket = total_bucket if total_bucket is not None else TokenBucket()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._conn_tasks: Set[asyncio.Task] = set()
        self._next_cid = 0
        self._started = False
        self._stopped = False
        self._stopping = False  # loop-thread flag: connection tasks are being cancelled

    # ------------------------------------------------------------------ settings

    def set_delay(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Added first-byte delay per response, +- uniform jitter; applies to responses
        that start after the call."""
        if ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        with self._lock:
            self._delay_s = ms / 1000.0
            self._jitter_s = jitter_ms / 1000.0

    def set_bandwidth(self, conn_bps: Optional[float] = None, total_bps: Optional[float] = None) -> None:
        """Replace both download caps (bytes/s, None = unlimited); applies from the next
        slice of data, including transfers already in progress."""
        for v in (conn_bps, total_bps):
            if v is not None and v <= 0:
                raise ValueError("bandwidth must be > 0 bytes/s or None")
        with self._lock:
            self._conn_bps = float(conn_bps) if conn_bps else None
            self._total_bps = float(total_bps) if total_bps else None

    @property
    def delay_ms(self) -> float:
        return self._delay_s * 1000.0

    @property
    def jitter_ms(self) -> float:
        return self._jitter_s * 1000.0

    @property
    def conn_bandwidth_bps(self) -> Optional[float]:
        return self._conn_bps

    @property
    def total_bandwidth_bps(self) -> Optional[float]:
        return self._total_bps

    def reset_next(self, n: int = 1, after_bytes: int = DEFAULT_FAULT_AFTER_BYTES) -> None:
        """Abort (TCP RST) the connection carrying each of the next ``n`` responses mid-body.

        The cut comes ``min(after_bytes, Content-Length // 2)`` bytes into the body (just
        ``after_bytes`` past the headers if there is no Content-Length), so it lands inside
        the body of any response that has one. Responses without a body (1xx,
        ``Content-Length: 0``, HEAD) pass untouched and the fault stays armed on that
        connection for its next response; if the connection ends first, the fault goes back
        to the queue for the next response on any connection.
        """
        self._arm("reset", n, after_bytes)

    def truncate_next(self, n: int = 1, after_bytes: int = DEFAULT_FAULT_AFTER_BYTES) -> None:
        """Like :meth:`reset_next` but closes cleanly (FIN): the client sees a short body."""
        self._arm("truncate", n, after_bytes)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def _arm(self, kind: str, n: int, after_bytes: int) -> None:
        if n < 0 or after_bytes < 0:
            raise ValueError("n and after_bytes must be >= 0")
        with self._lock:
            self._faults.extend([(kind, int(after_bytes))] * n)

    def _claim_fault(self) -> Optional[tuple]:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _return_fault(self, kind: str, after: int) -> None:
        with self._lock:
            self._faults.appendleft((kind, after))

    def _sample_delay(self) -> float:
        with self._lock:
            d, j = self._delay_s, self._jitter_s
            if j > 0:
                d += self._rng.uniform(-j, j)
        return d if d > 0 else 0.0

    def stats(self) -> dict:
        return {
            "connections": self.connections,
            "active_connections": self.active_connections,
            "responses": self.responses,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "faults_injected": self.faults_injected,
            "upstream_errors": self.upstream_errors,
        }

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if not self._started:
            raise RuntimeError("proxy not started")
        return self._listen_port

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "LatencyProxy":
        if self._started:
            raise RuntimeError("LatencyProxy.start() called twice")
        ready = threading.Event()
        failure: list = []
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready, failure),
            name=f"LatencyProxy->{self.upstream_host}:{self.upstream_port}", daemon=True,
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        self._started = True
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, then join the proxy thread."""
        if self._stopped or self._thread is None:
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("stop() cannot be called from the proxy's own thread")
        self._stopped = True
        loop, ev = self._loop, self._stop_event
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop already closed: thread is exiting on its own
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("LatencyProxy thread did not stop within %.1fs" % timeout)

    def __enter__(self) -> "LatencyProxy":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        port = self._listen_port if self._started else "?"
        return (f"LatencyProxy(127.0.0.1:{port} -> {self.upstream_host}:{self.upstream_port}, "
                f"delay={self.delay_ms:g}ms±{self.jitter_ms:g}, conn_bps={self._conn_bps}, "
                f"total_bps={self._total_bps})")

    def _thread_main(self, ready: threading.Event, failure: list) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as e:  # noqa: BLE001 - must reach start() or the caller hangs
            if not ready.is_set():
                failure.append(e)
                ready.set()
            else:
                log.exception("LatencyProxy loop crashed")
        finally:
            try:
                leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in leftovers:
                    t.cancel()
                if leftovers:
                    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                ready.set()

    async def _serve(self, ready: threading.Event) -> None:
        self._stop_event = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle_client, self.listen_host, self._listen_port, reuse_address=True,
        )
        self._listen_port = self._server.sockets[0].getsockname()[1]
        log.info("proxy listening on %s:%d -> %s:%d", self.listen_host, self._listen_port,
                 self.upstream_host, self.upstream_port)
        ready.set()
        try:
            await self._stop_event.wait()
        finally:
            self._stopping = True
            self._server.close()
            # A connection accepted just before close() has a task that has not run yet;
            # one loop turn lets it start, see _stopping and leave on its own.
            await asyncio.sleep(0)
            while self._conn_tasks:
                tasks = list(self._conn_tasks)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            log.info("proxy on port %d stopped", self._listen_port)

    # ------------------------------------------------------------------ data path

    async def _handle_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self._stopping:
            cwriter.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None  # start_server runs each handler in its own task
        self._conn_tasks.add(task)
        try:
            await self._proxy_connection(creader, cwriter)
        except asyncio.CancelledError:
            # stop() cancels connection tasks, possibly mid-cleanup. start_server's
            # done-callback logs a connection task that ends cancelled as an error, so end
            # it normally instead.
            if not self._stopping:
                raise
        finally:
            self._conn_tasks.discard(task)

    async def _proxy_connection(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self._next_cid += 1
        conn = _Conn(self._next_cid, creader, cwriter)
        self.connections += 1
        self.active_connections += 1
        log.debug("conn %d: open from %s", conn.cid, cwriter.get_extra_info("peername"))
        pumps: list = []
        graceful = False
        try:
            try:
                conn.ureader, conn.uwriter = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port)
            except OSError as e:
                self.upstream_errors += 1
                log.warning("conn %d: upstream %s:%d unreachable: %s", conn.cid,
                            self.upstream_host, self.upstream_port, e)
                return
            up = asyncio.create_task(self._pump_up(conn))
            down = asyncio.create_task(self._pump_down(conn))
            pumps = [up, down]
            waiting = {up, down}
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if down in done:
                    graceful = down.result() == "eof"
                    break
                if up.result() != "eof":
                    break
                # Client half-closed: responses already requested may still be in flight.
        finally:
            for t in pumps:
                t.cancel()
            try:
                if pumps:
                    await asyncio.gather(*pumps, return_exceptions=True)
                await _close(cwriter, graceful and not conn.fault_fired)
                if conn.uwriter is not None:
                    await _close(conn.uwriter, graceful)
            finally:
                # Whatever interrupted the graceful path, no socket may outlive the
                # connection (abort is a no-op on a transport that already closed).
                cwriter.transport.abort()
                if conn.uwriter is not None:
                    conn.uwriter.transport.abort()
                if conn.fault and not conn.fault_fired:
                    self._return_fault(conn.fault, conn.fault_after)
                self.active_connections -= 1
                log.debug("conn %d: closed", conn.cid)

    async def _pump_up(self, conn: _Conn) -> str:
        reader, writer = conn.creader, conn.uwriter
        assert writer is not None  # the pumps start only once upstream is connected
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return "eof"
                # Any client bytes mean a (new) request: the next upstream chunk is a new
                # response. Set before forwarding so the upstream reply cannot overtake it.
                conn.request_pending = True
                self.bytes_up += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError) as e:
            log.debug("conn %d: client->upstream ended: %r", conn.cid, e)
            return "error"

    async def _pump_down(self, conn: _Conn) -> str:
        reader, loop = conn.ureader, asyncio.get_running_loop()
        assert reader is not None  # the pumps start only once upstream is connected
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    return "eof"
                if conn.request_pending:
                    conn.request_pending = False
                    self.responses += 1
                    self._begin_response(conn, data)
                    delay = self._sample_delay()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if conn.fault is not None:
                    data, fire = self._fault_slice(conn, data)
                    if data:
                        await self._send(conn, data, loop)
                    if fire:
                        await self._fire_fault(conn)
                        return "fault"
                else:
                    await self._send(conn, data, loop)
        except (ConnectionError, OSError) as e:
            log.debug("conn %d: upstream->client ended: %r", conn.cid, e)
            return "error"

    def _begin_response(self, conn: _Conn, first_chunk: bytes) -> None:
        conn.resp_pos = 0
        conn.head.clear()
        conn.cut = None
        if conn.fault is None and not _is_informational(first_chunk):
            claimed = self._claim_fault()
            if claimed is not None:
                conn.fault, conn.fault_after = claimed
        # A fault already armed on this connection whose previous response was too short
        # to reach the cut simply carries over to this response.

    def _fault_slice(self, conn: _Conn, data: bytes) -> tuple:
        """Return (bytes to forward, whether the fault fires right after them)."""
        if conn.cut is None:
            conn.head += data[: max(0, _MAX_HEAD - len(conn.head))]
            end = conn.head.find(b"\r\n\r\n")
            if end >= 0:
                body_start = end + 4
                m = _CONTENT_LENGTH_RE.search(conn.head, 0, body_start)
                after = conn.fault_after
                if m is not None:
                    length = int(m.group(1))
                    # No body to cut (e.g. S3's PUT reply): let it through and keep the
                    # fault armed for this connection's next response.
                    after = min(after, length // 2) if length else _NEVER
                conn.cut = body_start + after
            elif len(conn.head) >= _MAX_HEAD:
                conn.cut = conn.fault_after
        if conn.cut is not None and conn.resp_pos + len(data) >= conn.cut:
            data = data[: conn.cut - conn.resp_pos]
            conn.resp_pos = conn.cut
            return data, True
        conn.resp_pos += len(data)
        return data, False

    async def _fire_fault(self, conn: _Conn) -> None:
        conn.fault_fired = True
        self.faults_injected += 1
        kind = conn.fault
        uwriter = conn.uwriter
        assert uwriter is not None  # faults fire from _pump_down, after upstream connected
        log.info("conn %d: injecting %s after %d response bytes", conn.cid, kind, conn.resp_pos)
        if kind == "reset":
            sock = conn.cwriter.get_extra_info("socket")
            if sock is not None:
                try:
                    # Linger 0 turns close() into an RST instead of a FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            conn.cwriter.transport.abort()
            uwriter.transport.abort()
        else:
            await _close(conn.cwriter, True)
            # The upstream still holds the rest of the body; never reuse that connection.
            uwriter.transport.abort()

    async def _send(self, conn: _Conn, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        writer = conn.cwriter
        with self._lock:
            conn_bps, total_bps = self._conn_bps, self._total_bps
        if conn_bps is None and total_bps is None:
            self.bytes_down += len(data)
            writer.write(data)
            await writer.drain()
            return
        rate = min(r for r in (conn_bps, total_bps) if r is not None)
        step = int(min(READ_SIZE, max(_MIN_SLICE, rate * _PACE_SLICE_S)))
        view = memoryview(data)
        for off in range(0, len(data), step):
            piece = view[off: off + step]
            now = loop.time()
            wait = max(conn.bucket.reserve(len(piece), conn_bps, now),
                       self._total_bucket.reserve(len(piece), total_bps, now))
            if wait > 0:
                await asyncio.sleep(wait)
            self.bytes_down += len(piece)
            writer.write(piece)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter, graceful: bool) -> None:
    if writer.transport.is_closing() and not graceful:
        return
    if not graceful:
        writer.transport.abort()
        return
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5.0)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        writer.transport.abort()


# ---------------------------------------------------------------------- command line

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_rate(text: str) -> Optional[float]:
    """'4M' / '4MiB' / '500K' / '1048576' (bytes per second, binary suffixes); 0/none = off."""
    t = text.strip().upper().removesuffix("/S").removesuffix("IB").removesuffix("B")
    if t in ("", "0", "NONE", "OFF"):
        return None
    mult = _SUFFIXES.get(t[-1:], None)
    if mult is None:
        mult, num = 1, t
    else:
        num = t[:-1]
    try:
        return float(num) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}; use e.g. 500K, 4M, 1G bytes/s") from None


def _parse_hostport(text: str) -> tuple:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lmcache_s3layer.testing.proxy",
        description="TCP proxy adding per-response latency, bandwidth caps and faults "
                    "in front of a local S3 (HTTP/1.1) server.")
    p.add_argument("--upstream", required=True, type=_parse_hostport, help="HOST:PORT of the S3 server")
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--delay-ms", type=float, default=0.0, help="added first-byte delay per response")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter on the delay")
    p.add_argument("--conn-bandwidth", type=_parse_rate, default=None,
                   help="per-connection download cap, bytes/s (suffix K/M/G = KiB/MiB/GiB)")
    p.add_argument("--total-bandwidth", type=_parse_rate, default=None,
                   help="download cap shared by all connections, bytes/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-interval", type=float, default=5.0,
                   help="seconds between counter lines (printed only when they change)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(message)s")
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    host, port = args.upstream
    proxy = LatencyProxy(host, port, listen_host=args.listen_host, listen_port=args.listen_port,
                         delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                         conn_bandwidth_bps=args.conn_bandwidth,
                         total_bandwidth_bps=args.total_bandwidth, seed=args.seed)
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    # A shell starts `cmd &` with SIGINT ignored, and benchmark scripts stop us with kill:
    # both signals must end in the same clean stop().
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    proxy.start()
    print(f"{proxy!r}\nendpoint_url={proxy.endpoint_url}  (Ctrl-C to stop)", flush=True)
    last = None
    try:
        while True:
            time.sleep(max(0.1, args.stats_interval))
            s = proxy.stats()
            if s != last:
                print("stats " + " ".join(f"{k}={v}" for k, v in s.items()), flush=True)
                last = s
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        print("final " + " ".join(f"{k}={v}" for k, v in proxy.stats().items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
