"""Rescans: scoring a file of listings (``counterlens rescan LISTINGS --out RESULTS``) and re-matching
stored listings against the current catalog (``counterlens rescan --stored``, or a background job after
a brand's catalog changed).

Both run the one scoring path, :class:`~service.usecases.scoring.ListingScorer`, in batches: a file
rescan calls ``score_many`` on chunks of rows (embeddings from the content-hash cache or the models,
persisted with source ``rescan``), a stored rescan calls ``rescore_stored_many`` on pages of stored
listings (stored embeddings only, no model runs, source ``stored-rescan``, unchanged results not written
again), so the review queues and histories see every rescan.

A file rescan is an ordered pipeline. The driver reads and validates rows (bad lines go straight to
the errors journal with their line number); an engine scores the valid rows and yields their outcomes
in input order (:class:`ThreadedEngine` here: worker threads scoring chunks, whose model calls meet in
the shared micro-batchers, so decoding, inference and matching overlap; :class:`~service.usecases.rescan_ray.RayEngine`
on a Ray cluster); the driver appends each outcome to the results or errors journal and commits both
(whole lines, fsync) every ``checkpoint_every`` outcomes or ``checkpoint_seconds``. A resumed run reads
the journals back and skips the listing ids already in the results and the lines already in the errors.
"""

from __future__ import annotations

import copy
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.domain.model import Listing, Verdict
from service.domain.pricing import UnknownCurrencyError
from service.intake.errors import IntakeError
from service.storage.errors import StorageError
from service.storage.listings import ListingRepository
from service.storage.records import ListingRecord, ScoreSource
from service.usecases.embedding import CachedEmbedder, lookup_together
from service.usecases.listing_input import ListingImageLoader
from service.usecases.rescan_io import (
    JsonlJournal,
    ListingRow,
    RescanInputError,
    RowError,
    check_input,
    error_record,
    image_source,
    iter_raw_rows,
    parse_row,
    result_record,
)
from service.usecases.scoring import ListingScorer, ScoreOutcome, StoredListing

log = logging.getLogger("counterlens.rescan")

Progress = Callable[[int], None]

