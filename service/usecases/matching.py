"""From embeddings to matches: searching the reference indexes for copies, lookalikes and logos.

Index layout (one FAISS index per (model name, kind)):

* ``(copy model, product)``: official product photos, id = reference image id -> ``copy`` matches;
* ``(semantic model, product)``: the same photos in the semantic space -> ``lookalike`` matches;
* ``(logo model, logo)``: every logo as several *variants* (padded on white, on grey, inverted), id =
  image id * ``LOGO_ID_STRIDE`` + variant, searched with listing photos whole and with crops of them
  (a logo printed small on a product fills a crop, never the photo) -> ``logo`` matches with a box.

Crops and logo variants are keyed in the embedding cache by a hash derived from the image's sha256 and
the crop geometry, so a ``--stored`` rescan can re-match crops without pixels.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.domain.model import (
    Box,
    Match,
    ReferenceInfo,
    ReferenceKind,
    RGBImage,
    SignalName,
    Vectors,
    match_rank,
)
from service.domain.ports import CatalogReader, VectorIndex

LOGO_ID_STRIDE = 16
"""Logo variants share an image id: vector id = image_id * LOGO_ID_STRIDE + variant."""

IndexLookup = Callable[[str, ReferenceKind], VectorIndex | None]
Hit = tuple[SignalName, int, int, float, Box | None]  # signal, reference image id, photo index, similarity, box


def derived_key(sha256: str, tag: str) -> str:
    """A cache key for something computed from an image (a crop, a logo variant): a sha256 hex too."""
    return hashlib.sha256(f"{sha256}|{tag}".encode()).hexdigest()


def logo_variants(logo: RGBImage) -> list[RGBImage]:
    """The renderings of a logo that go into the logo index.

    A logo in a listing photo sits on some product, with margin around it in the crop that catches it;
    the variants cover tight and loose framing, light and dark surroundings, and a negative print.
    """
    img = Image.fromarray(logo)
    out: list[RGBImage] = [logo]
    for pad, colour in ((0.25, (255, 255, 255)), (0.6, (255, 255, 255)), (0.25, (128, 128, 128)),
                        (0.25, (30, 30, 30))):
        w, h = img.size
        side = int(max(w, h) * (1 + 2 * pad))
        canvas = Image.new("RGB", (side, side), colour)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        out.append(np.asarray(canvas))
    out.append(255 - logo)
    return out


@dataclass(frozen=True, slots=True)
class CropGrid:
    """Square windows of ``fractions`` of the shorter side, overlapping by half, over a photo."""

    fractions: tuple[float, ...] = (0.35, 0.55)

    def boxes(self, width: int, height: int) -> list[Box]:
        boxes: list[Box] = []
        short = min(width, height)
        for frac in self.fractions:
            side = max(8, int(short * frac))
            step = max(1, side // 2)
            xs = list(range(0, max(1, width - side + 1), step))
            ys = list(range(0, max(1, height - side + 1), step))
            # Always include the far edges, so a logo in a corner is covered as well as one in the middle.
            if xs[-1] != width - side and width > side:
                xs.append(width - side)
            if ys[-1] != height - side and height > side:
                ys.append(height - side)
            boxes += [(x, y, x + side, y + side) for y in ys for x in xs]
        return boxes

    def crops(self, pixels: RGBImage) -> list[tuple[Box, RGBImage]]:
        h, w = pixels.shape[:2]
        return [(b, pixels[b[1]:b[3], b[0]:b[2]]) for b in self.boxes(w, h)]

    def tag(self, box: Box) -> str:
        return "crop:" + ",".join(map(str, box))


@dataclass(frozen=True, slots=True)
class MatchingConfig:
    top_k: int = 10
    # Matches below these similarities are not worth resolving (the domain's ramps start higher).
    min_copy: float = 0.2
    min_lookalike: float = 0.4
    min_logo: float = 0.25
    max_matches_per_signal: int = 5
    # Photos whose search hits are remembered (per index: see SearchMemo); 0: none.
    memo_photos: int = 32_768


@dataclass(frozen=True, slots=True)
class ModelRoles:
    """Which model (by registry name) serves which role."""

    copy: str
    semantic: str | None
    logo: str


@dataclass(slots=True)
class ListingVectors:
    """Embeddings of one listing's photos, per role; crops carry their photo index and box."""

    copy: Vectors
    semantic: Vectors | None = None
    logo: Vectors | None = None  # whole photos in the logo model's space (None: same as copy)
    crops: list[tuple[int, Box, np.ndarray]] = field(default_factory=list)
    # The photos' content hashes, in row order (empty: unknown, nothing is remembered for them).
    photos: Sequence[str] = ()


