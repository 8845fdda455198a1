"""The FAISS reference index: one searchable set of catalog embeddings for one (embedder, kind).

:class:`FaissReferenceIndex` implements :class:`service.domain.ports.VectorIndex` for L2-normalised float32
vectors compared by inner product, keyed by the catalog's own int64 image ids (an ``IndexIDMap2`` holds
the id of every stored vector, so the ids travel inside the saved file).

Which FAISS structure sits inside is chosen whenever the index is (re)built, from its size and
:class:`service.settings.IndexSettings`:

``flat``
    exact ``IndexFlatIP``, up to ``exact_max`` vectors.  Removal is native (the rows are compacted).
``hnsw``
    ``IndexHNSWFlat`` above ``exact_max`` (``approximate="hnsw"``, the default).  The similarities it
    returns are exact (it stores the raw vectors); only *which* neighbours are found is approximate.
``ivfpq``
    ``IndexIVFPQ`` re-ranked by ``IndexRefineFlat`` (``approximate="ivfpq"``).  The refine step keeps the
    raw vectors so that returned similarities are exact: the scoring thresholds (copy floor, lookalike
    floor) are absolute similarities and must not move with a PQ approximation.

HNSW graphs cannot delete nodes and ``IndexRefine`` has no ``remove_ids``, so the approximate indexes
remove by *tombstone*: the slot's id in the id map is overwritten with -1 and searches pass FAISS an
``IDSelector`` that excludes dead slots (the graph still routes through them, so recall does not suffer
the way post-filtering would).  Re-adding an existing id tombstones the old slot and appends the new
vector.  When tombstones exceed ``IndexTuning.tombstone_rebuild_fraction`` of the slots the index is
rebuilt from its own stored vectors (never re-embedded) and the type is chosen afresh, so an index
that shrank below ``exact_max`` becomes exact again.  Crossing ``exact_max`` on ``add`` promotes a flat
index to the approximate type the same way.

Persistence is atomic: :meth:`FaissReferenceIndex.save` writes ``index-<random>.faiss`` under a temporary
name, fsyncs and renames it, then atomically replaces ``manifest.json`` (model_id, kind, dim, count, type,
parameters, sha256 of the ids and of the file, creation time).  Replacing the manifest is the single commit
point; a crash at any moment leaves either the old pair or the new pair.  :meth:`FaissReferenceIndex.load`
*raises* a subclass of :class:`IndexLoadError` (never returns a half-usable index) when the directory has
no index, was written for another model/kind/dim, or does not match its manifest.

Thread safety: searches run concurrently under the read side of a :class:`ReadWriteLock`; mutations are
serialised by a writer mutex and take the write side only while they change the live FAISS object, so a
long rebuild (promotion, compaction) builds aside while searches continue, then swaps in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, cast

import faiss
import numpy as np
import numpy.typing as npt

from index.runtime import use_search_threads
from index.rwlock import ReadWriteLock
from service.domain.model import ReferenceKind, Vectors
from service.domain.ports import Ids
from service.settings import IndexSettings

IndexType = Literal["flat", "hnsw", "ivfpq"]
VectorSource = Callable[[Ids], Vectors]
"""Returns the stored vectors of the given ids, one row per id, in the order given."""

MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 1
_INDEX_FILE = re.compile(r"^index-[0-9a-f]{16}\.faiss$")
_NORM_TOLERANCE: Final = 1e-3
# IVF-PQ needs enough vectors to train its coarse quantizer and codebooks; below this the approximate
# type falls back to HNSW (only reachable with a tiny ``exact_max``).
IVFPQ_MIN_VECTORS: Final = 1000


class IndexLoadError(Exception):
    """An index directory that must not be used as it is; ``reason`` says why (for the log)."""

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"index at {directory}: {reason}")
        self.directory = directory
        self.reason = reason


class IndexNotFoundError(IndexLoadError):
    """No manifest in the directory: nothing was ever saved there."""


class IndexMismatchError(IndexLoadError):
    """A valid index written for another model_id, kind or dimension."""


class IndexCorruptError(IndexLoadError):
    """A manifest or index file that is unreadable or disagrees with itself."""


@dataclass(frozen=True, slots=True)
class IndexTuning:
    """Knobs of the approximate indexes that :class:`IndexSettings` does not (yet) carry.

    Defaults were chosen from ``scripts/bench_index.py`` (see its notes).
    """

    # IVF lists; None: about sqrt(n), at most n/39 so every list trains on enough points.
    ivf_nlist: int | None = None
    # Lists probed per query; None: nlist / 32, at least 8 (clustered data saturated at 8 in the bench).
    ivf_nprobe: int | None = None
    # The exact re-rank looks at refine_factor * k PQ candidates.  It bounds IVF-PQ recall far more than
    # nprobe does (100k clustered: x4 0.73, x8 0.91) and costs only refine_factor * k exact dot products.
    refine_factor: int = 16
    # Rebuild an approximate index when this fraction of its slots are tombstones.
    tombstone_rebuild_fraction: float = 0.2
    # Vectors fetched and added per step while building (bounds the memory of a rebuild).
    build_batch: int = 50_000

    def __post_init__(self) -> None:
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ValueError("IndexTuning.ivf_nlist must be >= 1")
        if self.ivf_nprobe is not None and self.ivf_nprobe < 1:
            raise ValueError("IndexTuning.ivf_nprobe must be >= 1")
        if self.refine_factor < 1:
            raise ValueError("IndexTuning.refine_factor must be >= 1")
        if not 0 < self.tombstone_rebuild_fraction <= 1:
            raise ValueError("IndexTuning.tombstone_rebuild_fraction must be in (0, 1]")
        if self.build_batch < 1:
            raise ValueError("IndexTuning.build_batch must be >= 1")


# --------------------------------------------------------------------------------------------- validation


def as_ids(ids: object, field: str = "ids") -> Ids:
    """A 1-D int64 array of non-negative ids (-1 is reserved for "no neighbour")."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{field} must be a 1-D array of integer ids, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{field} must be integers, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if (out < 0).any():
        raise ValueError(f"{field} must be >= 0 (got {int(out.min())})")
    return out


