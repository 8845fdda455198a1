"""The test oracle of the index tests: exact brute-force inner-product search in float64 numpy, and the
synthetic embeddings (a Gaussian mixture on the sphere, closer to real embeddings than uniform noise)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def unit_rows(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    x = np.asarray(x, dtype=np.float64)
    out: npt.NDArray[np.float32] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def exact_search(
    base: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Top-k (similarities, ids) by exhaustive float64 inner product, best first."""
    sims = queries.astype(np.float64) @ base.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


def recall_at_k(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


@dataclass(frozen=True)
class Embeddings:
    ids: npt.NDArray[np.int64]
    vectors: npt.NDArray[np.float32]
    queries: npt.NDArray[np.float32]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def mixture(n: int, dim: int, *, clusters: int, queries: int, seed: int, spread: float = 1.0) -> Embeddings:
    """n points and queries drawn around `clusters` random centres (cosine to it ~ 1/sqrt(1+spread²)).

    Ids are sparse and shuffled (as catalog ids are), never 0..n-1, so a slot/id mix-up cannot pass.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> npt.NDArray[np.float32]:
        which = rng.integers(0, clusters, size=m)
        return unit_rows(centres[which] + spread * rng.standard_normal((m, dim)) / np.sqrt(dim))

    ids = rng.choice(np.arange(10, 50 * n, dtype=np.int64), size=n, replace=False)
    return Embeddings(ids=ids, vectors=draw(n), queries=draw(queries))
