"""File rescans in worker processes (``rescan --processes N``): real interpreters started by the engine,
each loading the models and scoring into the test's SQLite database."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from service.container import Container, build_container
from service.settings import Settings
from service.storage.records import ScoreSource
from service.usecases.rescan import FileRescan, ListingRescanner, RescanWorkerError, ThreadedEngine
from service.usecases.rescan_processes import ProcessEngine
from tests.usecases.rescan_world import (
    World,
    assert_same_results,
    engine_rows,
    fresh_data_dir,
    listing,
    listings_dir,
    read_jsonl,
    settings,
    write_jsonl,
)

pytestmark = pytest.mark.slow


def test_worker_processes_score_a_file_as_the_threads_do(rescan_world: World, container: Container,
                                                         tmp_path: Path) -> None:
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    rows = engine_rows(w, instore=8)
    rows[5:5] = ["{broken", listing("missing", "nope.jpg")]
    src = write_jsonl(folder / "listings.jsonl", rows)

    job = FileRescan(src, tmp_path / "threads.jsonl")
    job.prepare()
    threads = job.run(ThreadedEngine(ListingRescanner(container.scorer, container.images, job.base), workers=2))

    data = fresh_data_dir(w, tmp_path / "data-processes")
    job = FileRescan(src, tmp_path / "processes.jsonl")
    job.prepare()
    ticks: list[int] = []
    # Chunks of 2 over 2 workers of 1 thread: every worker gets work, and the chunks come back out of
    # order, to be put back in input order.
    with ProcessEngine(settings(data), job.base, processes=2, threads=1, chunk=2) as engine:
        assert engine.start() == 2
        pids = {p.pid for p in engine._procs}
        procs = job.run(engine, progress=ticks.append)
    assert not engine._procs and all(not _alive(pid) for pid in pids)  # stopped on close

    results = read_jsonl(tmp_path / "processes.jsonl")
    valid = [r for r in rows if isinstance(r, dict) and r["listing_id"] != "missing"]
    assert [r["listing_id"] for r in results] == [r["listing_id"] for r in valid]  # input order
    assert_same_results(read_jsonl(tmp_path / "threads.jsonl"), results)
    assert read_jsonl(tmp_path / "processes.errors.jsonl") == read_jsonl(tmp_path / "threads.errors.jsonl")
    assert [(e["line"], e["code"]) for e in read_jsonl(tmp_path / "processes.errors.jsonl")] == \
           [(6, "invalid_line"), (7, "fetch_failed")]
    assert (procs.scored, procs.errors, procs.verdicts) == (threads.scored, threads.errors, threads.verdicts)
    assert procs.embedded == threads.embedded and sum(ticks) == len(rows)

    # The workers stored the scores in the data dir's database, as the threads do.
    c = build_container(settings(data), embedders=w.embedders, reconcile=False)
    try:
        for r in results:
            assert c.listings.history(r["listing_id"])[0].source is ScoreSource.RESCAN
        flagged = [r["listing_id"] for r in results if r["verdict"] != "clear"]
        assert flagged and all(any(lid in {i.listing_id for i in c.listings.review_queue(brand)}
                                   for brand in ("arla", "alpro", "tropicana", "garant")) for lid in flagged)
    finally:
        c.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (reaped by wait() in close).
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_worker_that_dies_fails_the_run_and_resume_finishes_it(rescan_world: World, tmp_path: Path) -> None:
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    rows = [listing(f"L{i:02d}", name) for i, (_, name) in enumerate(w.instore[:30])]
    src = write_jsonl(folder / "listings.jsonl", rows)
    s = settings(fresh_data_dir(w, tmp_path / "data"))
    out = tmp_path / "out.jsonl"

    job = FileRescan(src, out, checkpoint_every=1)
    job.prepare()
    engine = ProcessEngine(s, job.base, processes=2, threads=1, chunk=2)
    engine.start()
    victim = engine._procs[1]
    seen: list[int] = []

    def kill_after_four(n: int) -> None:
        seen.append(n)
        if len(seen) == 4:
            os.kill(victim.pid, signal.SIGKILL)

    try:
        with pytest.raises(RescanWorkerError, match=r"rescan worker 1 died \(exit code -9\)"):
            job.run(engine, progress=kill_after_four)
    finally:
        engine.close()
    done = read_jsonl(out)  # whole lines only, every one committed before the error
    assert 4 <= len(done) < len(rows)

    job = FileRescan(src, out, resume=True)
    assert job.prepare().count == len(done)
    with ProcessEngine(s, job.base, processes=2, threads=1, chunk=2) as engine:
        summary = job.run(engine)
    assert summary.scored == len(rows) - len(done) and summary.skipped == len(done)
    assert sorted(r["listing_id"] for r in read_jsonl(out)) == [r["listing_id"] for r in rows]


def test_a_worker_that_cannot_start_says_why(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # The data dir is a file: building the container fails in worker 0, which the driver reports.
    (tmp_path / "not-a-dir").write_text("x")
    s = Settings(data_dir=tmp_path / "not-a-dir", models={"ocr": "never"})
    engine = ProcessEngine(s, tmp_path, processes=2, threads=1)
    with pytest.raises(RescanWorkerError, match=r"(?s)rescan worker 0 failed to start:.*Error"):
        engine.start()
    assert "Traceback" not in capfd.readouterr().err  # told once, by the error (the worker is quiet)
    assert engine._procs == []  # the workers were stopped
    with pytest.raises(ValueError, match="processes"):
        ProcessEngine(s, tmp_path, processes=0)


def test_each_worker_sizes_its_models_by_its_share_of_the_cores(tmp_path: Path) -> None:
    """With a process per core a worker has one core: one ONNX Runtime thread a model and one shared
    model thread (more model threads on one core only cost); a number set holds."""
    cores = os.cpu_count() or 1
    s = Settings(data_dir=tmp_path, models={"ocr": "never"})
    m = ProcessEngine(s, tmp_path, processes=cores, threads=1).settings.models
    assert (m.intra_op_threads, m.shared_threads) == (1, 1)
    # The same where the provider is "auto" (CUDA if there is one): a CPU run must not take the machine's.
    auto = Settings(data_dir=tmp_path, models={"ocr": "never", "provider": "auto"})
    a = ProcessEngine(auto, tmp_path, processes=cores, threads=1).settings.models
    assert a.process_cores == 1 and a.shared_threads_for("cpu", a.process_cores, a.intra_op_threads) == 1
    if cores >= 2:
        m = ProcessEngine(s, tmp_path, processes=1, threads=1).settings.models
        assert m.intra_op_threads == cores // 2 and m.shared_threads == 2
    s = Settings(data_dir=tmp_path, models={"ocr": "never", "shared_threads": 3})
    assert ProcessEngine(s, tmp_path, processes=cores, threads=1).settings.models.shared_threads == 3
