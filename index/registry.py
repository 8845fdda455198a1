"""The reference indexes of a deployment: one :class:`FaissReferenceIndex` per (embedder, kind).

:class:`ReferenceIndexes` owns ``<index_dir>/<embedder name>/<kind>/`` (``kind`` is ``product`` or
``logo``).  The directory is named by the embedder's *name* (``sscd``, ``effnet``), not its versioned
``model_id``: a new model version replaces the index of its role, and the manifest records which model_id
the vectors came from so that a stale index is recognised.

At start the composition root calls :meth:`ReferenceIndexes.reconcile` for every (embedder, kind) with the
ids the database holds embeddings for and a callable that returns those *stored* embeddings.  The index
on disk is verified (manifest model_id, kind and dim, file checksum, count and id checksum) and, when it
disagrees, patched (a few ids missing or extra: e.g. a crash between the database commit and the index
save) or rebuilt from the stored vectors.  Nothing is ever re-embedded here.  The returned
:class:`Reconciliation` says what was done, for the log.

After start, :meth:`ReferenceIndexes.add` / :meth:`ReferenceIndexes.remove` change an index and save it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from index.faiss_index import (
    FaissReferenceIndex,
    IndexLoadError,
    IndexNotFoundError,
    IndexTuning,
    IndexType,
    as_ids,
    ids_checksum,
)
from service.domain.model import ReferenceKind, Vectors
from service.domain.ports import Ids
from service.settings import IndexSettings

StoredVectors = Callable[[Ids], Vectors]
"""Returns the stored embeddings (model_id, kind) of the given ids: one L2-normalised row per id, in order."""

ReconcileAction = Literal["loaded", "patched", "rebuilt", "created"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What :meth:`ReferenceIndexes.reconcile` did to one index.

    ``loaded``: the saved index matched the database.  ``patched``: it was loaded and a few ids were
    added/removed from stored vectors.  ``rebuilt``: the saved index was refused (``reason``) or diverged
    too far and was rebuilt from stored vectors.  ``created``: there was no saved index.
    """

    name: str
    kind: ReferenceKind
    model_id: str
    action: ReconcileAction
    count: int
    added: int
    removed: int
    index_type: IndexType
    reason: str
    seconds: float

    def describe(self) -> str:
        """One log line."""
        return (
            f"index {self.name}/{self.kind.value} ({self.model_id}): {self.action}, {self.count} vectors "
            f"({self.index_type}), +{self.added} -{self.removed} in {self.seconds:.2f}s: {self.reason}"
        )


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"embedder name must match {_NAME.pattern} (it names a directory), got {name!r}")
    return name


def _check_kind(kind: ReferenceKind | str) -> ReferenceKind:
    try:
        return ReferenceKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in ReferenceKind)
        raise ValueError(f"kind must be one of {allowed}, got {kind!r}") from None


