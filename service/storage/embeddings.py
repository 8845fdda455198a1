"""The shared embedding cache in the database: one row per (image content sha256, model id + version).

Implements :class:`~service.domain.ports.EmbeddingCache`. Reference images and listing photos share it,
keyed by content, so a photo seen in a thousand listings is embedded once, and a re-index or a
``--stored`` rescan never embeds a photo again for the same model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from service.storage import validate
from service.storage._sql import chunked, dialect_insert
from service.storage.db import Database
from service.storage.errors import InvalidInputError
from service.storage.models import Embedding

# Stored as little-endian float32 whatever the machine, so a database file moves between machines.
_DTYPE = np.dtype("<f4")


_TABLE = cast(sa.Table, Embedding.__table__)


class EmbeddingStore:
    """Embeddings in the database; ``get_many`` and ``put_many`` are one statement per 500 hashes, for
    one model or (``get_models``, ``put_models``) several."""

    def __init__(self, db: Database) -> None:
        self._db = db
        t = _TABLE
        # Built once: building statements (and ON CONFLICT's ``excluded`` alias) per call costs more
        # than running them on SQLite.
        self._select = sa.select(t.c.sha256, t.c.model_id, t.c.dim, t.c.vector).where(
            t.c.model_id.in_(sa.bindparam("models", expanding=True)),
            t.c.sha256.in_(sa.bindparam("shas", expanding=True)))
        ins = dialect_insert(db.dialect, t)
        self._upsert = ins.on_conflict_do_update(
            index_elements=["sha256", "model_id"],
            set_={"dim": ins.excluded.dim, "vector": ins.excluded.vector})

    def get_many(self, model_id: str, sha256s: Iterable[str]) -> dict[str, npt.NDArray[np.float32]]:
        """The stored vectors among ``sha256s`` (missing ones are simply absent). The arrays are
        read-only views of the stored bytes: copy before changing them."""
        return self.get_models({model_id: sha256s})[model_id]

    def get_models(self, wanted: Mapping[str, Iterable[str]]) -> dict[str, dict[str, npt.NDArray[np.float32]]]:
        """:meth:`get_many` for several models in one read: one statement per 500 hashes for all of them
        (the scoring queue looks up every model's vectors of a batch at once; a statement each was a
        round trip, and on SQLite a release and retake of the GIL, each). Answers every model asked."""
        asked = {validate.text(m, "model_id", 128): set(shas) for m, shas in wanted.items()}
        out: dict[str, dict[str, npt.NDArray[np.float32]]] = {m: {} for m in asked}
        keys = list(dict.fromkeys(sha for shas in asked.values() for sha in shas))
        if not keys:
            return out
        models = list(asked)
        with self._db.reading() as conn:
            for chunk in chunked(keys):
                # .all(): every row in one call. Iterating fetches row by row, and each fetch releases and
                # retakes the GIL, which with a busy scoring thread beside it costs a switch interval.
                rows = conn.execute(self._select, {"models": models, "shas": chunk}).all()
                for sha, model, dim, blob in rows:
                    if sha not in asked[model]:  # asked of another model only
                        continue
                    vec = np.frombuffer(blob, dtype=_DTYPE)
                    if vec.shape[0] != dim:  # a torn or foreign row: treat as a miss, it gets re-embedded
                        continue
                    out[model][sha] = vec.astype(np.float32, copy=False)
        return out

    def put_many(self, model_id: str, vectors: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Stores the vectors; an existing (sha256, model_id) row is overwritten (idempotent)."""
        self.put_models({model_id: vectors})

    def put_models(self, vectors: Mapping[str, Mapping[str, npt.NDArray[np.float32]]]) -> None:
        """:meth:`put_many` for several models in one transaction. Every vector is checked before any
        is written: one invalid vector raises :class:`InvalidInputError` and nothing is stored."""
        rows = []
        for model_id, of_model in vectors.items():
            model = validate.text(model_id, "model_id", 128)
            for sha, v in of_model.items():
                validate.sha256(sha, "sha256")
                arr = np.asarray(v)
                if arr.ndim != 1 or arr.shape[0] == 0:
                    raise InvalidInputError(f"embedding of {sha} must be a non-empty 1-D vector, "
                                            f"got shape {arr.shape}", "vectors")
                if not np.all(np.isfinite(arr)):
                    raise InvalidInputError(f"embedding of {sha} has NaN or infinite values", "vectors")
                rows.append({"sha256": sha, "model_id": model, "dim": int(arr.shape[0]),
                             "vector": np.ascontiguousarray(arr, dtype=_DTYPE).tobytes()})
        if not rows:
            return
        with self._db.writing() as conn:
            for chunk in chunked(rows):
                conn.execute(self._upsert, chunk)

    def count(self, model_id: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(_TABLE)
        if model_id is not None:
            q = q.where(_TABLE.c.model_id == model_id)
        with self._db.reading() as conn:
            return int(conn.scalar(q) or 0)