class SearchMemo:
    """Whole-photo search hits by (model, kind, photo content hash), each valid for the index object and
    version it came from: a photo re-used across listings (marketplaces re-use them a lot) is searched
    once until the index changes. Hits are exact per photo (every index type searches each query on its
    own), and only the raw (vector id, similarity) pairs are kept, so a reference's details are still
    read from the catalog on every match. Thread-safe; least recently used entries go first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, str], tuple[object, int, float, list[tuple[int, float]]]] = (
            OrderedDict())

    def get(self, key: tuple[str, str, str], index: object, version: int,
            min_sim: float) -> list[tuple[int, float]] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is not index or entry[1] != version or entry[2] != min_sim:
                return None
            self._entries.move_to_end(key)
            return entry[3]

    def put(self, key: tuple[str, str, str], index: object, version: int, min_sim: float,
            hits: list[tuple[int, float]]) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[key] = (index, version, min_sim, hits)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class ReferenceMatcher:
    def __init__(self, indexes: IndexLookup, catalog: CatalogReader, roles: ModelRoles,
                 config: MatchingConfig | None = None) -> None:
        self._indexes = indexes
        self._catalog = catalog
        self.roles = roles
        self.config = config or MatchingConfig()
        self.memo = SearchMemo(self.config.memo_photos)

    def open_indexes(self) -> None:
        """Open every index the matcher searches (each opens on its first search otherwise): a stored
        rescan's worker processes, forked next, inherit them open instead of each loading them."""
        for model, kind in ((self.roles.copy, ReferenceKind.PRODUCT), (self.roles.semantic, ReferenceKind.PRODUCT),
                            (self.roles.logo, ReferenceKind.LOGO)):
            if model is not None:
                self._indexes(model, kind)

    def _search(self, model: str, kind: ReferenceKind, queries: Vectors,
                min_sim: float) -> list[tuple[int, int, float]]:
        """(query row, vector id, similarity) above ``min_sim``."""
        index = self._indexes(model, kind)
        if index is None or index.ntotal == 0 or len(queries) == 0:
            return []
        return self._search_index(index, queries, min_sim)

    def _search_index(self, index: VectorIndex, queries: Vectors, min_sim: float) -> list[tuple[int, int, float]]:
        sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), self.config.top_k)
        rows, cols = np.nonzero((ids >= 0) & (sims >= min_sim))
        # .tolist() turns whole columns into Python ints and floats at once (per element: ~10x slower).
        return list(zip(rows.tolist(), ids[rows, cols].tolist(), sims[rows, cols].tolist(), strict=True))

    def match(self, vectors: ListingVectors) -> list[Match]:
        """Every match worth reporting, best first per signal (at most ``max_matches_per_signal`` each,
        one per reference: the best photo or crop for it)."""
        return self.match_many([vectors])[0]

    def match_many(self, batch: Sequence[ListingVectors]) -> list[list[Match]]:
        """:meth:`match` for many listings: one search per index for the whole batch (the photos of every
        listing stacked) and one catalog lookup; answers in the order of ``batch``."""
        c = self.config
        hits: list[list[Hit]] = [[] for _ in batch]

        def whole(signal: SignalName, model: str | None, kind: ReferenceKind,
                  pick: Callable[[ListingVectors], Vectors | None], min_sim: float, stride: int = 1) -> None:
            index = self._indexes(model, kind) if model is not None else None
            if model is None or index is None or index.ntotal == 0:
                return
            # (Read before searching: hits found while the index changes are kept under the old
            # version, which no later lookup asks for.)
            version = index.version
            todo: list[tuple[int, int, str | None]] = []  # listing, photo row, content hash
            rows: list[np.ndarray] = []
            for i, lv in enumerate(batch):
                v = pick(lv)
                if v is None:
                    continue
                photos = lv.photos if len(lv.photos) == len(v) else ()
                for r in range(len(v)):
                    sha = photos[r] if photos else None
                    got = self.memo.get((model, kind.value, sha), index, version, min_sim) if sha else None
                    if got is None:
                        todo.append((i, r, sha))
                        rows.append(v[r])
                    else:
                        hits[i].extend((signal, vid // stride, r, sim, None) for vid, sim in got)
            if not todo:
                return
            found: list[list[tuple[int, float]]] = [[] for _ in todo]
            for row, vid, sim in self._search_index(index, np.stack(rows), min_sim):
                found[row].append((vid, sim))
            for (i, r, sha), pairs in zip(todo, found, strict=True):
                hits[i].extend((signal, vid // stride, r, sim, None) for vid, sim in pairs)
                if sha is not None:
                    self.memo.put((model, kind.value, sha), index, version, min_sim, pairs)

        whole(SignalName.COPY, self.roles.copy, ReferenceKind.PRODUCT, lambda lv: lv.copy, c.min_copy)
        whole(SignalName.LOOKALIKE, self.roles.semantic, ReferenceKind.PRODUCT, lambda lv: lv.semantic,
              c.min_lookalike)
        whole(SignalName.LOGO, self.roles.logo, ReferenceKind.LOGO,
              lambda lv: lv.logo if lv.logo is not None else lv.copy, c.min_logo, LOGO_ID_STRIDE)
        for i, lv in enumerate(batch):  # crops: only the few listings the cascade sent on
            if not lv.crops:
                continue
            crop_matrix = np.stack([v for _, _, v in lv.crops]).astype(np.float32, copy=False)
            for row, vid, sim in self._search(self.roles.logo, ReferenceKind.LOGO, crop_matrix, c.min_logo):
                image_index, box, _ = lv.crops[row]
                hits[i].append((SignalName.LOGO, vid // LOGO_ID_STRIDE, image_index, sim, box))
            if self.roles.logo == self.roles.copy:
                # The same crops in the copy index find an official photo re-used inside a collage or
                # on a new background (measured: background-edit copies 0.50 -> 0.83 right sku first).
                for row, vid, sim in self._search(self.roles.copy, ReferenceKind.PRODUCT, crop_matrix, c.min_copy):
                    image_index, box, _ = lv.crops[row]
                    hits[i].append((SignalName.COPY, vid, image_index, sim, box))
        best = [self._best(h) for h in hits]
        wanted = {image_id for b in best for _, image_id in b}
        refs: dict[int, ReferenceInfo] = self._catalog.references(wanted) if wanted else {}
        return [self._resolve(b, refs) for b in best]

    @staticmethod
    def _best(hits: Sequence[Hit]) -> dict[tuple[SignalName, int], tuple[int, float, Box | None]]:
        """One hit per (signal, reference): its best photo or crop."""
        best: dict[tuple[SignalName, int], tuple[int, float, Box | None]] = {}
        for signal, image_id, row, sim, box in hits:
            key = (signal, image_id)
            if key not in best or sim > best[key][1]:
                best[key] = (row, sim, box)
        return best

    def _resolve(self, best: dict[tuple[SignalName, int], tuple[int, float, Box | None]],
                 refs: dict[int, ReferenceInfo]) -> list[Match]:
        by_signal: dict[SignalName, list[Match]] = {}
        for (signal, image_id), (row, sim, box) in best.items():
            ref = refs.get(image_id)
            if ref is None:  # deleted between search and resolve
                continue
            by_signal.setdefault(signal, []).append(
                Match(reference=ref, signal=signal, similarity=sim, image_index=row, box=box))
        out: list[Match] = []
        for signal in (SignalName.COPY, SignalName.LOOKALIKE, SignalName.LOGO):
            ms = sorted(by_signal.get(signal, []), key=match_rank)
            out += ms[: self.config.max_matches_per_signal]
        return out
