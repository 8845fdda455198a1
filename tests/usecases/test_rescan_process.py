"""The API's background stored rescans in a child process: the same results as in the server's own
process, one child kept between jobs, a new one after a child died."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from service.container import Container
from service.rescan_process import StoredRescanProcess
from service.usecases.rescan import RescanRequest, rescan_in_this_process
from tests.usecases.rescan_world import World, listing, listings_dir, write_jsonl
from tests.usecases.test_rescan import run_file

pytestmark = pytest.mark.slow


def test_jobs_run_in_one_child_with_the_servers_results(rescan_world: World, container: Container,
                                                        tmp_path: Path) -> None:
    folder = listings_dir(rescan_world, tmp_path / "in")
    rows = [listing(f"s-{i}", name) for i, (_, name) in enumerate(rescan_world.instore[:6])]
    rows += [listing(f"c-{sku}", name, price=4.0) for sku, name in list(rescan_world.copies.items())[:3]]
    run_file(container, write_jsonl(folder / "l.jsonl", rows), tmp_path / "o.jsonl")
    never = threading.Event()
    here = rescan_in_this_process(container.scorer, container.listings)
    assert here(RescanRequest(), never).scanned == len(rows)  # (the file run's results, as a stored rescan has them)
    latest = {r.listing_id: r.latest_digest for r in container.listings.iter_stored()}

    process = StoredRescanProcess(container.settings, nice=5)
    try:
        assert process.child_pid() is None  # nothing started before the first job
        report = process(RescanRequest(), never)
        # Every listing re-matched in the child, and every result equal to the one this process stored.
        assert report.scanned == report.rescored == len(rows) and report.written == 0
        assert {r.listing_id: r.latest_digest for r in container.listings.iter_stored()} == latest
        pid = process.child_pid()
        assert pid is not None and pid != os.getpid()
        assert process(RescanRequest(brand="arla"), never).scanned >= 1
        assert process.child_pid() == pid and process.started == 1  # kept between jobs
        assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 5

        os.kill(pid, signal.SIGKILL)  # killed between jobs (out of memory, an operator)
        with pytest.raises(BrokenProcessPool):
            process(RescanRequest(), never)
        assert process(RescanRequest(), never).rescored == len(rows)  # a new child
        assert process.started == 2 and process.child_pid() not in (None, pid)
    finally:
        process.close()
