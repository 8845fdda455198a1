"""A lean HTTP/1.1 load generator for the service benchmarks: keep-alive connections on one asyncio loop,
requests encoded before the clock starts, responses read by their ``Content-Length``.

Why not httpx: on this 2-core machine the client shares the cores with the server it measures, and an
httpx ``AsyncClient.post`` costs ~3 ms of CPU a request (building the request, JSON encoding, its
connection pool). That is as much as the server's own work on a cached listing, so the client, not the
service, set the cached figures. Here a request costs the client one ``write`` and one header parse
(``client_cpu_ms`` in the result says how much), like wrk or hey would, and what is measured is the
service. It speaks only what the benchmarks need: POST, a JSON body, ``Content-Length`` or chunked
responses.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0
    warmed: int = 0  # answered requests left out of the figures (``warmup``)

    @property
    def n(self) -> int:
        return len(self.latencies_s)

    @property
    def rate(self) -> float:
        return self.n / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def _index(self, q: float) -> int:
        """Where the ``q`` quantile sits among the latencies sorted fastest first."""
        return min(self.n - 1, int(q * self.n))

    def percentile_ms(self, q: float) -> float:
        lat = sorted(self.latencies_s)
        return lat[self._index(q)] * 1000 if lat else float("nan")

    def slowest_rank(self, q: float) -> int:
        """Which slowest latency :meth:`percentile_ms` answers for ``q`` (1: the slowest; p99 of 300: 3)."""
        return self.n - self._index(q) if self.n else 0

    @property
    def client_cpu_ms(self) -> float:
        """The load generator's own CPU time per request."""
        return self.client_cpu_s / self.n * 1000 if self.n else float("nan")


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """The bytes of one keep-alive POST of a JSON body."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; answers its status and whether the server keeps the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, keep = 0, False, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, keep


async def _drive(host: str, port: int, requests: Sequence[bytes], concurrency: int,
                 time_limit: float, timeout: float, warmup: int) -> LoadResult:
    out = LoadResult()
    todo = deque(requests)
    deadline = time.monotonic() + time_limit
    clock = [time.process_time(), time.perf_counter()]  # where the figures start: after the warm-up

    def answered(latency: float) -> None:
        if out.warmed < warmup:
            out.warmed += 1
            if out.warmed == warmup:
                clock[:] = [time.process_time(), time.perf_counter()]
        else:
            out.latencies_s.append(latency)  # figures are of answered requests

    async def worker() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while todo and time.monotonic() < deadline:
                req = todo.popleft()
                t0 = time.perf_counter()
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                    conn[1].write(req)
                    status, keep = await asyncio.wait_for(_read_response(conn[0]), timeout)
                    out.statuses[status] = out.statuses.get(status, 0) + 1
                    if status == 200:
                        answered(time.perf_counter() - t0)
                    else:
                        out.errors += 1
                    if not keep:
                        conn[1].close()
                        conn = None
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                        TimeoutError):
                    out.errors += 1
                    if conn is not None:
                        conn[1].close()
                    conn = None
        finally:
            if conn is not None:
                conn[1].close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.elapsed_s = time.perf_counter() - clock[1]
    out.client_cpu_s = time.process_time() - clock[0]
    return out


def post_load(host: str, port: int, requests: Sequence[bytes], concurrency: int,
              time_limit: float = 60.0, timeout: float = 60.0, warmup: int = 0) -> LoadResult:
    """Send ``requests`` (from :func:`post_request`) over ``concurrency`` keep-alive connections, each
    waiting for its response (at most ``timeout`` seconds: then an error) before the next request, until
    all are sent or ``time_limit`` passes. Rate and latencies count the requests answered 200; the
    others are ``errors`` (``statuses`` has every status seen).

    ``warmup``: the first that many answered requests are left out of rate, latencies and client CPU,
    which start once they are answered (``warmed`` says how many were). The connections start together,
    so the first requests arrive as one burst and wait for one another's model batch: the steady state
    of ``concurrency`` clients begins after it. Errors are counted throughout."""
    if concurrency < 1 or warmup < 0:
        raise ValueError("concurrency must be >= 1 and warmup >= 0")
    return asyncio.run(_drive(host, port, requests, concurrency, time_limit, timeout, warmup))


def process_tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by a process and its live children (uvicorn's worker
    processes), from /proc; None where /proc is not there."""
    tick = os.sysconf("SC_CLK_TCK")
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after it start behind its ')'.
        fields = text[text.rindex(")") + 2:].split()
        this, parent = int(stat.parent.name), int(fields[1])
        if this == pid or parent == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
            found = True
    return total if found else None


def machine_cpu_s() -> tuple[float, float] | None:
    """CPU seconds of the whole machine so far, summed over its cores: (busy, idle), from /proc/stat's
    first line (idle counts I/O wait too: a core waiting on a disk does no work). None where /proc/stat
    is not there. Read before and after a load phase, idle over the phase's seconds says how many cores
    stood idle while it ran."""
    try:
        line = Path("/proc/stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    name, *ticks = line.split()
    if name != "cpu" or len(ticks) < 5:
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already): steal is
    # neither this machine's work nor idle, so it is left out.
    values = [int(t) for t in ticks[:8]]
    idle = values[3] + values[4]
    busy = sum(values[:3]) + sum(values[5:7])
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, idle / tick
