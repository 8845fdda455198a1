"""The keypoint cache in the database: one row per (image content sha256, extractor id + parameters).

Implements :class:`~service.domain.ports.KeypointCache`. Like the embedding cache it is keyed by content,
so references and listing photos share it, a photo re-used by many listings is described once, and a
``--stored`` rescan verifies keypoints against new references without the photo's pixels. The row also
keeps the photo's latest verification and the fingerprint of the references it was made against, so a
new process verifies a photo again only after the references changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import sqlalchemy as sa

from service.domain.model import KeypointSet
from service.domain.ports import VerifiedReference
from service.storage import validate
from service.storage._sql import chunked, dialect_insert
from service.storage.db import Database
from service.storage.errors import InvalidInputError
from service.storage.models import PhotoKeypoints

_POINT = np.dtype("<f4")  # little-endian whatever the machine: a database file moves between machines
_TABLE = cast(sa.Table, PhotoKeypoints.__table__)


def encode(features: KeypointSet) -> bytes:
    return (np.ascontiguousarray(features.points, dtype=_POINT).tobytes()
            + np.ascontiguousarray(features.descriptors, dtype=np.uint8).tobytes())


def decode(count: int, dim: int, width: int, height: int, scale: float, data: bytes) -> KeypointSet | None:
    """The stored features, or None for a row whose bytes do not add up (it is then described again)."""
    if len(data) != count * (2 * _POINT.itemsize + dim):
        return None
    split = count * 2 * _POINT.itemsize
    points = np.frombuffer(data, dtype=_POINT, count=count * 2).reshape(count, 2).astype(np.float32, copy=False)
    desc = np.frombuffer(data, dtype=np.uint8, offset=split).reshape(count, dim)
    return KeypointSet(points, desc, width, height, scale)


class KeypointStore:
    """Keypoints in the database; ``get_many`` and ``put_many`` are one statement per 500 hashes."""

    def __init__(self, db: Database) -> None:
        self._db = db
        t = _TABLE
        self._select = sa.select(t.c.sha256, t.c.count, t.c.dim, t.c.width, t.c.height, t.c.scale, t.c.data).where(
            t.c.extractor_id == sa.bindparam("extractor"), t.c.sha256.in_(sa.bindparam("shas", expanding=True)))
        ins = dialect_insert(db.dialect, t)
        self._upsert = ins.on_conflict_do_update(
            index_elements=["sha256", "extractor_id"],
            set_={c: getattr(ins.excluded, c) for c in ("count", "dim", "width", "height", "scale", "data")})
        self._select_described = sa.select(t.c.sha256).where(
            t.c.extractor_id == sa.bindparam("extractor"), t.c.sha256.in_(sa.bindparam("shas", expanding=True)))
        self._select_verified = sa.select(t.c.sha256, t.c.verified).where(
            t.c.extractor_id == sa.bindparam("extractor"), t.c.verified_refs == sa.bindparam("refs"),
            t.c.sha256.in_(sa.bindparam("shas", expanding=True)))
        # A listing photo's verification made against the current references, or else its features: both
        # in one read (the blob is read either way: a verification that does not read falls back on it).
        self._select_recall = sa.select(t.c.sha256, t.c.verified_refs, t.c.verified, t.c.count, t.c.dim,
                                        t.c.width, t.c.height, t.c.scale, t.c.data).where(
            t.c.extractor_id == sa.bindparam("extractor"), t.c.sha256.in_(sa.bindparam("shas", expanding=True)))
        self._update_verified = t.update().where(
            t.c.sha256 == sa.bindparam("b_sha"), t.c.extractor_id == sa.bindparam("b_extractor"),
        ).values(verified_refs=sa.bindparam("b_refs"), verified=sa.bindparam("b_verified"))

    def _rows(self, stmt: sa.Select[Any], params: dict[str, str], sha256s: Iterable[str]) -> list[Any]:
        """The rows of ``stmt`` for the distinct ``sha256s``, one statement per 500 of them."""
        keys = list(dict.fromkeys(sha256s))
        if not keys:
            return []
        with self._db.reading() as conn:
            return [row for chunk in chunked(keys) for row in conn.execute(stmt, {**params, "shas": chunk}).all()]

    def get_many(self, extractor_id: str, sha256s: Iterable[str]) -> dict[str, KeypointSet]:
        """The stored features among ``sha256s`` (missing ones are absent). Read-only arrays."""
        extractor = validate.text(extractor_id, "extractor_id", 128)
        out: dict[str, KeypointSet] = {}
        for sha, count, dim, w, h, scale, data in self._rows(self._select, {"extractor": extractor}, sha256s):
            got = decode(count, dim, w, h, scale, data)
            if got is not None:
                out[sha] = got
        return out

    def described(self, extractor_id: str, sha256s: Iterable[str]) -> set[str]:
        """The photos among ``sha256s`` whose features are stored: one indexed lookup per 500, no blob read."""
        extractor = validate.text(extractor_id, "extractor_id", 128)
        return {sha for (sha,) in self._rows(self._select_described, {"extractor": extractor}, sha256s)}

    def put_many(self, extractor_id: str, features: Mapping[str, KeypointSet]) -> None:
        """Stores the features; an existing (sha256, extractor_id) row is overwritten (idempotent)."""
        self._write(self._feature_rows(extractor_id, features), [])

    def _feature_rows(self, extractor_id: str, features: Mapping[str, KeypointSet]) -> list[dict[str, Any]]:
        extractor = validate.text(extractor_id, "extractor_id", 128)
        rows = []
        for sha, f in features.items():
            validate.sha256(sha, "sha256")
            if not np.all(np.isfinite(f.points)):
                raise InvalidInputError(f"keypoints of {sha} have NaN or infinite positions", "features")
            if f.width < 1 or f.height < 1 or not f.scale > 0:
                raise InvalidInputError(f"keypoints of {sha} need a positive size and scale", "features")
            rows.append({"sha256": sha, "extractor_id": extractor, "count": len(f), "dim": f.descriptors.shape[1],
                         "width": f.width, "height": f.height, "scale": float(f.scale), "data": encode(f)})
        return rows

    def _write(self, features: list[dict[str, Any]], verified: list[dict[str, Any]]) -> None:
        """Feature rows upserted, then verifications set, in one transaction (rows validated already)."""
        if not features and not verified:
            return
        with self._db.writing() as conn:
            for chunk in chunked(features):
                conn.execute(self._upsert, chunk)
            for chunk in chunked(verified):
                conn.execute(self._update_verified, chunk)

    def get_verified(self, extractor_id: str, references: str,
                     sha256s: Iterable[str]) -> dict[str, list[VerifiedReference]]:
        """The latest verifications among ``sha256s`` made against ``references`` (others are absent).
        A row whose JSON does not read is absent: the photo is verified again."""
        extractor = validate.text(extractor_id, "extractor_id", 128)
        out: dict[str, list[VerifiedReference]] = {}
        for sha, text in self._rows(self._select_verified, {"extractor": extractor, "refs": references}, sha256s):
            got = _read_verified(text)
            if got is not None:
                out[sha] = got
        return out

    def put_verified(self, extractor_id: str, references: str,
                     verified: Mapping[str, Sequence[VerifiedReference]]) -> None:
        """Overwrite the photos' latest verification; a photo without a features row is ignored (there
        is nothing to verify without features, and the row is where a verification lives)."""
        self._write([], self._verified_rows(extractor_id, references, verified))

    def _verified_rows(self, extractor_id: str, references: str,
                       verified: Mapping[str, Sequence[VerifiedReference]]) -> list[dict[str, Any]]:
        extractor = validate.text(extractor_id, "extractor_id", 128)
        refs = validate.text(references, "references", 64)
        return [{"b_sha": validate.sha256(sha, "sha256"), "b_extractor": extractor, "b_refs": refs,
                 "b_verified": json.dumps([[v.image_id, v.inliers, None if v.box is None else list(v.box)]
                                           for v in found])}
                for sha, found in verified.items()]

    def recall(self, extractor_id: str, references: str | None,
               sha256s: Iterable[str]) -> tuple[dict[str, list[VerifiedReference]], dict[str, KeypointSet]]:
        """:meth:`get_verified` and, for the photos it has no answer for, :meth:`get_many`, in one read."""
        extractor = validate.text(extractor_id, "extractor_id", 128)
        verified: dict[str, list[VerifiedReference]] = {}
        features: dict[str, KeypointSet] = {}
        for sha, refs, text, count, dim, w, h, scale, data in self._rows(
                self._select_recall, {"extractor": extractor}, sha256s):
            got = _read_verified(text) if references is not None and refs == references else None
            if got is not None:
                verified[sha] = got
            elif (f := decode(count, dim, w, h, scale, data)) is not None:
                features[sha] = f
        return verified, features

    def put_verified_with(self, extractor_id: str, references: str | None,
                          features: Mapping[str, KeypointSet],
                          verified: Mapping[str, Sequence[VerifiedReference]]) -> None:
        """:meth:`put_many` of ``features`` and :meth:`put_verified` of ``verified`` (skipped when
        ``references`` is None) in one transaction: both or neither are stored."""
        rows = self._verified_rows(extractor_id, references, verified) if references is not None else []
        self._write(self._feature_rows(extractor_id, features), rows)

    def count(self, extractor_id: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(_TABLE)
        if extractor_id is not None:
            q = q.where(_TABLE.c.extractor_id == extractor_id)
        with self._db.reading() as conn:
            return int(conn.scalar(q) or 0)


def _read_verified(text: str | None) -> list[VerifiedReference] | None:
    try:
        rows = json.loads(text or "")
        return [VerifiedReference(int(i), int(n), None if box is None else
                                  (int(box[0]), int(box[1]), int(box[2]), int(box[3])))
                for i, n, box in rows]
    except (ValueError, TypeError, IndexError):
        return None
