"""ImageLoader end to end: URL, base64 and bytes through the same limits, on the real test server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Iterator

import pytest

from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.loader import ImageLoader
from service.settings import IntakeSettings
from tests.intake.conftest import ImageServer


@pytest.fixture(scope="module")
def loader() -> Iterator[ImageLoader]:
    settings = IntakeSettings(max_images=3, max_image_bytes=64 * 1024, fetch_timeout_s=2.0,
                              allow_private_hosts=["localhost"])
    created = ImageLoader(settings)
    yield created
    created.close()


def test_url_base64_and_bytes_give_the_same_image(loader: ImageLoader, image_server: ImageServer,
                                                  photo_bytes: bytes) -> None:
    from_url = asyncio.run(loader.probe_url(image_server.url("/photo.jpg"), "images[0].url")).decode()
    from_url_sync = loader.probe_url_sync(image_server.url("/redirect/1"), "images[1].url").decode()
    data_url = "data:image/jpeg;base64," + base64.b64encode(photo_bytes).decode()
    from_b64 = loader.probe_base64(data_url, "images[2].data").decode()
    from_bytes = loader.probe_bytes(photo_bytes, "images[3].data").decode()
    expected = hashlib.sha256(photo_bytes).hexdigest()
    for img in (from_url, from_url_sync, from_b64, from_bytes):
        assert img.sha256 == expected
        assert (img.pixels == from_bytes.pixels).all()


@pytest.mark.parametrize(("route", "code"), [("/page.html", IntakeErrorCode.UNSUPPORTED_TYPE),
                                             ("/svg-as-jpeg", IntakeErrorCode.UNSUPPORTED_TYPE),
                                             ("/status?code=410", IntakeErrorCode.FETCH_FAILED)])
def test_fetched_non_images_are_refused_with_the_field(loader: ImageLoader, image_server: ImageServer,
                                                       route: str, code: IntakeErrorCode) -> None:
    with pytest.raises(IntakeError) as info:
        asyncio.run(loader.probe_url(image_server.url(route), "images[5].url"))
    assert (info.value.code, info.value.field) == (code, "images[5].url")
    body = info.value.to_dict()
    assert body == {"code": code.value, "message": info.value.message, "field": "images[5].url"}


def test_too_many_images(loader: ImageLoader) -> None:
    loader.check_count(3)
    with pytest.raises(IntakeError) as info:
        loader.check_count(4)
    assert (info.value.code, info.value.field, info.value.http_status) == (
        IntakeErrorCode.TOO_MANY_IMAGES, "images", 422)
