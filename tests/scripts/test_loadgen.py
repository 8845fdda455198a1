"""The benchmarks' load generator against a real local HTTP/1.1 server (keep-alive, Content-Length and
chunked answers, errors and a server that never answers)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scripts.loadgen import LoadResult, machine_cpu_s, post_load, post_request


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/hang":
            time.sleep(3)
        if self.path == "/slow":
            time.sleep(0.4)
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (body[:3], body[3:], b""):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            return
        status = 500 if self.path == "/err" else 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_answers_errors_and_timeouts_are_told_apart(server: int) -> None:
    reqs = ([post_request("127.0.0.1", server, "/ok", b'{"a": 1}')] * 20
            + [post_request("127.0.0.1", server, "/chunked", b'{"chunked": true}')] * 5
            + [post_request("127.0.0.1", server, "/err", b"{}")] * 3)
    got = post_load("127.0.0.1", server, reqs, concurrency=4)
    assert got.n == 25 and got.errors == 3 and got.statuses == {200: 25, 500: 3}
    assert got.rate > 0 and got.percentile_ms(0.99) >= got.percentile_ms(0.5) > 0

    hung = post_load("127.0.0.1", server, [post_request("127.0.0.1", server, "/hang", b"{}")], 1, timeout=0.5)
    assert hung.n == 0 and hung.errors == 1


def test_warm_up_requests_are_left_out_of_the_figures(server: int) -> None:
    reqs = ([post_request("127.0.0.1", server, "/slow", b"{}")] * 2
            + [post_request("127.0.0.1", server, "/ok", b"{}")] * 10)
    whole = post_load("127.0.0.1", server, reqs, concurrency=1)
    assert (whole.n, whole.warmed) == (12, 0) and whole.percentile_ms(0.99) >= 400 and whole.elapsed_s >= 0.8
    warm = post_load("127.0.0.1", server, reqs, concurrency=1, warmup=2)
    assert (warm.n, warm.warmed, warm.errors) == (10, 2, 0)
    # The slow first two are neither in the latencies nor in the time the rate is measured over.
    assert warm.percentile_ms(0.99) < 300 and warm.elapsed_s < whole.elapsed_s - 0.6 and warm.rate > whole.rate


def test_bad_concurrency_is_refused() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        post_load("127.0.0.1", 1, [], concurrency=0)
    with pytest.raises(ValueError, match="warmup"):
        post_load("127.0.0.1", 1, [], concurrency=1, warmup=-1)


def test_a_percentile_names_the_slowest_latency_it_reads() -> None:
    got = LoadResult(latencies_s=[i / 1000 for i in range(1, 301)])  # 1 .. 300 ms
    assert got.slowest_rank(0.99) == 3 and got.percentile_ms(0.99) == 298.0
    assert got.slowest_rank(0.5) == 150 and got.percentile_ms(0.5) == 151.0
    assert LoadResult(latencies_s=[0.005]).slowest_rank(0.99) == 1
    assert LoadResult().slowest_rank(0.99) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_machine_cpu_counts_every_core_and_this_threads_spinning() -> None:
    before = machine_cpu_s()
    assert before is not None
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.4:  # one core busy for 0.4 s
        pass
    after = machine_cpu_s()
    elapsed = time.perf_counter() - t0
    assert after is not None
    busy, idle = after[0] - before[0], after[1] - before[1]
    cores = os.cpu_count() or 1
    # Every core's time is either busy or idle (or stolen by the hypervisor, left out): at 100 ticks a
    # second, within a few ticks of the cores times the seconds.
    assert 0.7 * cores * elapsed <= busy + idle <= cores * elapsed + 0.05
    assert busy >= 0.3  # the spin alone
    assert idle >= 0 and busy >= 0


def test_machine_cpu_is_none_without_proc_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    import scripts.loadgen as loadgen

    class _NoProc:
        def __init__(self, *_: object) -> None:
            pass

        def read_text(self) -> str:
            raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr(loadgen, "Path", _NoProc)
    assert machine_cpu_s() is None
