"""Rescans on real models, photos, FAISS indexes and SQLite: a file rescan through the threaded engine,
stored rescans (no model runs) after a brand adds a reference, and the background scheduler."""

from __future__ import annotations

import gc
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from embeddings.thread_batcher import ThreadBatcher
from index import FaissReferenceIndex
from service.container import Container, build_container
from service.domain.model import Listing, Money, ReferenceKind, ScoreResult, Verdict
from service.storage.listings import ListingRepository
from service.storage.records import ReviewStatus, ScoreSource
from service.usecases.catalog import ReferenceUpload
from service.usecases.rescan import (
    CancelFlag,
    FileRescan,
    ListingRescanner,
    RescanRequest,
    RescanWorkerError,
    StoredRescanJob,
    StoredRescanReport,
    StoredRescanScheduler,
    ThreadedEngine,
    rescan_in_this_process,
)
from service.usecases.rescan_io import JsonlJournal
from tests.usecases.rescan_world import (
    CATALOG,
    LATE_REFERENCE,
    World,
    fresh_data_dir,
    listing,
    listings_dir,
    read_jsonl,
    settings,
    write_jsonl,
)

pytestmark = pytest.mark.slow

RESULT_KEYS = {"listing_id", "risk", "verdict", "brand", "matches", "reasons"}
MATCH_KEYS = {"brand", "sku", "ref_id", "kind", "signal", "similarity", "image_index"}
OWNER = {sku: brand for brand, skus in CATALOG.items() for sku in skus}


def run_file(c: Container, listings: Path, out: Path, **kw: Any) -> Any:
    job = FileRescan(listings, out, **kw)
    job.prepare()
    return job.run(ThreadedEngine(ListingRescanner(c.scorer, c.images, job.base), workers=4))


def images_run(c: Container) -> int:
    return sum(e.embedder.images_run for e in c.embedders.values() if isinstance(e.embedder, ThreadBatcher))


def test_a_file_rescan_scores_real_photos_into_the_contract(rescan_world: World, container: Container,
                                                            tmp_path: Path) -> None:
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    copies = ["Arla-Standard-Milk", "Alpro-Shelf-Soy-Milk", "Tropicana-Apple-Juice", "Garant-Ecological-Standard-Milk"]
    rows = [listing(f"copy-{i}", w.copies[sku], price=3.0) for i, sku in enumerate(copies)]
    rows += [listing(f"store-{i}", name) for i, (_, name) in enumerate(w.instore[:4])]
    rows += [listing("two-photos", None, images=[f"photos/{w.instore[5][1]}", f"photos/{w.copies['Arla-Sour-Milk']}"]),
             listing("no-photo", None, title="plain text listing")]
    src = write_jsonl(folder / "listings.jsonl", rows)

    summary = run_file(container, src, tmp_path / "out.jsonl")
    results = read_jsonl(tmp_path / "out.jsonl")
    assert [r["listing_id"] for r in results] == [r["listing_id"] for r in rows]  # input order
    assert summary.scored == len(rows) and summary.errors == 0
    assert sum(summary.verdicts.values()) == len(rows)
    assert summary.verdicts == {v: sum(r["verdict"] == v for r in results) for v in summary.verdicts}
    distinct_photos = len({p for r in rows for p in r["images"]})
    assert all(n == distinct_photos for n in summary.embedded.values())
    for r in results:
        assert set(r) == RESULT_KEYS
        assert r["verdict"] in {v.value for v in Verdict} and 0.0 <= r["risk"] <= 1.0
        sims = [m["similarity"] for m in r["matches"]]
        assert sims == sorted(sims, reverse=True)
        for m in r["matches"]:
            # A box (where in the photo) comes with the matches that locate the reference: keypoints, logos.
            assert set(m) - {"box"} == MATCH_KEYS and m["kind"] == "product"
            assert ("box" in m) == (m["signal"] in ("keypoints", "logo"))

    by_id = {r["listing_id"]: r for r in results}
    for i, sku in enumerate(copies):
        r = by_id[f"copy-{i}"]
        assert r["verdict"] != "clear", r  # a cheap edited copy of the brand's own photo
        assert r["brand"] == OWNER[sku]
        best_copy = next(m for m in r["matches"] if m["signal"] == "copy")
        assert (best_copy["brand"], best_copy["sku"], best_copy["ref_id"]) == (OWNER[sku], sku, f"ref-{sku}")
        assert best_copy["image_index"] == 0
    second = next(m for m in by_id["two-photos"]["matches"] if m["signal"] == "copy")
    assert (second["sku"], second["image_index"]) == ("Arla-Sour-Milk", 1)
    assert by_id["no-photo"]["matches"] == [] and by_id["no-photo"]["verdict"] == "clear"

    # Stored like any score: the review queue and the history see the rescan.
    stored = container.listings.get_listing("copy-0")
    assert stored is not None and stored.latest_verdict.value == by_id["copy-0"]["verdict"]
    assert container.listings.history("copy-0")[0].source is ScoreSource.RESCAN
    queue = container.listings.review_queue("arla")
    assert "copy-0" in {item.listing_id for item in queue}

    # Photos seen once are never embedded again: a second run is all cache hits and scores the same.
    before = images_run(container)
    seen_before = container.listings.get_listing("no-photo")
    again = run_file(container, src, tmp_path / "again.jsonl")
    # A listing whose content and result did not change gets no second history row, only a later sighting.
    seen_again = container.listings.get_listing("no-photo")
    assert seen_before is not None and seen_again is not None
    assert len(container.listings.history("no-photo")) == 1
    assert seen_again.last_seen_at > seen_before.last_seen_at
    # The summary counts them: every listing of the first run was new, and in the second one the
    # listings with one history row are exactly those it found unchanged.
    assert summary.unchanged == 0
    assert again.unchanged == sum(len(container.listings.history(r["listing_id"])) == 1 for r in rows) >= 1
    assert images_run(container) == before
    assert sum(again.embedded.values()) == 0 and sum(again.cache_hits.values()) == 2 * distinct_photos
    assert [(r["listing_id"], r["verdict"], r["matches"]) for r in read_jsonl(tmp_path / "again.jsonl")] == \
           [(r["listing_id"], r["verdict"], r["matches"]) for r in results]