# ---------------------------------------------------------------------------------------------- one listing


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What became of one listing: a results record or an errors record, plus model use."""

    line: int
    listing_id: str | None
    record: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    embedded: dict[str, int] = field(default_factory=dict)
    cache_hits: dict[str, int] = field(default_factory=dict)
    written: bool = False  # a new score was stored (False: the same as stored, only marked seen; or failed)

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "listing_id": self.listing_id, "record": self.record, "error": self.error,
                "embedded": self.embedded, "cache_hits": self.cache_hits, "written": self.written}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RowOutcome:
        return cls(line=int(d["line"]), listing_id=d["listing_id"], record=d["record"], error=d["error"],
                   embedded=dict(d.get("embedded") or {}), cache_hits=dict(d.get("cache_hits") or {}),
                   written=bool(d.get("written")))

    @classmethod
    def failed(cls, line: int, listing_id: str | None, code: str, message: str,
               field: str | None) -> RowOutcome:
        return cls(line, listing_id, error=error_record(line, listing_id, code, message, field))


class ListingRescanner:
    """Loads one row's photos (paths inside ``base``, or URLs through the safe fetcher) and scores it.
    Never raises: every failure becomes an errors record naming the field. Thread-safe."""

    def __init__(self, scorer: ListingScorer, images: ListingImageLoader, base: Path, *,
                 persist: bool = True) -> None:
        self.scorer = scorer
        self.images = images
        self.base = base.resolve()
        self.persist = persist

    def rescan(self, row: ListingRow) -> RowOutcome:
        return self.rescan_many([row])[0]

    def rescan_many(self, rows: Sequence[ListingRow]) -> list[RowOutcome]:
        """Load every row's photos, then score the rows that loaded together (one model batch per model,
        one search per index, one transaction: :meth:`ListingScorer.score_many`). In the order of
        ``rows``."""
        out: list[RowOutcome | None] = [None] * len(rows)
        ready: list[tuple[int, Listing]] = []
        for i, row in enumerate(rows):
            got = self._load(row)
            if isinstance(got, RowOutcome):
                out[i] = got
            else:
                ready.append((i, got))
        if ready:
            try:
                # A listing whose content and result are what is stored is only marked seen: a rescan
                # after a catalog change writes the listings it changed.
                scored = self.scorer.score_many([lst for _, lst in ready], source=ScoreSource.RESCAN.value,
                                                persist=self.persist, skip_unchanged=True)
            except Exception as exc:  # the batch as a whole failed (the database is gone, say)
                scored = [exc] * len(ready)
            for (i, _), result in zip(ready, scored, strict=True):
                out[i] = self._outcome(rows[i], result)
        return [o for o in out if o is not None]

    def _load(self, row: ListingRow) -> Listing | RowOutcome:
        if row.price is not None and row.price.currency not in self.scorer.params.currencies:
            # Checked before the photos are loaded and embedded: the score would refuse it anyway.
            known = ", ".join(sorted(self.scorer.params.currencies.rates))
            return RowOutcome.failed(row.line, row.listing_id, "unknown_currency",
                                     f"unknown currency {row.price.currency!r} (known: {known})", "currency")
        try:
            sources = [image_source(ref, self.base, i) for i, ref in enumerate(row.images)]
            pictures = self.images.load(sources)
        except IntakeError as exc:
            return RowOutcome.failed(row.line, row.listing_id, exc.code.value, exc.message, exc.field)
        except Exception as exc:
            log.exception("loading a listing's photos failed", extra={"listing_id": row.listing_id, "line": row.line})
            return RowOutcome.failed(row.line, row.listing_id, "internal", f"{type(exc).__name__}: {exc}", None)
        return Listing(listing_id=row.listing_id, title=row.title, description=row.description,
                       price=row.price, seller=row.seller, images=tuple(pictures))

    @staticmethod
    def _outcome(row: ListingRow, got: ScoreOutcome | Exception) -> RowOutcome:
        if isinstance(got, ScoreOutcome):
            return RowOutcome(row.line, row.listing_id, record=result_record(got.result),
                              embedded=dict(got.embedded), cache_hits=dict(got.cache_hits), written=got.written)
        if isinstance(got, IntakeError):
            return RowOutcome.failed(row.line, row.listing_id, got.code.value, got.message, got.field)
        if isinstance(got, UnknownCurrencyError):
            return RowOutcome.failed(row.line, row.listing_id, "unknown_currency", str(got), "currency")
        if isinstance(got, StorageError):
            return RowOutcome.failed(row.line, row.listing_id, "invalid_input", got.message, got.field)
        # One listing's failure must never abort a rescan of millions.
        log.error("rescan of a listing failed", exc_info=got, extra={"listing_id": row.listing_id, "line": row.line})
        return RowOutcome.failed(row.line, row.listing_id, "internal", f"{type(got).__name__}: {got}", None)


# ---------------------------------------------------------------------------------------------- engines


class RescanEngine(Protocol):
    """Scores rows and yields their outcomes in the order of ``rows`` (pulling rows lazily)."""

    def process(self, rows: Iterator[ListingRow]) -> Iterator[RowOutcome]: ...


class ThreadedEngine:
    """The local engine: ``workers`` threads, each scoring ``chunk`` listings at a time (their photos
    in one model batch, their scores in one transaction), at most ``window`` chunks in flight. Outcomes
    leave in input order (the head of the window first), and a slow chunk stalls no worker.

    While one worker's chunk is in the models, the others decode photos and match: decoding, inference
    and matching overlap on both cores."""

    def __init__(self, rescanner: ListingRescanner, workers: int = 4, window: int | None = None,
                 chunk: int = 16) -> None:
        if workers < 1 or chunk < 1:
            raise ValueError("workers and chunk must be >= 1")
        self.rescanner = rescanner
        self.workers = workers
        self.chunk = chunk
        self.window = window or workers * 2

    def process(self, rows: Iterator[ListingRow]) -> Iterator[RowOutcome]:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rescan")
        pending: deque[Future[list[RowOutcome]]] = deque()
        try:
            while chunk := list(islice(rows, self.chunk)):
                pending.append(pool.submit(self.rescanner.rescan_many, chunk))
                while pending and (len(pending) >= self.window or pending[0].done()):
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- file rescan


@dataclass(slots=True)
class RescanSummary:
    """Counts of one run (a resumed run counts only what it did itself, plus ``skipped``)."""

    scored: int = 0
    unchanged: int = 0  # scored, and the same as stored: only marked seen (no history row)
    errors: int = 0
    skipped: int = 0  # done by an earlier, interrupted run (resume)
    verdicts: Counter[str] = field(default_factory=Counter)
    embedded: Counter[str] = field(default_factory=Counter)  # model id -> photos run through the model
    cache_hits: Counter[str] = field(default_factory=Counter)
    unknown_fields: set[str] = field(default_factory=set)
    elapsed_s: float = 0.0
    interrupted: bool = False

    @property
    def processed(self) -> int:
        return self.scored + self.errors

    @property
    def rate(self) -> float:
        """Listings (scored or failed) per second of this run."""
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"scored": self.scored, "unchanged": self.unchanged, "errors": self.errors, "skipped": self.skipped,
                "verdicts": {v.value: self.verdicts.get(v.value, 0) for v in Verdict},
                "embedded": dict(self.embedded), "cache_hits": dict(self.cache_hits),
                "elapsed_s": round(self.elapsed_s, 3), "listings_per_s": round(self.rate, 2),
                "interrupted": self.interrupted}


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """What earlier runs finished: listing ids with a result, line numbers with an error."""

    done_ids: frozenset[str] = frozenset()
    handled_lines: frozenset[int] = frozenset()

    @property
    def count(self) -> int:
        return len(self.done_ids) + len(self.handled_lines)


def default_errors_path(results: Path) -> Path:
    """``RESULTS.errors.jsonl`` beside the results (``out.jsonl`` -> ``out.errors.jsonl``)."""
    return results.with_name(results.stem + ".errors.jsonl")


class FileRescan:
    """``counterlens rescan LISTINGS --out RESULTS [--errors ERRORS] [--resume]``: the driver.

    :meth:`prepare` checks the files and reads the journals of an earlier run (raising
    :class:`RescanInputError` for anything that should stop the command before models load);
    :meth:`run` streams the rows through an engine and journals the outcomes.
    """

    def __init__(self, listings: Path, results: Path, errors: Path | None = None, *, resume: bool = False,
                 overwrite: bool = False, checkpoint_every: int = 64,
                 checkpoint_seconds: float = 1.0) -> None:
        if resume and overwrite:
            raise RescanInputError("--resume and --overwrite exclude each other")
        if checkpoint_every < 1 or checkpoint_seconds <= 0:
            raise RescanInputError("checkpoint_every must be >= 1 and checkpoint_seconds > 0")
        self.listings = listings
        self.results = results
        self.errors = errors if errors is not None else default_errors_path(results)
        self.resume = resume
        self.overwrite = overwrite
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.format = ""
        self.point = ResumePoint()

    @property
    def base(self) -> Path:
        """The folder relative image paths are resolved in (and confined to)."""
        return self.listings.resolve().parent

    def prepare(self) -> ResumePoint:
        self.format = check_input(self.listings)
        paths = {"LISTINGS": self.listings.resolve(), "--out": self.results.resolve(),
                 "--errors": self.errors.resolve()}
        if len(set(paths.values())) < len(paths):
            raise RescanInputError("LISTINGS, --out and --errors must be three different files")
        for flag in ("--out", "--errors"):
            p = paths[flag]
            if p.exists() and not p.is_file():
                raise RescanInputError(f"{flag} {p} exists and is not a file")
            if not p.parent.is_dir():
                raise RescanInputError(f"{flag}: the folder {p.parent} does not exist")
        if self.resume:
            done = {str(r.get("listing_id")) for r in JsonlJournal.recover(self.results)}
            lines = {int(r["line"]) for r in JsonlJournal.recover(self.errors)
                     if isinstance(r.get("line"), int)}
            self.point = ResumePoint(frozenset(done), frozenset(lines))
        elif not self.overwrite:
            for flag in ("--out", "--errors"):
                p = paths[flag]
                if p.exists() and p.stat().st_size > 0:
                    raise RescanInputError(f"{flag} {p} already holds results: pass --resume to continue "
                                           "that run or --overwrite to start again")
        return self.point

    def run(self, engine: RescanEngine, progress: Progress | None = None,
            stop: threading.Event | None = None) -> RescanSummary:
        """Rescan every listing not finished yet. Setting ``stop`` (the CLI does on Ctrl-C) ends the run
        after the outcome at hand: what was finished is committed and ``summary.interrupted`` is set, so
        ``--resume`` continues. A KeyboardInterrupt is handled the same way."""
        if not self.format:
            self.prepare()
        summary = RescanSummary()
        append = self.resume
        results = JsonlJournal(self.results, append=append)
        errors = JsonlJournal(self.errors, append=append)
        last_commit = time.monotonic()
        t0 = time.perf_counter()

        def maybe_commit() -> None:
            nonlocal last_commit
            now = time.monotonic()
            if (results.pending + errors.pending >= self.checkpoint_every
                    or now - last_commit >= self.checkpoint_seconds):
                results.commit()
                errors.commit()
                last_commit = now

        def failed(record: dict[str, Any]) -> None:
            errors.append(record)
            summary.errors += 1
            if progress:
                progress(1)
            maybe_commit()

        def rows() -> Iterator[ListingRow]:
            seen: dict[str, int] = {}
            for raw in iter_raw_rows(self.listings):
                if raw.line in self.point.handled_lines:
                    summary.skipped += 1
                    continue
                try:
                    row = parse_row(raw)
                except RowError as exc:
                    lid = raw.data.get("listing_id") if raw.data else None
                    failed(error_record(raw.line, lid if isinstance(lid, str) else None, "invalid_line",
                                        exc.message, exc.field))
                    continue
                summary.unknown_fields.update(row.unknown_fields)
                first = seen.get(row.listing_id)
                if first is not None:
                    failed(error_record(raw.line, row.listing_id, "duplicate",
                                        f"listing_id already appears on line {first}", "listing_id"))
                    continue
                seen[row.listing_id] = raw.line
                if row.listing_id in self.point.done_ids:
                    summary.skipped += 1
                    continue
                yield row

        outcomes = engine.process(rows())
        try:
            for outcome in outcomes:
                if outcome.record is not None:
                    results.append(outcome.record)
                    summary.scored += 1
                    summary.unchanged += not outcome.written
                    summary.verdicts[str(outcome.record["verdict"])] += 1
                    summary.embedded.update(outcome.embedded)
                    summary.cache_hits.update(outcome.cache_hits)
                    if progress:
                        progress(1)
                    maybe_commit()
                elif outcome.error is not None:
                    failed(outcome.error)
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            close = getattr(outcomes, "close", None)  # a generator engine: stop its workers now
            if close is not None:
                close()
            try:
                results.close()
            finally:
                errors.close()
            summary.elapsed_s = time.perf_counter() - t0
        return summary


# ---------------------------------------------------------------------------------------------- stored rescan


@dataclass(slots=True)
class StoredRescanReport:
    """What a stored rescan did."""

    brand: str | None = None
    since: datetime | None = None
    near_references: int = 0  # how many new references the job was limited to (0: not limited)
    scanned: int = 0  # stored listings looked at
    not_near: int = 0  # skipped: no photo comes near a new reference, nothing can change
    rescored: int = 0
    written: int = 0  # rescored listings whose result changed and was stored (the rest equal their latest)
    missing_embeddings: int = 0  # photos never embedded with the current models: rescan their file
    errors: int = 0
    changed: int = 0  # the verdict differs from the stored latest one
    newly_flagged: int = 0  # was clear, now review or likely_counterfeit
    verdicts: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    cancelled: bool = False

    @property
    def rate(self) -> float:
        return self.scanned / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"brand": self.brand, "since": self.since.isoformat() if self.since else None,
                "near_references": self.near_references, "scanned": self.scanned, "not_near": self.not_near,
                "rescored": self.rescored, "written": self.written, "missing_embeddings": self.missing_embeddings,
                "errors": self.errors, "changed": self.changed, "newly_flagged": self.newly_flagged,
                "verdicts": {v.value: self.verdicts.get(v.value, 0) for v in Verdict},
                "elapsed_s": round(self.elapsed_s, 3), "listings_per_s": round(self.rate, 2),
                "cancelled": self.cancelled}


class ForkableResources(Protocol):
    """What a process must reopen after a fork (the database's connections and write lock)."""

    def before_fork(self) -> None: ...

    def after_fork(self) -> None: ...


class ResultSink(Protocol):
    """Where a stored rescan puts its result records (a :class:`JsonlJournal`, or a worker's relay)."""

    def append(self, record: dict[str, Any]) -> None: ...

    def append_encoded(self, lines: Sequence[bytes]) -> None: ...

    @property
    def pending(self) -> int: ...

    def commit(self) -> None: ...


class CancelFlag(Protocol):
    """A ``threading.Event`` or, across processes, a ``multiprocessing.Event``: set means stop."""

    def is_set(self) -> bool: ...


def fork_available() -> bool:
    """Whether worker processes can be forked here (POSIX; not Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


def default_processes() -> int:
    """A rescan's worker processes: one per CPU, at most 8 (each file rescan worker loads the models)."""
    return min(os.cpu_count() or 1, 8)


def default_chunk(processes: int) -> int:
    """Listings a scoring thread of a file rescan takes at a time: 32 in worker processes (measured
    +15-25 % on cached photos over 16, docs/performance.md), 16 in one process, where a bigger chunk
    mostly holds more listings in flight."""
    return 32 if processes > 1 else 16


def default_stored_processes() -> int:
    """``rescan --stored``'s worker processes: :func:`default_processes` where they can be forked, else 1."""
    return default_processes() if fork_available() else 1


def default_stored_workers(processes: int) -> int:
    """``rescan --stored``'s threads per process: 1 beside other worker processes (re-matching is Python:
    a second thread of a process only shares its core), else 2 (one re-matches while one waits on SQL)."""
    return 1 if processes > 1 else 2


def _commit_if_due(sink: ResultSink | None, since: float) -> float:
    """Commit ``sink`` once 256 records (or progress ticks) wait or a second has passed since ``since``;
    answers when it was last committed."""
    if sink is not None and (sink.pending >= 256 or time.monotonic() - since > 1.0):
        sink.commit()
        return time.monotonic()
    return since


class _Relay:
    """A worker process's side of the pipe to the parent: result lines (JSON encoded here, so the parent
    only writes bytes) and progress, sent together at each commit."""

    def __init__(self, conn: Connection, keep_records: bool) -> None:
        self._conn = conn
        self._keep = keep_records
        self._lines: list[bytes] = []
        self._progress = 0

    def append(self, record: dict[str, Any]) -> None:
        if self._keep:
            self._lines.append(JsonlJournal.encode(record))

    def append_encoded(self, lines: Sequence[bytes]) -> None:
        if self._keep:
            self._lines.extend(lines)

    def progress(self, n: int) -> None:
        self._progress += n

    @property
    def pending(self) -> int:
        return self._progress

    def commit(self) -> None:
        if self._lines or self._progress:
            self._conn.send(("batch", self._progress, self._lines))
            self._lines, self._progress = [], 0


def _merge(into: StoredRescanReport, part: StoredRescanReport) -> None:
    for name in ("scanned", "not_near", "rescored", "written", "missing_embeddings", "errors", "changed",
                 "newly_flagged"):
        setattr(into, name, getattr(into, name) + getattr(part, name))
    into.verdicts.update(part.verdicts)
    into.cancelled = into.cancelled or part.cancelled


class RescanWorkerError(RuntimeError):
    """A worker process of a rescan (file or stored) failed to start or died; what was finished before
    stays recorded (a file rescan's journals: ``--resume`` continues)."""


class StoredRescanJob:
    """Re-match stored listings with their stored embeddings against the current catalog and record the
    new scores (review queues follow: see :meth:`ListingRepository.record_score`).

    Which listings:

    * all of them (``since``: only those the platforms sent since then);
    * ``brand``: those whose latest matches or review items involve the brand — what a brand needs after
      it removed references or changed its thresholds or authorized sellers;
    * ``near_references`` (content hashes of newly added *product* references): only listings with a
      photo whose stored embedding reaches the copy or lookalike signal's floor against one of them.
      Below the floors a match is no evidence, so for every other listing risk, verdict, brand and
      review items cannot change (only a weak match would be missing from its stored match list): after
      a brand adds references this re-matches the few listings concerned and only reads the others'
      embeddings.

    How: ``workers`` threads re-match pages of listings. Re-matching is Python (fusion, the stored
    results compared), so threads share one core; ``processes=N`` forks N worker processes, each
    re-matching the listings whose id is k modulo N with its own threads and database connections, and
    the parent only merges their reports and writes their result lines (in the order they arrive). Fork
    only from a process whose other threads hold no lock a child needs: the CLI, not the API server
    (its background job runs with one process). ``resources`` (the database) is reopened in each child;
    the children run no model (stored embeddings only), so the parent's model threads are not needed.

    Blocking and thread-safe; ``cancel`` stops it between pages.
    """

    def __init__(self, scorer: ListingScorer, listings: ListingRepository, *, brand: str | None = None,
                 since: datetime | None = None, near_references: Sequence[str] = (), workers: int = 2,
                 results: ResultSink | None = None, persist: bool = True, page: int = 256,
                 processes: int = 1, resources: ForkableResources | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        if workers < 1 or processes < 1:
            raise ValueError("workers and processes must be >= 1")
        if processes > 1 and (resources is None or not fork_available()):
            raise ValueError("processes > 1 needs fork (POSIX) and the resources to reopen in each child")
        self.scorer = scorer
        self.listings = listings
        self.brand = brand
        self.since = since
        self.near_references = tuple(dict.fromkeys(near_references))
        self.workers = workers
        self.results = results
        self.persist = persist
        self.page = page
        self.processes = processes
        self.resources = resources
        self.shard = shard
        self._counted: int | None = None

    def count(self) -> int:
        """How many stored listings the job will look at (NotFoundError for an unknown brand). Remembered:
        ``run`` asks it again only when the caller has not (a count over every listing is not free)."""
        self._counted = self.listings.count_stored(self.brand, self.since)
        return self._counted

    def _page(self, recs: list[ListingRecord]) -> list[tuple[ListingRecord, Any]]:
        """Re-match a page of listings in one batch (one search per index, the changed scores in one
        transaction; unchanged ones are not written again)."""
        try:
            got: list[Any] = self.scorer.rescore_stored_many(
                [StoredListing(rec.to_listing(), rec.image_sha256s, rec.latest_digest) for rec in recs],
                persist=self.persist, source=ScoreSource.STORED_RESCAN.value, skip_unchanged=True)
        except Exception as exc:  # a page whose rescore fails must not stop the job
            log.exception("stored rescan of a page failed", extra={"first": recs[0].listing_id})
            got = [exc] * len(recs)
        for rec, g in zip(recs, got, strict=True):
            if isinstance(g, Exception):
                log.error("stored rescan of a listing failed", exc_info=g, extra={"listing_id": rec.listing_id})
        return list(zip(recs, got, strict=True))

    def _models(self) -> list[tuple[CachedEmbedder, float]]:
        """The product-matching models with the similarity from which a match counts as evidence (the
        signal's floor; the matcher does not report below its own minimum either)."""
        config, visual = self.scorer.matcher.config, self.scorer.params.visual
        out = [(self.scorer.copy, max(config.min_copy, visual.copy.floor))]
        if self.scorer.semantic is not None:
            out.append((self.scorer.semantic, max(config.min_lookalike, visual.lookalike.floor)))
        return out

    def _reference_vectors(self) -> list[tuple[CachedEmbedder, float, np.ndarray]] | None:
        """(model, floor, vectors of the new references); None when one is not stored (then every
        listing is re-matched: correct, only slower)."""
        out = []
        for emb, floor in self._models():
            got = emb.lookup(self.near_references)
            if any(sha not in got for sha in self.near_references):
                log.warning("a new reference has no stored embedding: re-matching every listing",
                            extra={"model": emb.model_id})
                return None
            out.append((emb, floor, np.stack([got[sha] for sha in self.near_references])))
        return out

    def _pages(self, records: Iterator[ListingRecord], report: StoredRescanReport,
               page: int = 256) -> Iterator[list[ListingRecord]]:
        """The records to re-match, a page at a time. Each page's stored embeddings are read ahead in one
        query per model (they land in the embedders' in-process LRU, so ``rescore_stored`` finds them
        without a database round trip each), and with ``near_references`` the listings that come near
        none of the new references are counted and dropped here."""
        embedders = list({id(e): e for e in (self.scorer.copy, self.scorer.semantic, self.scorer.logo)
                          if e is not None}.values())
        refs = self._reference_vectors() if self.near_references else None
        while True:
            chunk = list(islice(records, page))
            if not chunk:
                return
            shas = list(dict.fromkeys(sha for rec in chunk for sha in rec.image_sha256s))
            found = lookup_together({id(emb): emb for emb in embedders}, shas)
            near = self._near_photos(shas, refs, found) if refs is not None else None
            kept = []
            for rec in chunk:
                if near is not None and not any(near.get(sha, True) for sha in rec.image_sha256s):
                    report.scanned += 1
                    report.not_near += 1
                    continue
                kept.append(rec)
            if kept:
                yield kept

    @staticmethod
    def _near_photos(shas: list[str], refs: list[tuple[CachedEmbedder, float, np.ndarray]],
                     found: dict[int, dict[str, np.ndarray]]) -> dict[str, bool]:
        """For each photo of a page: does it reach a floor against a new reference (one matrix product
        per model for the whole page)? A photo without a stored embedding is absent: its listing goes on
        to ``rescore_stored``, which reports it."""
        near = dict.fromkeys(shas, False)
        for emb, floor, matrix in refs:
            vectors = found[id(emb)]
            have = [sha for sha in shas if sha in vectors]
            for sha in shas:
                if sha not in vectors:
                    near.pop(sha, None)
            if have:
                best = (np.stack([vectors[sha] for sha in have]) @ matrix.T).max(axis=1)
                for sha, sim in zip(have, best.tolist(), strict=True):
                    if sim >= floor and sha in near:
                        near[sha] = True
        return near

    def run(self, progress: Progress | None = None, cancel: CancelFlag | None = None) -> StoredRescanReport:
        report = StoredRescanReport(brand=self.brand, since=self.since,
                                    near_references=len(self.near_references))
        # One page cannot be shared: forking for it would only add the processes' start-up.
        if self.processes > 1 and (self._counted if self._counted is not None else self.count()) > self.page:
            t0 = time.perf_counter()
            try:
                self._run_processes(report, progress, cancel)
            finally:
                report.elapsed_s = time.perf_counter() - t0
            log.info("stored rescan done", extra={**report.as_dict(), "processes": self.processes})
            return report
        return self._run_threads(report, progress, cancel)

    def _run_processes(self, report: StoredRescanReport, progress: Progress | None,
                       cancel: CancelFlag | None) -> None:
        assert self.resources is not None
        ctx = multiprocessing.get_context("fork")
        stop = ctx.Event()
        # The catalog facts every page reads, read once here and inherited, not once per child.
        self.scorer.warm_up()
        self.resources.before_fork()
        children: dict[Connection, tuple[int, BaseProcess]] = {}
        done: set[int] = set()
        failure: str | None = None
        last_commit = time.monotonic()
        if cancel is not None and cancel.is_set():
            stop.set()  # stopped already: the children must not start a page
        try:
            # Frozen objects are left alone by the garbage collector, in the children too: its passes
            # over the inherited heap would write to every object (copying each memory page the parent
            # shares with the children). Measured on 2,000 stored listings, 2 children: 17,000 -> 11,000
            # page faults and 0.9 -> 0.6-0.8 s of CPU time per child.
            # (Objects frozen before, by whoever froze them, stay frozen: only a freeze made here is undone.)
            frozen_before = gc.get_freeze_count() > 0
            gc.freeze()
            try:
                for k in range(self.processes):
                    recv, send = ctx.Pipe(duplex=False)
                    child = ctx.Process(target=self._child, args=(k, send, stop), name=f"stored-rescan-{k}",
                                        daemon=True)
                    child.start()
                    send.close()  # the child's end: EOF here once the child is gone
                    children[recv] = (k, child)
            finally:
                if not frozen_before:
                    gc.unfreeze()
            while children:
                if cancel is not None and cancel.is_set():
                    stop.set()
                for conn in wait(list(children), timeout=0.2):
                    assert isinstance(conn, Connection)
                    k, proc = children[conn]
                    try:
                        kind, *payload = conn.recv()
                    except EOFError:
                        del children[conn]
                        proc.join()
                        if k not in done and failure is None:
                            failure = f"worker {k} exited with code {proc.exitcode} before it finished"
                        continue
                    if kind == "batch":
                        n, lines = payload
                        if self.results is not None and lines:
                            self.results.append_encoded(lines)
                        if progress and n:
                            progress(n)
                    elif kind == "done":
                        _merge(report, payload[0])
                        done.add(k)
                    elif kind == "failed" and failure is None:
                        failure = f"worker {k} failed:\n{payload[0]}"
                        stop.set()  # the others stop between pages: the run is reported as failed
                last_commit = _commit_if_due(self.results, last_commit)
        finally:
            stop.set()
            for _, left in children.values():  # only after an exception here (Ctrl-C): stop them
                left.join(timeout=30)
                if left.is_alive():
                    left.terminate()
            if self.results is not None:
                self.results.commit()
        if failure is not None:
            raise RescanWorkerError(f"stored rescan: {failure}")

    def _child(self, k: int, conn: Connection, stop: CancelFlag) -> None:
        """A forked worker: re-match shard k of the listings and send the lines and the report."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which sets ``stop``
        try:
            assert self.resources is not None
            self.resources.after_fork()
            relay = _Relay(conn, keep_records=self.results is not None)
            part = copy.copy(self)  # this job, on shard k, its lines and progress sent to the parent
            part.results, part.shard, part.processes = relay, (k, self.processes), 1
            # (_run_threads commits the relay at its end: every line and tick is sent before the report.)
            report = part._run_threads(StoredRescanReport(brand=self.brand, since=self.since),
                                       relay.progress, stop)
            conn.send(("done", report))
        except BaseException:
            conn.send(("failed", traceback.format_exc()))
            # The parent prints the traceback in its error; raising it here printed it a second time.
            raise SystemExit(1) from None

    def _run_threads(self, report: StoredRescanReport, progress: Progress | None,
                     cancel: CancelFlag | None) -> StoredRescanReport:
        t0 = time.perf_counter()
        records = self.listings.iter_stored(self.brand, self.since, shard=self.shard)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="stored-rescan")
        pending: deque[Future[list[tuple[ListingRecord, Any]]]] = deque()
        window = self.workers * 2
        last_commit = time.monotonic()
        skipped_before = 0

        def take(fut: Future[list[tuple[ListingRecord, Any]]]) -> None:
            nonlocal last_commit
            for rec, got in fut.result():
                report.scanned += 1
                if isinstance(got, Exception):
                    report.errors += 1
                elif got is None:
                    report.missing_embeddings += 1
                else:
                    r = got.result
                    report.rescored += 1
                    report.written += int(got.written)
                    report.verdicts[r.verdict.value] += 1
                    if r.verdict is not rec.latest_verdict:
                        report.changed += 1
                        if rec.latest_verdict is Verdict.CLEAR:
                            report.newly_flagged += 1
                    if self.results is not None:
                        self.results.append(result_record(r))
                if progress:
                    progress(1)
            last_commit = _commit_if_due(self.results, last_commit)

        try:
            for page in self._pages(records, report, self.page):
                if progress and report.not_near > skipped_before:
                    progress(report.not_near - skipped_before)
                    skipped_before = report.not_near
                if cancel is not None and cancel.is_set():
                    report.cancelled = True
                    break
                pending.append(pool.submit(self._page, page))
                while pending and (len(pending) >= window or pending[0].done()):
                    take(pending.popleft())
            while pending:
                take(pending.popleft())
            if progress and report.not_near > skipped_before:
                progress(report.not_near - skipped_before)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if self.results is not None:
                self.results.commit()
            report.elapsed_s = time.perf_counter() - t0
        log.info("stored rescan done", extra=report.as_dict())
        return report


@dataclass(frozen=True, slots=True)
class RescanRequest:
    """What the scheduler is asked to re-match: everything (``brand`` None and no ``near_references``),
    one brand's listings, or the listings near newly added references."""

    brand: str | None = None
    near_references: frozenset[str] = frozenset()


RunRescan = Callable[[RescanRequest, CancelFlag], StoredRescanReport]


def rescan_in_this_process(scorer: ListingScorer, listings: ListingRepository) -> RunRescan:
    """A :data:`RunRescan` that runs each job in the calling thread, on this process's scorer."""
    def run(req: RescanRequest, cancel: CancelFlag) -> StoredRescanReport:
        return StoredRescanJob(scorer, listings, brand=req.brand,
                               near_references=sorted(req.near_references)).run(cancel=cancel)
    return run


class StoredRescanScheduler:
    """Runs stored rescans one after another from a background thread, for the API after catalog changes
    (``run`` does the work: in the API, in a separate process, see :mod:`service.rescan_process`).

    * ``request(near_references=shas)`` after references were added (their content hashes: the
      ``sha256`` of the added reference records);
    * ``request(brand=slug)`` after a brand removed references, or changed a product's reference price,
      its authorized sellers or its verdict thresholds;
    * ``request()`` for every stored listing (after a logo was added, or a brand's names changed).

    Requests arriving while a job runs are coalesced: a pending rescan of everything covers every other
    request, added references are merged into one job, a brand asked for twice runs once.
    """

    def __init__(self, run: RunRescan) -> None:
        self._run = run
        self._lock = threading.Condition()
        self._everything = False
        self._brands: set[str] = set()
        self._near: set[str] = set()
        self._cancel = threading.Event()
        self._closed = False
        self.running: RescanRequest | None = None
        self.last: StoredRescanReport | None = None
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name="stored-rescan-scheduler", daemon=True)
        self._thread.start()

    def request(self, brand: str | None = None, near_references: Sequence[str] = ()) -> None:
        if brand is not None and near_references:
            raise ValueError("give a brand or near_references, not both")
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if brand is not None:
                self._brands.add(brand)
            elif near_references:
                self._near.update(near_references)
            else:
                self._everything = True
            if self._everything:
                self._brands.clear()
                self._near.clear()
            self._lock.notify_all()

    def _has_pending(self) -> bool:
        return self._everything or bool(self._brands) or bool(self._near)

    def status(self) -> dict[str, Any]:
        with self._lock:
            pending: list[str] = ["*"] if self._everything else []
            pending += sorted(self._brands) + ([f"near {len(self._near)} new reference(s)"] if self._near else [])
            running = None if self.running is None else {
                "brand": self.running.brand, "near_references": len(self.running.near_references)}
            return {"running": running, "pending": pending, "runs": self.runs,
                    "last": self.last.as_dict() if self.last else None}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is pending or running (for tests and orderly shutdown)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._has_pending() and self.running is None, timeout)

    def _next(self) -> RescanRequest:
        if self._everything:
            self._everything = False
            return RescanRequest()
        if self._near:
            req = RescanRequest(near_references=frozenset(self._near))
            self._near.clear()
            return req
        brand = min(self._brands)
        self._brands.discard(brand)
        return RescanRequest(brand=brand)

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._has_pending() or self._closed)
                if self._closed:
                    return
                req = self.running = self._next()
            try:
                report: StoredRescanReport | None = self._run(req, self._cancel)
            except Exception:
                log.exception("stored rescan job failed", extra={"brand": req.brand})
                report = None
            with self._lock:
                self.running = None
                self.runs += 1
                if report is not None:
                    self.last = report
                self._lock.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel a running job (between pages) and stop the thread."""
        with self._lock:
            self._closed = True
            self._everything = False
            self._brands.clear()
            self._near.clear()
            self._lock.notify_all()
        self._cancel.set()
        self._thread.join(timeout)


__all__ = [
    "FileRescan",
    "ListingRescanner",
    "RescanEngine",
    "RescanInputError",
    "RescanRequest",
    "RescanSummary",
    "RowOutcome",
    "RunRescan",
    "StoredRescanJob",
    "StoredRescanReport",
    "StoredRescanScheduler",
    "ThreadedEngine",
    "default_errors_path",
    "rescan_in_this_process",
]
