"""One entry point from an untrusted image reference (URL, base64 / data URL, raw bytes) to a checked and
hashed :class:`ProbedImage` (decoded when its pixels are needed), with every intake limit applied; the API
and the CLI rescan load images through it so the limits and error fields are the same everywhere."""

from __future__ import annotations

import asyncio
import typing

from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.fetch import SafeFetcher
from service.intake.images import ProbedImage, decode_base64, probe_image

if typing.TYPE_CHECKING:
    from service.settings import IntakeSettings


class ImageLoader:
    """Fetch or unpack, then decode, untrusted images under ``settings`` (an ``IntakeSettings``).

    The fetcher is created from the same settings unless one is given (to share its connection pool);
    the loader closes only a fetcher it created.
    """

    def __init__(self, settings: IntakeSettings, fetcher: SafeFetcher | None = None) -> None:
        self.settings = settings
        self._own_fetcher = fetcher is None
        self.fetcher = fetcher if fetcher is not None else SafeFetcher(settings)

    def check_count(self, count: int, field: str = "images") -> None:
        """Refuse a request with more images than ``max_images``."""
        if count > self.settings.max_images:
            raise IntakeError(IntakeErrorCode.TOO_MANY_IMAGES,
                              f"{count} images; at most {self.settings.max_images} are accepted", field)

    # Each source is checked (type, byte size, header limits) and hashed, not decoded: see
    # :class:`ProbedImage` (``.decode()`` for the pixels, or ``.listing_image()`` to decode on first use).

    def probe_bytes(self, data: bytes, field: str | None = None) -> ProbedImage:
        return probe_image(data, self.settings, field)

    def probe_base64(self, payload: str | bytes, field: str | None = None) -> ProbedImage:
        data = decode_base64(payload, field, self.settings.max_image_bytes)
        return probe_image(data, self.settings, field)

    async def probe_url(self, url: str, field: str | None = None) -> ProbedImage:
        fetched = await self.fetcher.fetch(url, field)
        return await asyncio.to_thread(probe_image, fetched.content, self.settings, field)

    def probe_url_sync(self, url: str, field: str | None = None) -> ProbedImage:
        return probe_image(self.fetcher.fetch_sync(url, field).content, self.settings, field)

    def close(self) -> None:
        if self._own_fetcher:
            self.fetcher.close()

    async def aclose(self) -> None:
        if self._own_fetcher:
            await self.fetcher.aclose()
