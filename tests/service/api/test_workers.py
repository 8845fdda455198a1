"""``serve --workers N``: worker processes on SO_REUSEPORT sockets (service/api/workers.py). Real processes
and real sockets; the app is a tiny factory that answers its process id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.api.workers import ReusePortSupervisor, reuse_port_supported

pytestmark = pytest.mark.skipif(not reuse_port_supported(), reason="the platform has no SO_REUSEPORT")

REPO = Path(__file__).resolve().parents[3]
APP = "tests.service.api.pid_app:app_factory"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, sock: socket.socket | None = None, path: str = "/") -> int:
    """GET / (on ``sock``, kept open, or on a new connection): the pid that answered (``path`` /workers:
    the workers it was told there are)."""
    own = sock is None
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return int(data.split(b"\r\n\r\n", 1)[1])
    finally:
        if own:
            s.close()


def _supervisor(port: int, workers: int, app: str = APP) -> subprocess.Popen[bytes]:
    code = ("import sys; from service.api.workers import ReusePortSupervisor; "
            f"sys.exit(ReusePortSupervisor('127.0.0.1', {port}, {workers}, app={app!r}, log_level='warning').run())")
    env = {k: v for k, v in os.environ.items() if k != "COUNTERLENS_SERVER__WORKERS"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)


def _pids_until(port: int, want: int, timeout: float = 60.0) -> set[int]:
    """The pids answering new connections, once ``want`` distinct ones have answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.add(_get(port))
        except OSError:
            time.sleep(0.2)
        if len(seen) >= want:
            return seen
    raise AssertionError(f"only {seen} answered")


def test_connections_opened_together_are_spread_over_the_workers_and_a_dead_worker_is_replaced() -> None:
    port = _free_port()
    sup = _supervisor(port, 2)
    try:
        first = _pids_until(port, 2)
        # 16 keep-alive connections opened at once, as a platform's client pool does: with one shared
        # socket the idle worker took them all; here each worker gets some (all on one: p = 2 / 2**16).
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(16)]
        try:
            by_conn = [_get(port, c) for c in conns]
            assert set(by_conn) == first
            assert [_get(port, c) for c in conns] == by_conn  # a connection stays with its worker
            # Each worker is told how many share the machine (the supervisor's environment does not say).
            assert {_get(port, c, "/workers") for c in conns} == {2}
        finally:
            for c in conns:
                c.close()
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        after = _pids_until(port, 2)
        assert victim not in after and len(after & first) == 1  # replaced; the other worker kept going
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
    with pytest.raises(OSError):
        _get(port)  # every worker stopped with it


def test_workers_that_cannot_start_end_the_supervisor_with_their_status() -> None:
    sup = _supervisor(_free_port(), 2, app="tests.service.api.no_such_module:app_factory")
    try:
        status = sup.wait(120)
    finally:
        sup.kill()
    assert status != 0
    assert sup.stderr is not None and b"exited with status" in sup.stderr.read()


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_already_listened_on_is_refused_before_any_worker_starts(reuse_port: bool) -> None:
    """Also a listener with SO_REUSEPORT (a second supervisor, an earlier one's orphans): the kernel would
    let the new workers join its group and share the connections."""
    with socket.socket() as holder:
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError):
            ReusePortSupervisor("127.0.0.1", holder.getsockname()[1], 2, app=APP).run()


def test_sighup_replaces_the_workers_while_the_port_keeps_answering() -> None:
    port = _free_port()
    sup = _supervisor(port, 2)
    try:
        first = _pids_until(port, 2)
        sup.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(_alive(pid) for pid in first):
            _get(port)  # raises where no worker accepts: the port must answer throughout
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in first)  # both old workers stopped...
        assert len(_pids_until(port, 2) - first) == 2  # ...and two new ones answer
        assert sup.poll() is None
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0


def test_workers_stop_by_themselves_when_the_supervisor_is_killed() -> None:
    port = _free_port()
    sup = _supervisor(port, 2)
    workers = _pids_until(port, 2)
    sup.kill()
    sup.wait(10)
    deadline = time.monotonic() + 30
    alive = set(workers)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _alive(pid)}
        time.sleep(0.2)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone
