"""FAISS reference indexes per (embedder, kind): exact and approximate search over catalog embeddings
keyed by catalog image id, incremental add/remove, atomic persistence with a manifest, and the registry
that loads, reconciles against the database and saves them."""

# (First: FAISS's own OpenBLAS chooses its kernels when it loads; see index/runtime.py.)
from index.runtime import load_faiss

load_faiss()

from index.faiss_index import (  # noqa: E402
    FaissReferenceIndex,
    IndexCorruptError,
    IndexLoadError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexTuning,
    IndexType,
    VectorSource,
    ids_checksum,
)
from index.registry import Reconciliation, ReferenceIndexes, StoredVectors  # noqa: E402

__all__ = [
    "FaissReferenceIndex",
    "IndexCorruptError",
    "IndexLoadError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexTuning",
    "IndexType",
    "Reconciliation",
    "ReferenceIndexes",
    "StoredVectors",
    "VectorSource",
    "ids_checksum",
]
