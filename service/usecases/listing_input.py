"""A listing's image sources (URL, base64, uploaded bytes, or a local file named by a rescan input)
to :class:`ListingImage`s (checked and hashed now, decoded when the pixels are first needed), through the
intake's :class:`ImageLoader` so limits and error fields are the same everywhere."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from service.domain.model import ListingImage
from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.images import ProbedImage
from service.intake.loader import ImageLoader

# base64 text of one request checked and hashed on the event loop itself, at most (~96 KB of photos).
_INLINE_BASE64_CHARS = 128 * 1024


@dataclass(frozen=True, slots=True)
class ImageSource:
    field: str
    url: str | None = None
    base64: str | None = None
    data: bytes | None = None
    path: Path | None = None


class ListingImageLoader:
    def __init__(self, loader: ImageLoader, model_side: int | None = None) -> None:
        self.loader = loader
        # The shorter side the whole-photo models need: a larger JPEG gets a smaller decode for them
        # (ProbedImage.listing_image). None: they embed the full photo.
        self.model_side = model_side

    def _local(self, s: ImageSource) -> ProbedImage:
        if s.base64 is not None:
            return self.loader.probe_base64(s.base64, s.field)
        data = s.data
        if s.path is not None:
            limit = self.loader.settings.max_image_bytes
            try:
                if s.path.stat().st_size > limit:
                    raise IntakeError(IntakeErrorCode.TOO_LARGE, f"{s.path.name} is larger than {limit} bytes",
                                      s.field)
                data = s.path.read_bytes()
            except OSError as exc:
                raise IntakeError(IntakeErrorCode.FETCH_FAILED, f"cannot read {s.path.name}: {exc.strerror}",
                                  s.field) from None
        if data is None:
            raise IntakeError(IntakeErrorCode.INVALID_URL, "no image given", s.field)
        return self.loader.probe_bytes(data, s.field)

    def load(self, sources: list[ImageSource]) -> list[ListingImage]:
        """Blocking: for worker threads (rescans). Each photo is checked (type, size, header limits) and
        hashed now, and decoded when its pixels are first needed (not at all when its embeddings are
        cached)."""
        self.loader.check_count(len(sources))
        probed = [self.loader.probe_url_sync(s.url, s.field) if s.url is not None else self._local(s)
                  for s in sources]
        return [p.listing_image(self.model_side) for p in probed]

    async def load_async(self, sources: list[ImageSource]) -> list[ListingImage]:
        """For the API: URLs fetched concurrently on the event loop, checking and hashing in worker threads
        (decoding is left to the scorer, as in :meth:`load`)."""
        self.loader.check_count(len(sources))

        # Small base64 photos are checked on the event loop: ~0.06 ms for a 27 KB JPEG, less than the hop
        # to a thread and back costs the loop. The rest go to a thread, so that no request stalls the
        # others: the budget caps the loop's share of one request (~1 ms even for base64 with line
        # breaks, which decodes ~5x slower than plain).
        budget = _INLINE_BASE64_CHARS
        inline: set[int] = set()
        for i, s in enumerate(sources):
            if s.url is None and s.base64 is not None and len(s.base64) <= budget:
                budget -= len(s.base64)
                inline.add(i)

        async def one(i: int, s: ImageSource) -> ListingImage:
            if s.url is not None:
                return (await self.loader.probe_url(s.url, s.field)).listing_image(self.model_side)
            if i in inline:
                return self._local(s).listing_image(self.model_side)
            return (await asyncio.to_thread(self._local, s)).listing_image(self.model_side)

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(sources))))