def as_vectors(vectors: object, dim: int, field: str = "vectors") -> Vectors:
    """A C-contiguous (n, dim) float32 matrix of finite, L2-normalised rows."""
    arr = np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{field} must have shape (n, {dim}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{field} must be floating point, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if out.shape[0] == 0:
        return out
    if not np.isfinite(out).all():
        raise ValueError(f"{field} contains NaN or infinite values")
    norms = np.linalg.norm(out, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{field} must be L2-normalised; row {row} has norm {float(norms[row]):.4f}")
    return out


def ids_checksum(ids: Ids) -> str:
    """sha256 of the sorted, de-duplicated ids as little-endian int64: equal iff the id sets are equal."""
    uniq = np.unique(np.asarray(ids, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(uniq.tobytes()).hexdigest()


def _check_unique(ids: Ids, field: str) -> None:
    if ids.size and np.unique(ids).size != ids.size:
        raise ValueError(f"{field} contains duplicates")


def _check_identity(model_id: str, kind: str, dim: int) -> ReferenceKind:
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError("model_id must be a non-empty string")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    try:
        return ReferenceKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in ReferenceKind)
        raise ValueError(f"kind must be one of {allowed}, got {kind!r}") from None


# ----------------------------------------------------------------------------------------------- building


def _pq_subquantizers(dim: int) -> int:
    """The largest divisor of dim that is at most dim/8: about 8 dimensions (one byte) per code."""
    target = max(1, dim // 8)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def _ivf_layout(n: int, dim: int, tuning: IndexTuning) -> dict[str, int]:
    nlist = tuning.ivf_nlist or int(math.sqrt(n))
    nlist = max(1, min(nlist, n // 39))
    # 8-bit codebooks need 256 centroids per sub-space; with few training points use fewer bits.
    nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))
    return {"nlist": nlist, "pq_m": _pq_subquantizers(dim), "pq_nbits": nbits}


def _train_sample(ids: Ids, size: int, seed: int = 0) -> Ids:
    if ids.size <= size:
        return ids
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=size, replace=False))


def _fetch(source: VectorSource, ids: Ids, dim: int) -> Vectors:
    rows = source(ids)
    out = as_vectors(rows, dim, "stored vectors")
    if out.shape[0] != ids.size:
        raise ValueError(f"stored vectors: asked for {ids.size} ids, got {out.shape[0]} rows")
    return out


def _new_faiss(
    index_type: IndexType,
    dim: int,
    settings: IndexSettings,
    tuning: IndexTuning,
    ids: Ids,
    source: VectorSource,
) -> tuple[Any, dict[str, int]]:
    """An empty (but trained) IndexIDMap2 of the given type, and its build parameters."""
    if index_type == "flat":
        return faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT), {}
    if index_type == "hnsw":
        idx: Any = faiss.index_factory(dim, f"IDMap2,HNSW{settings.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT)
        hnsw = _downcast(idx.index).hnsw
        hnsw.efConstruction = settings.hnsw_ef_construction
        hnsw.efSearch = settings.hnsw_ef_search
        return idx, {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction}
    if ids.size < IVFPQ_MIN_VECTORS:
        raise ValueError(f"an ivfpq index needs at least {IVFPQ_MIN_VECTORS} vectors to train, got {ids.size}")
    layout = _ivf_layout(ids.size, dim, tuning)
    spec = f"IDMap2,IVF{layout['nlist']},PQ{layout['pq_m']}x{layout['pq_nbits']},RFlat"
    idx = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    # The factory turns on polysemous training (slow, and only useful for Hamming-filtered search, which
    # is never used here).
    ivf = _downcast(_downcast(idx.index).base_index)
    ivf.do_polysemous_training = False
    # PQ training runs one k-means per sub-space (64 for 512-d); 10 iterations instead of 25 cut the
    # build time ~2.5x, and the exact re-rank absorbs the slightly coarser codebooks.
    ivf.pq.cp.niter = 10
    # ~64 points per list trains k-means well enough; more only costs time (it is O(points * nlist)).
    sample = _train_sample(ids, max(64 * layout["nlist"], 256 * 39))
    idx.train(_fetch(source, sample, dim))
    return idx, layout


# ---------------------------------------------------------------------------------------------- file io


def _write_index_file(faiss_index: Any, path: Path) -> None:
    """Serialise a FAISS index to path (a seam the atomic-save tests break on purpose)."""
    faiss.write_index(faiss_index, str(path))


def _fsync_and_hash(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
            size += len(block)
        os.fsync(fh.fileno())
    return digest.hexdigest(), size


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path through a fsynced temporary file in the same directory and os.replace."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    # Makes the renames themselves durable; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -------------------------------------------------------------------------------------------- the index


class FaissReferenceIndex:
    """Inner-product search over one catalog's L2-normalised embeddings, keyed by catalog image id.

    ``FaissReferenceIndex(dim, settings, model_id=..., kind=...)`` is an empty exact index; use
    :meth:`build` to construct from many vectors at once and :meth:`load` to open a saved one.
    """

    def __init__(
        self,
        dim: int,
        settings: IndexSettings,
        *,
        model_id: str,
        kind: ReferenceKind | str,
        tuning: IndexTuning | None = None,
    ) -> None:
        self._kind = _check_identity(model_id, kind, dim)
        self._dim = dim
        self._model_id = model_id
        self._settings = settings
        self._tuning = tuning or IndexTuning()
        self._lock = ReadWriteLock()
        self._writer = threading.Lock()
        self._version = 0
        self._saved_version = -1
        self._faiss: Any = None
        self._inner: Any = None
        self._type: IndexType = "flat"
        self._params: dict[str, int] = {}
        self._dead = 0
        self._selector: tuple[Any, Any] | None = None
        empty, params = _new_faiss("flat", dim, settings, self._tuning, np.empty(0, np.int64), _no_source)
        self._adopt(empty, "flat", params)

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        dim: int,
        settings: IndexSettings,
        *,
        model_id: str,
        kind: ReferenceKind | str,
        ids: Ids,
        vectors: Vectors | VectorSource,
        tuning: IndexTuning | None = None,
        index_type: IndexType | None = None,
    ) -> FaissReferenceIndex:
        """An index holding ``ids`` with their vectors, of the type the settings choose for that size
        (or ``index_type``).  ``vectors`` is either the (n, dim) matrix or a :data:`VectorSource` that is
        called in batches of ``tuning.build_batch`` ids, so a rebuild from the database never holds a second
        full copy of the vectors beside the index.
        """
        out = cls(dim, settings, model_id=model_id, kind=kind, tuning=tuning)
        ids = as_ids(ids)
        _check_unique(ids, "ids")
        if callable(vectors):
            source = vectors
        else:
            matrix = as_vectors(vectors, dim)
            if matrix.shape[0] != ids.size:
                raise ValueError(f"vectors has {matrix.shape[0]} rows for {ids.size} ids")
            source = _matrix_source(ids, matrix)
        with out._writer:
            out._rebuild(ids, source, index_type)
        return out

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        model_id: str,
        kind: ReferenceKind | str,
        dim: int,
        settings: IndexSettings,
        tuning: IndexTuning | None = None,
    ) -> FaissReferenceIndex:
        """Open the index saved in ``directory``.

        Raises :class:`IndexNotFoundError` when nothing was saved there, :class:`IndexMismatchError` when
        it was saved for another model_id, kind or dim, and :class:`IndexCorruptError` when the manifest
        or the index file is unreadable or they disagree (checksums, count, type, dimension).  Search-time
        parameters (efSearch, nprobe) come from the current settings, build-time ones from the file.
        """
        expected_kind = _check_identity(model_id, kind, dim)
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise IndexNotFoundError(directory, "no manifest.json")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise TypeError("manifest is not a JSON object")
            fmt = manifest["format"]
            got_model, got_kind, got_dim = manifest["model_id"], manifest["kind"], manifest["dim"]
            count, slots = int(manifest["count"]), int(manifest["slots"])
            index_type, file_name = manifest["index_type"], manifest["index_file"]
            file_sha, ids_sha = manifest["index_sha256"], manifest["ids_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexCorruptError(directory, f"unreadable manifest ({exc})") from exc
        if fmt != FORMAT_VERSION:
            raise IndexCorruptError(directory, f"manifest format {fmt!r}, expected {FORMAT_VERSION}")
        if got_model != model_id:
            raise IndexMismatchError(directory, f"built for model_id {got_model!r}, expected {model_id!r}")
        if got_kind != expected_kind.value:
            raise IndexMismatchError(directory, f"built for kind {got_kind!r}, expected {expected_kind.value}")
        if got_dim != dim:
            raise IndexMismatchError(directory, f"built for dim {got_dim!r}, expected {dim}")
        if index_type not in ("flat", "hnsw", "ivfpq"):
            raise IndexCorruptError(directory, f"unknown index_type {index_type!r}")
        # The file name comes from a file: never let it point outside the directory.
        if not isinstance(file_name, str) or not _INDEX_FILE.fullmatch(file_name):
            raise IndexCorruptError(directory, f"invalid index_file {file_name!r}")
        index_path = directory / file_name
        if not index_path.is_file():
            raise IndexCorruptError(directory, f"index file {file_name} is missing")
        if _hash_file(index_path) != file_sha:
            raise IndexCorruptError(directory, f"index file {file_name} does not match its sha256")
        try:
            loaded = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise IndexCorruptError(directory, f"FAISS cannot read {file_name} ({exc})") from exc
        if not isinstance(loaded, faiss.IndexIDMap2):
            raise IndexCorruptError(directory, f"{file_name} is not an IndexIDMap2")
        if loaded.d != dim or loaded.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexCorruptError(directory, f"{file_name}: dim {loaded.d}, metric {loaded.metric_type}")
        inner = _downcast(loaded.index)
        actual_type = _type_of(inner)
        if actual_type != index_type:
            raise IndexCorruptError(directory, f"{file_name} holds {actual_type}, manifest says {index_type}")
        typed = cast(IndexType, actual_type)
        out = cls(dim, settings, model_id=model_id, kind=expected_kind, tuning=tuning)
        out._adopt(loaded, typed, _params_of(inner, typed))
        if out._slots() != slots or out.ntotal != count or out.ids_checksum() != ids_sha:
            raise IndexCorruptError(directory, "ids in the index file disagree with the manifest")
        out._saved_version = out._version
        return out

    # -------------------------------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        """Live vectors (tombstoned slots not counted)."""
        return self._slots() - self._dead

    @property
    def version(self) -> int:
        """Moves with every add, removal and rebuild: while it holds, a search answers as before."""
        return self._version

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def kind(self) -> ReferenceKind:
        return self._kind

    @property
    def index_type(self) -> IndexType:
        return self._type

    @property
    def build_params(self) -> dict[str, int]:
        """Build-time parameters of the current structure (HNSW m/efConstruction, IVF-PQ layout)."""
        return dict(self._params)

    @property
    def tombstones(self) -> int:
        return self._dead

    @property
    def dirty(self) -> bool:
        """True when the index changed since it was last saved or loaded."""
        return self._version != self._saved_version

    def ids(self) -> Ids:
        """The live ids, sorted."""
        with self._lock.read():
            view = self._id_map_view()
            return np.sort(view[view >= 0])

    def ids_checksum(self) -> str:
        return ids_checksum(self.ids())

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, int | np.integer) or int(image_id) < 0:
            return False
        with self._lock.read():
            return bool((self._id_map_view() == int(image_id)).any())

    def vectors(self, ids: Ids) -> Vectors:
        """The stored vectors of ``ids`` (exact: every type keeps the raw vectors). KeyError if absent."""
        ids = as_ids(ids)
        with self._lock.read():
            return self._reconstruct(ids)

    def policy_mismatch(self) -> str | None:
        """Why the current structure is not what the settings would build for this size, or None."""
        expected = self._policy_type(self.ntotal)
        if expected != self._type:
            return f"{self._type} index of {self.ntotal} vectors, settings choose {expected}"
        s = self._settings
        wanted = {"m": s.hnsw_m, "ef_construction": s.hnsw_ef_construction}
        if self._type == "hnsw" and self._params != wanted:
            return f"HNSW built with {self._params}, settings ask for {wanted}"
        return None

    # ---------------------------------------------------------------------------------------- mutation

    def add(self, ids: Ids, vectors: Vectors) -> None:
        """Add (or replace: an id already present gets the new vector, never a duplicate)."""
        ids = as_ids(ids)
        matrix = as_vectors(vectors, self._dim)
        if matrix.shape[0] != ids.size:
            raise ValueError(f"vectors has {matrix.shape[0]} rows for {ids.size} ids")
        _check_unique(ids, "ids")
        if ids.size == 0:
            return
        with self._writer:
            live = self._live_ids()
            replaced = np.isin(ids, live)
            new_total = live.size + int((~replaced).sum())
            if self._type == "flat" and self._policy_type(new_total) != "flat":
                # Promotion: build the approximate index aside from the stored + new vectors.
                kept = live[~np.isin(live, ids)]
                all_ids = np.concatenate([kept, ids])
                self._rebuild(all_ids, _merged_source(self._reconstruct, ids, matrix), None)
                return
            with self._lock.write():
                if replaced.any():
                    if self._type == "flat":
                        self._faiss.remove_ids(ids[replaced])
                    else:
                        self._tombstone(ids[replaced])
                self._faiss.add_with_ids(matrix, ids)
                self._version += 1
            self._maybe_compact()

    def remove(self, ids: Ids) -> int:
        """Remove ids (absent ones are ignored); returns how many were removed."""
        ids = np.unique(as_ids(ids))
        if ids.size == 0:
            return 0
        with self._writer:
            present = ids[np.isin(ids, self._live_ids())]
            if present.size == 0:
                return 0
            with self._lock.write():
                # The exact index compacts its rows; the approximate ones can only tombstone.
                flat = self._type == "flat"
                removed = int(self._faiss.remove_ids(present)) if flat else self._tombstone(present)
                self._version += 1
            self._maybe_compact()
            return removed

    def compact(self, index_type: IndexType | None = None) -> None:
        """Rebuild from the stored vectors: drops tombstones and re-chooses the type (or ``index_type``)."""
        with self._writer:
            live = self._live_ids()
            self._rebuild(live, self._reconstruct, index_type)

    # ------------------------------------------------------------------------------------------ search

    def search(
        self,
        queries: Vectors,
        k: int,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
        refine_factor: int | None = None,
    ) -> tuple[npt.NDArray[np.float32], Ids]:
        """(n, k) similarities and ids, best first.  Missing neighbours (fewer than k vectors) have id -1
        and similarity -inf.  ``ef_search`` (HNSW), ``nprobe`` and ``refine_factor`` (IVF-PQ) override
        the settings for this call; the exact index ignores them."""
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe), ("refine_factor", refine_factor)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        k = int(k)
        q = as_vectors(queries, self._dim, "queries")
        n = q.shape[0]
        with self._lock.read():
            if self._slots() == 0 or n == 0:
                return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
            params, _keepalive = self._search_params(k, ef_search, nprobe, refine_factor)
            use_search_threads()
            sims, slots = self._inner.search(q, k, params=params)
            view = self._id_map_view()
            found = slots >= 0
            labels = np.full(slots.shape, -1, dtype=np.int64)
            labels[found] = view[slots[found]]
        sims = np.asarray(sims, dtype=np.float32)
        sims[labels < 0] = -np.inf
        return sims, labels

    # ------------------------------------------------------------------------------------- persistence

    def save(self, directory: Path) -> Path:
        """Atomically save into ``directory`` (created if needed); returns the manifest path.

        If anything fails the previous index and manifest stay as they were and no temporary file is
        left behind.  Searches continue while saving; mutations wait.
        """
        directory.mkdir(parents=True, exist_ok=True)
        with self._writer:
            file_name = f"index-{secrets.token_hex(8)}.faiss"
            final = directory / file_name
            tmp = directory / f".{file_name}.tmp"
            committed = False
            try:
                _write_index_file(self._faiss, tmp)
                file_sha, size = _fsync_and_hash(tmp)
                os.replace(tmp, final)
                manifest = {
                    "format": FORMAT_VERSION,
                    "model_id": self._model_id,
                    "kind": self._kind.value,
                    "dim": self._dim,
                    "count": self.ntotal,
                    "slots": self._slots(),
                    "tombstones": self._dead,
                    "index_type": self._type,
                    "metric": "inner_product",
                    "params": self._params,
                    "ids_sha256": self.ids_checksum(),
                    "index_file": file_name,
                    "index_sha256": file_sha,
                    "index_bytes": size,
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "faiss_version": faiss.__version__,
                }
                _atomic_write_bytes(directory / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
                committed = True
                _fsync_dir(directory)
            finally:
                tmp.unlink(missing_ok=True)
                if not committed:
                    final.unlink(missing_ok=True)
            # Only now are older index files unreferenced.
            for old in directory.glob("index-*.faiss"):
                if old.name != file_name:
                    old.unlink(missing_ok=True)
            self._saved_version = self._version
        return directory / MANIFEST_NAME

    # -------------------------------------------------------------------------------------- internals

    def _adopt(self, faiss_index: Any, index_type: IndexType, params: dict[str, int]) -> None:
        """Make faiss_index the live structure (caller holds the write lock or owns the object alone)."""
        self._faiss = faiss_index
        self._inner = _downcast(faiss_index.index)
        self._type = index_type
        self._params = params
        view = self._id_map_view()
        dead = np.flatnonzero(view < 0)
        self._dead = int(dead.size)
        self._selector = _exclusion_selector(dead) if dead.size else None

    def _slots(self) -> int:
        return int(self._faiss.ntotal)

    def _id_map_view(self) -> npt.NDArray[np.int64]:
        """The id map (slot -> id, -1 for a tombstone) as a numpy view of FAISS's own vector.

        Valid only until the next mutation (an add may reallocate it): take it under a lock, never keep it.
        """
        size = int(self._faiss.id_map.size())
        if size == 0:
            return np.empty(0, dtype=np.int64)
        return cast(npt.NDArray[np.int64], faiss.rev_swig_ptr(self._faiss.id_map.data(), size))

    def _live_ids(self) -> Ids:
        view = self._id_map_view()
        return view[view >= 0].copy()

    def _reconstruct(self, ids: Ids) -> Vectors:
        if ids.size == 0:
            return np.empty((0, self._dim), dtype=np.float32)
        missing = ids[~np.isin(ids, self._id_map_view())]
        if missing.size:
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        return np.ascontiguousarray(self._faiss.reconstruct_batch(ids), dtype=np.float32)

    def _tombstone(self, ids: Ids) -> int:
        view = self._id_map_view()
        slots = np.flatnonzero(np.isin(view, ids))
        view[slots] = -1
        # IndexIDMap2 keeps id -> slot in a hash map used by reconstruct; rebuild it from the id map.
        self._faiss.construct_rev_map()
        self._dead += int(slots.size)
        self._selector = _exclusion_selector(np.flatnonzero(view < 0))
        return int(slots.size)

    def _policy_type(self, n: int) -> IndexType:
        if n <= self._settings.exact_max:
            return "flat"
        if self._settings.approximate == "ivfpq" and n >= IVFPQ_MIN_VECTORS:
            return "ivfpq"
        return "hnsw"

    def _maybe_compact(self) -> None:
        slots = self._slots()
        if self._dead and self._dead > self._tuning.tombstone_rebuild_fraction * slots:
            self._rebuild(self._live_ids(), self._reconstruct, None)

    def _rebuild(self, ids: Ids, source: VectorSource, index_type: IndexType | None) -> None:
        """Build a new structure aside (caller holds the writer mutex, searches continue), then swap."""
        chosen = index_type or self._policy_type(ids.size)
        new, params = _new_faiss(chosen, self._dim, self._settings, self._tuning, ids, source)
        for start in range(0, ids.size, self._tuning.build_batch):
            chunk = ids[start : start + self._tuning.build_batch]
            new.add_with_ids(_fetch(source, chunk, self._dim), chunk)
        with self._lock.write():
            self._adopt(new, chosen, params)
            self._version += 1

    def _search_params(
        self, k: int, ef_search: int | None, nprobe: int | None, refine_factor: int | None
    ) -> tuple[Any, list[Any]]:
        """FAISS search parameters, plus the objects they point to (SWIG keeps raw pointers only)."""
        selector = self._selector
        sel = selector[0] if selector is not None else None
        keep: list[Any] = [selector]
        if self._type == "flat":
            if sel is None:
                return None, keep
            params: Any = faiss.SearchParameters()
            params.sel = sel
            return params, keep
        if self._type == "hnsw":
            params = getattr(faiss, "SearchParametersHNSW")()  # noqa: B009 (absent from faiss's stubs)
            params.efSearch = max(ef_search or self._settings.hnsw_ef_search, k)
            if sel is not None:
                params.sel = sel
            return params, keep
        base: Any = faiss.SearchParametersIVF()
        base.nprobe = min(nprobe or self._nprobe(), self._params.get("nlist", 1))
        if sel is not None:
            base.sel = sel
        keep.append(base)
        refine: Any = faiss.IndexRefineSearchParameters()
        refine.k_factor = float(refine_factor or self._tuning.refine_factor)
        refine.base_index_params = base
        return refine, keep

    def _nprobe(self) -> int:
        nlist = self._params.get("nlist", 1)
        return self._tuning.ivf_nprobe or max(8, nlist // 32)


def _downcast(index: Any) -> Any:
    """The concrete Python class of a FAISS index pointer (its stubs only know the base class)."""
    return faiss.downcast_index(index)


def _no_source(ids: Ids) -> Vectors:
    raise AssertionError("an empty flat index needs no vectors")


def _matrix_source(ids: Ids, matrix: Vectors) -> VectorSource:
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def source(wanted: Ids) -> Vectors:
        pos = np.searchsorted(sorted_ids, wanted)
        return matrix[order[pos]]

    return source


def _merged_source(old: VectorSource, new_ids: Ids, new_vectors: Vectors) -> VectorSource:
    """Vectors of new_ids from new_vectors, of any other id from old."""
    fresh = _matrix_source(new_ids, new_vectors)

    def source(wanted: Ids) -> Vectors:
        out = np.empty((wanted.size, new_vectors.shape[1]), dtype=np.float32)
        is_new = np.isin(wanted, new_ids)
        if is_new.any():
            out[is_new] = fresh(wanted[is_new])
        if (~is_new).any():
            out[~is_new] = old(wanted[~is_new])
        return out

    return source


def _exclusion_selector(dead_slots: npt.NDArray[np.int64]) -> tuple[Any, Any]:
    """An IDSelector accepting every slot but the dead ones; the inner selector must outlive the outer."""
    batch = faiss.IDSelectorBatch(np.ascontiguousarray(dead_slots, dtype=np.int64))
    return faiss.IDSelectorNot(batch), batch


def _type_of(inner: Any) -> IndexType | str:
    if isinstance(inner, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(inner, faiss.IndexRefine) and isinstance(_downcast(inner.base_index), faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    return type(inner).__name__


def _params_of(inner: Any, index_type: IndexType) -> dict[str, int]:
    if index_type == "hnsw":
        hnsw = inner.hnsw
        # m is recorded by FAISS as the number of neighbours on upper levels (level-0 has 2*m).
        return {"m": int(hnsw.nb_neighbors(1)), "ef_construction": int(hnsw.efConstruction)}
    if index_type == "ivfpq":
        base = _downcast(inner.base_index)
        return {"nlist": int(base.nlist), "pq_m": int(base.pq.M), "pq_nbits": int(base.pq.nbits)}
    return {}