def test_a_photo_whose_body_does_not_decode_goes_to_the_errors_file(rescan_world: World, container: Container,
                                                                    tmp_path: Path) -> None:
    """Photos are checked and hashed when loaded and decoded when first embedded: a truncated JPEG passes
    the first step and fails the second, for its own line only (its chunk neighbours are scored)."""
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    good = w.copies["Arla-Sour-Milk"]
    data = (folder / "photos" / good).read_bytes()
    (folder / "photos" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    rows = [listing("before", good), listing("broken", "truncated.jpg"), listing("after", good)]
    src = write_jsonl(folder / "listings.jsonl", rows)
    summary = run_file(container, src, tmp_path / "out.jsonl")
    assert (summary.scored, summary.errors) == (2, 1)
    assert [r["listing_id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["before", "after"]
    [err] = read_jsonl(tmp_path / "out.errors.jsonl")
    assert (err["line"], err["listing_id"], err["code"], err["field"]) == (2, "broken", "decode_failed", "images[0]")
    assert container.listings.get_listing("broken") is None


def test_stored_rescan_flags_a_listing_once_its_brand_adds_the_reference(rescan_world: World,
                                                                          container: Container,
                                                                          tmp_path: Path) -> None:
    w = rescan_world
    brand, sku = LATE_REFERENCE
    folder = listings_dir(w, tmp_path / "in")
    rows = [listing("late-copy", w.copies[sku], price=3.0, title="vanilla yoghurt")]
    rows += [listing(f"store-{i}", name) for i, (_, name) in enumerate(w.instore[:5])]
    run_file(container, write_jsonl(folder / "listings.jsonl", rows), tmp_path / "first.jsonl")
    before = {r["listing_id"]: r for r in read_jsonl(tmp_path / "first.jsonl")}
    assert before["late-copy"]["verdict"] == "clear"
    assert all(m["brand"] != brand for m in before["late-copy"]["matches"])
    # A listing stored from elsewhere whose photo was never embedded with these models.
    ghost = ScoreResult(listing_id="ghost", risk=0.0, verdict=Verdict.CLEAR, brand=None, matches=[],
                        signals=[], reasons=[])
    container.listings.record_score(Listing("ghost", "x"), ghost, "api", image_sha256s=["0" * 64])

    added = container.catalog.add([ReferenceUpload(
        brand=brand, kind=ReferenceKind.PRODUCT, data=w.late_photo.read_bytes(), source="test", sku=sku,
        ref_id=f"ref-{sku}", price=Money(20.0, "USD"))])
    models_before = images_run(container)

    # Limited to the listings near the new reference: the copy is re-matched, the others are not.
    journal = JsonlJournal(tmp_path / "near.jsonl", append=False)
    near = StoredRescanJob(container.scorer, container.listings, workers=2, results=journal,
                           near_references=[added[0].reference.sha256]).run()
    journal.close()
    near_ids = [r["listing_id"] for r in read_jsonl(tmp_path / "near.jsonl")]
    assert "late-copy" in near_ids and "ghost" not in near_ids
    assert near.scanned == 7 and near.not_near == 7 - near.rescored - near.missing_embeddings > 0
    assert near.newly_flagged == 1 and near.missing_embeddings == 1
    assert images_run(container) == models_before  # stored embeddings only: no model ran
    assert container.listings.history("late-copy")[0].source is ScoreSource.STORED_RESCAN

    # Everything: the same verdicts, and still no model run.
    journal = JsonlJournal(tmp_path / "stored.jsonl", append=False)
    report = StoredRescanJob(container.scorer, container.listings, workers=2, results=journal).run()
    journal.close()
    assert images_run(container) == models_before
    assert (report.scanned, report.rescored, report.missing_embeddings, report.errors) == (7, 6, 1, 0)
    assert report.newly_flagged == 0 and report.not_near == 0  # the near job already flagged it
    after = {r["listing_id"]: r for r in read_jsonl(tmp_path / "stored.jsonl")}
    assert after.keys() == before.keys()
    flagged = after["late-copy"]
    assert flagged["verdict"] != "clear" and flagged["brand"] == brand
    best = next(m for m in flagged["matches"] if m["signal"] == "copy")
    assert (best["brand"], best["sku"]) == (brand, sku)
    stored = container.listings.get_listing("late-copy")
    assert stored is not None and stored.latest_brand == brand and stored.latest_verdict is not Verdict.CLEAR
    assert container.listings.history("late-copy")[0].source is ScoreSource.STORED_RESCAN
    items = container.listings.review_queue(brand)
    assert [(i.listing_id, i.status) for i in items] == [("late-copy", ReviewStatus.OPEN)]
    for lid, r in before.items():  # listings the new reference does not concern keep their verdicts
        if lid != "late-copy":
            assert after[lid]["verdict"] == r["verdict"], lid

    # Limited to the brand: only listings whose latest matches or review items involve it.
    scoped = StoredRescanJob(container.scorer, container.listings, brand=brand)
    n = scoped.count()
    assert n >= 1
    again = scoped.run()
    assert (again.scanned, again.rescored, again.changed) == (n, n, 0)


def test_stored_rescan_in_worker_processes_equals_the_threaded_one(rescan_world: World, tmp_path: Path) -> None:
    """Two data dirs in the same state; the late reference added to both; one re-matched by threads, the
    other by two forked processes (pages of 2, so both have work): the same results, reports, scores and
    review queue, written by the children."""
    w = rescan_world
    brand, sku = LATE_REFERENCE
    folder = listings_dir(w, tmp_path / "in")
    rows = [listing("late-copy", w.copies[sku], price=3.0, title="vanilla yoghurt")]
    rows += [listing(f"store-{i}", name) for i, (_, name) in enumerate(w.instore[:9])]
    src = write_jsonl(folder / "listings.jsonl", rows)
    got = {}
    for mode in ("threads", "processes"):
        c = build_container(settings(fresh_data_dir(w, tmp_path / mode)), embedders=w.embedders)
        try:
            run_file(c, src, tmp_path / f"{mode}-first.jsonl")
            c.catalog.add([ReferenceUpload(brand=brand, kind=ReferenceKind.PRODUCT, data=w.late_photo.read_bytes(),
                                           source="test", sku=sku, ref_id=f"ref-{sku}", price=Money(20.0, "USD"))])
            journal = JsonlJournal(tmp_path / f"{mode}.jsonl", append=False)
            ticks: list[int] = []
            job = StoredRescanJob(c.scorer, c.listings, results=journal, page=2, workers=1,
                                  processes=2 if mode == "processes" else 1, resources=c.db)
            report = job.run(progress=ticks.append)
            journal.close()
            got[mode] = (report, {r["listing_id"]: r for r in read_jsonl(tmp_path / f"{mode}.jsonl")},
                         {r["listing_id"]: (c.listings.history(r["listing_id"])[0].source, c.listings.history(
                             r["listing_id"])[0].verdict) for r in rows},
                         [(i.listing_id, i.status) for i in c.listings.review_queue(brand)], sum(ticks))
        finally:
            c.close()
    (threads, t_results, t_latest, t_queue, t_ticks), (procs, p_results, p_latest, p_queue, p_ticks) = \
        got["threads"], got["processes"]
    assert p_results == t_results and len(p_results) == len(rows)
    assert p_latest == t_latest and p_latest["late-copy"][0] is ScoreSource.STORED_RESCAN
    assert p_queue == t_queue == [("late-copy", ReviewStatus.OPEN)]
    fields = ("scanned", "rescored", "written", "changed", "newly_flagged", "errors", "verdicts", "cancelled")
    assert [getattr(procs, f) for f in fields] == [getattr(threads, f) for f in fields]
    assert (procs.scanned, procs.newly_flagged, p_ticks, t_ticks) == (len(rows), 1, len(rows), len(rows))


def test_stored_rescan_worker_processes_inherit_the_catalog_facts(container: Container, rescan_world: World,
                                                                  tmp_path: Path) -> None:
    """The brands' names, policies and authorized sellers are read once, before the fork: no child reads
    them again on its first page (each statement is logged with the process that ran it)."""
    folder = listings_dir(rescan_world, tmp_path / "in")
    rows = [listing(f"s-{i}", name) for i, (_, name) in enumerate(rescan_world.instore[:6])]
    run_file(container, write_jsonl(folder / "l.jsonl", rows), tmp_path / "o.jsonl")
    container.scorer.catalog_changed()  # forget what the file rescan read
    log = tmp_path / "statements.log"

    def logged(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\t{' '.join(statement.split())}\n")

    sa.event.listen(container.db.engine, "before_cursor_execute", logged)
    try:
        report = StoredRescanJob(container.scorer, container.listings, page=2, workers=1, processes=2,
                                 resources=container.db).run()
    finally:
        sa.event.remove(container.db.engine, "before_cursor_execute", logged)
    assert report.rescored == len(rows)
    lines = [line.split("\t", 1) for line in log.read_text().splitlines()]
    children = {pid for pid, _ in lines} - {str(os.getpid())}
    assert len(children) == 2  # both children queried (their pages)
    catalog_reads = [(pid, sql) for pid, sql in lines if "FROM authorized_sellers" in sql or "aliases" in sql]
    assert catalog_reads and {pid for pid, _ in catalog_reads} == {str(os.getpid())}
    assert gc.get_freeze_count() == 0  # the parent's objects are collected again after the fork
    gc.freeze()  # what a server froze after start-up stays frozen through a rescan's fork
    try:
        frozen = gc.get_freeze_count()
        StoredRescanJob(container.scorer, container.listings, page=2, workers=1, processes=2,
                        resources=container.db).run()
        assert gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()


def test_stored_rescan_worker_processes_inherit_the_open_indexes(
        container: Container, rescan_world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process (as the CLI) opens its indexes before it forks: no child loads an index file."""
    folder = listings_dir(rescan_world, tmp_path / "in")
    rows = [listing(f"s-{i}", name) for i, (_, name) in enumerate(rescan_world.instore[:6])]
    run_file(container, write_jsonl(folder / "l.jsonl", rows), tmp_path / "o.jsonl")
    log = tmp_path / "loads.log"
    real = FaissReferenceIndex.load.__func__  # type: ignore[attr-defined]

    def load(cls: type[FaissReferenceIndex], /, directory: Path, **kw: Any) -> FaissReferenceIndex:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return cast(FaissReferenceIndex, real(cls, directory, **kw))

    monkeypatch.setattr(FaissReferenceIndex, "load", classmethod(load))  # (a fork inherits the patch)
    fresh = build_container(container.settings, embedders=rescan_world.embedders, reconcile=False)
    try:
        report = StoredRescanJob(fresh.scorer, fresh.listings, page=2, workers=1, processes=2,
                                 resources=fresh.db).run()
    finally:
        fresh.close()
    assert report.rescored == len(rows)
    loads = log.read_text().split()
    assert loads and set(loads) == {str(os.getpid())}  # the copy and lookalike indexes, in the parent only


def test_a_failed_worker_process_fails_the_stored_rescan(rescan_world: World, container: Container,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    folder = listings_dir(rescan_world, tmp_path / "in")
    rows = [listing(f"s-{i}", name) for i, (_, name) in enumerate(rescan_world.instore[:6])]
    run_file(container, write_jsonl(folder / "l.jsonl", rows), tmp_path / "o.jsonl")
    job = StoredRescanJob(container.scorer, container.listings, page=2, processes=2, resources=container.db)

    cancel = threading.Event()
    cancel.set()  # Ctrl-C before the first page: every worker stops, nothing re-matched
    stopped = job.run(cancel=cancel)
    assert stopped.cancelled and stopped.scanned == 0

    real = ListingRepository.iter_stored

    def broken(self: ListingRepository, brand: str | None = None, since: datetime | None = None,
               batch_size: int = 500, shard: tuple[int, int] | None = None) -> Any:
        if shard == (1, 2):  # only in the second child (a fork inherits the patch)
            raise RuntimeError("the disk is on fire")
        return real(self, brand, since, batch_size, shard)

    monkeypatch.setattr(ListingRepository, "iter_stored", broken)
    capfd.readouterr()
    with pytest.raises(RescanWorkerError, match=r"worker 1 failed:(?s:.*)the disk is on fire"):
        job.run()
    assert "the disk is on fire" not in capfd.readouterr().err  # the error carries it; the child is quiet
    monkeypatch.undo()
    assert job.run().rescored == len(rows)  # the parent's database still works after the children
    with pytest.raises(ValueError, match="processes"):
        StoredRescanJob(container.scorer, container.listings, processes=2)  # nothing to reopen in the children


def test_the_scheduler_runs_requested_rescans_in_the_background(rescan_world: World, container: Container,
                                                                 tmp_path: Path) -> None:
    folder = listings_dir(rescan_world, tmp_path / "in")
    rows = [listing(f"s-{i}", name) for i, (_, name) in enumerate(rescan_world.instore[:3])]
    run_file(container, write_jsonl(folder / "l.jsonl", rows), tmp_path / "o.jsonl")
    asked: list[RescanRequest] = []
    here = rescan_in_this_process(container.scorer, container.listings)

    def run(req: RescanRequest, cancel: CancelFlag) -> StoredRescanReport:
        asked.append(req)
        return here(req, cancel)

    scheduler = StoredRescanScheduler(run)
    try:
        scheduler.request(brand="arla")
        scheduler.request()
        scheduler.request(brand="alpro")  # covered by the pending rescan of everything
        scheduler.request(near_references=["0" * 64])
        assert scheduler.wait_idle(timeout=120)
        assert asked in ([RescanRequest(brand="arla"), RescanRequest()], [RescanRequest()])
        assert scheduler.runs == len(asked)
        last = scheduler.status()["last"]
        assert last is not None and last["brand"] is None and last["scanned"] == 3 and last["rescored"] == 3
        assert scheduler.status()["running"] is None and scheduler.status()["pending"] == []
        with pytest.raises(ValueError):
            scheduler.request(brand="arla", near_references=["0" * 64])
    finally:
        scheduler.close()
    with pytest.raises(RuntimeError):
        scheduler.request()