class ReferenceIndexes:
    """The indexes under one ``index_dir``, keyed by (embedder name, kind); thread-safe."""

    def __init__(self, index_dir: Path, settings: IndexSettings, tuning: IndexTuning | None = None) -> None:
        self._dir = Path(index_dir)
        self._settings = settings
        self._tuning = tuning or IndexTuning()
        self._indexes: dict[tuple[str, ReferenceKind], FaissReferenceIndex] = {}
        self._guard = threading.Lock()

    def directory(self, name: str, kind: ReferenceKind | str) -> Path:
        return self._dir / _check_name(name) / _check_kind(kind).value

    def open(self, name: str, kind: ReferenceKind | str, *, model_id: str, dim: int) -> FaissReferenceIndex:
        """The index of (name, kind): already open, else loaded from disk, else a new empty one.

        A saved index of another model_id/dim or a corrupt one raises :class:`IndexLoadError` rather than
        being silently replaced: call :meth:`reconcile` to rebuild it from stored vectors.
        """
        key = (_check_name(name), _check_kind(kind))
        with self._guard:
            current = self._indexes.get(key)
            if current is not None and current.model_id == model_id and current.dim == dim:
                return current
            try:
                index = FaissReferenceIndex.load(
                    self.directory(*key),
                    model_id=model_id,
                    kind=key[1],
                    dim=dim,
                    settings=self._settings,
                    tuning=self._tuning,
                )
            except IndexNotFoundError:
                index = self._empty(key[1], model_id, dim)
            self._indexes[key] = index
            return index

    def get(self, name: str, kind: ReferenceKind | str) -> FaissReferenceIndex:
        """An index opened earlier (by :meth:`open` or :meth:`reconcile`); KeyError otherwise."""
        key = (_check_name(name), _check_kind(kind))
        with self._guard:
            try:
                return self._indexes[key]
            except KeyError:
                raise KeyError(f"index {key[0]}/{key[1].value} is not open") from None

    def __iter__(self) -> Iterator[tuple[str, ReferenceKind, FaissReferenceIndex]]:
        with self._guard:
            items = list(self._indexes.items())
        return ((name, kind, index) for (name, kind), index in items)

    def add(self, name: str, kind: ReferenceKind | str, ids: Ids, vectors: Vectors) -> None:
        """Add (or replace) vectors in an open index and save it."""
        index = self.get(name, kind)
        index.add(ids, vectors)
        index.save(self.directory(name, kind))

    def remove(self, name: str, kind: ReferenceKind | str, ids: Ids) -> int:
        """Remove ids from an open index and save it if anything was removed."""
        index = self.get(name, kind)
        removed = index.remove(ids)
        if removed:
            index.save(self.directory(name, kind))
        return removed

    def save_dirty(self) -> list[tuple[str, ReferenceKind]]:
        """Save every open index changed since its last save; returns which were saved."""
        saved = []
        for name, kind, index in self:
            if index.dirty:
                index.save(self.directory(name, kind))
                saved.append((name, kind))
        return saved

    def reconcile(
        self,
        name: str,
        kind: ReferenceKind | str,
        *,
        model_id: str,
        dim: int,
        ids: Ids | Sequence[int],
        stored_vectors: StoredVectors,
    ) -> Reconciliation:
        """Make the index of (name, kind) hold exactly ``ids`` with vectors of ``model_id``, and open it.

        ``ids`` are the image ids the database holds ``model_id`` embeddings of for this kind;
        ``stored_vectors(ids)`` returns those embeddings (called in batches, only for ids that need
        them).  The saved index is verified against its manifest and against ``ids`` (count and sha256 of
        the sorted ids); a disagreement of at most ``max(256, 1%)`` ids is patched in place, a larger one
        or a refused index is rebuilt from stored vectors, and an index whose type or HNSW parameters no
        longer match the settings is rebuilt too.  The index is saved whenever it changed.
        """
        started = time.perf_counter()
        key = (_check_name(name), _check_kind(kind))
        wanted = np.unique(as_ids(np.asarray(ids), "ids"))
        directory = self.directory(*key)
        added = removed = 0
        action: ReconcileAction
        index: FaissReferenceIndex | None
        try:
            index = FaissReferenceIndex.load(
                directory,
                model_id=model_id,
                kind=key[1],
                dim=dim,
                settings=self._settings,
                tuning=self._tuning,
            )
        except IndexNotFoundError:
            index, action, reason = None, "created", "no saved index"
        except IndexLoadError as exc:
            index, action, reason = None, "rebuilt", f"saved index refused: {exc.reason}"

        if index is not None:
            have = index.ids()
            if have.size == wanted.size and ids_checksum(have) == ids_checksum(wanted):
                mismatch = index.policy_mismatch()
                if mismatch is None:
                    action, reason = "loaded", "matches the database"
                else:
                    index, action, reason = None, "rebuilt", mismatch
            else:
                missing, extra = _diff(wanted, have)
                if missing.size + extra.size <= max(256, wanted.size // 100):
                    added, removed = self._apply(index, missing, extra, stored_vectors)
                    action = "patched"
                    reason = f"{missing.size} ids missing, {extra.size} extra"
                else:
                    reason = f"{missing.size} ids missing and {extra.size} extra of {wanted.size}: too many to patch"
                    index, action = None, "rebuilt"

        if index is None:
            index = FaissReferenceIndex.build(
                dim,
                self._settings,
                model_id=model_id,
                kind=key[1],
                ids=wanted,
                vectors=stored_vectors,
                tuning=self._tuning,
            )
            added = int(wanted.size)

        if index.ids_checksum() != ids_checksum(wanted):
            # Cannot happen unless stored_vectors or the index misbehave; never serve a wrong index.
            raise RuntimeError(f"index {key[0]}/{key[1].value} disagrees with the database after {action}")
        if index.dirty or action != "loaded":
            index.save(directory)
        with self._guard:
            self._indexes[key] = index
        return Reconciliation(
            name=key[0],
            kind=key[1],
            model_id=model_id,
            action=action,
            count=index.ntotal,
            added=added,
            removed=removed,
            index_type=index.index_type,
            reason=reason,
            seconds=time.perf_counter() - started,
        )

    def patch(self, name: str, kind: ReferenceKind | str, ids: Ids | Sequence[int],
              stored_vectors: StoredVectors) -> tuple[int, int]:
        """Make the open index of (name, kind) hold exactly ``ids`` in memory, adding the missing ones
        from ``stored_vectors`` and removing the others; not saved (another process that made the
        change saved it). Answers (added, removed)."""
        index = self.get(name, kind)
        missing, extra = _diff(np.unique(as_ids(np.asarray(ids), "ids")), index.ids())
        return self._apply(index, missing, extra, stored_vectors)

    def _apply(self, index: FaissReferenceIndex, missing: Ids, extra: Ids,
               stored_vectors: StoredVectors) -> tuple[int, int]:
        removed = index.remove(extra)
        for start in range(0, missing.size, self._tuning.build_batch):
            chunk = missing[start : start + self._tuning.build_batch]
            index.add(chunk, stored_vectors(chunk))
        return int(missing.size), removed

    def _empty(self, kind: ReferenceKind, model_id: str, dim: int) -> FaissReferenceIndex:
        return FaissReferenceIndex(dim, self._settings, model_id=model_id, kind=kind, tuning=self._tuning)


def _diff(wanted: Ids, have: Ids) -> tuple[Ids, Ids]:
    """(ids wanted but not held, ids held but not wanted) of two sorted unique id arrays."""
    return (np.setdiff1d(wanted, have, assume_unique=True), np.setdiff1d(have, wanted, assume_unique=True))
