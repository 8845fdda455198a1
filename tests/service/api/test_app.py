"""The app's lifecycle over real HTTP: live at once, ready only once the container is built."""

from __future__ import annotations

import gc
import threading
from typing import Any

import httpx
import uvicorn

from service.api.app import create_app
from service.settings import Settings
from tests.e2e.conftest import _free_port


class _FakeContainer:
    """Only the lifecycle is under test here; the real container is covered by the e2e tests."""

    def describe(self) -> dict[str, Any]:
        return {"models": {"m": {"provider": "cpu"}}}

    def index_sizes(self) -> dict[str, int]:
        return {}

    def model_time(self) -> dict[str, Any]:
        return {}

    def queue_stats(self) -> None:
        return None

    def close(self) -> None:
        pass


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/livez", timeout=1)
            break
        except httpx.HTTPError:
            threading.Event().wait(0.05)
    return server, t, url


def test_readyz_is_503_until_loaded(tmp_path: Any) -> None:
    release = threading.Event()

    def factory(_: Settings) -> Any:
        release.wait(30)
        return _FakeContainer()

    server, t, url = _serve(create_app(Settings(data_dir=tmp_path), container_factory=factory))
    try:
        assert httpx.get(f"{url}/livez").status_code == 200
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        score = httpx.post(f"{url}/v1/score", json={"listing_id": "x"})
        assert score.status_code == 503 and score.json()["error"]["code"] == "not_ready"
        release.set()
        for _ in range(100):
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["models"]["m"]["provider"] == "cpu"
        assert "counterlens_ready 1.0" in httpx.get(f"{url}/metrics").text
    finally:
        release.set()
        server.should_exit = True
        t.join(timeout=10)


def test_failed_start_is_reported_not_hidden(tmp_path: Any) -> None:
    def factory(_: Settings) -> Any:
        raise RuntimeError("model file missing")

    server, t, url = _serve(create_app(Settings(data_dir=tmp_path), container_factory=factory))
    try:
        for _ in range(100):
            body = httpx.get(f"{url}/readyz").json()
            if body["status"] == "error":
                break
            threading.Event().wait(0.05)
        assert body["status"] == "error" and "model file missing" in body["detail"]
        assert httpx.get(f"{url}/nope").json()["error"]["code"] == "not_found"
    finally:
        server.should_exit = True
        t.join(timeout=10)


def test_a_served_app_freezes_what_start_up_made(tmp_path: Any) -> None:
    """The worker's app (``main.app_factory``) freezes start-up's objects once loaded, so a full garbage
    collection under load does not scan them again; an app built for a test or an embedding process
    leaves the collector alone."""
    assert gc.get_freeze_count() == 0
    plain, _, plain_url = _serve(create_app(Settings(data_dir=tmp_path), container_factory=lambda _: _FakeContainer()))
    try:
        _wait_ready(plain_url)
        assert gc.get_freeze_count() == 0
    finally:
        plain.should_exit = True
    served, _, url = _serve(create_app(Settings(data_dir=tmp_path), container_factory=lambda _: _FakeContainer(),
                                       freeze_after_load=True))
    try:
        _wait_ready(url)
        assert gc.get_freeze_count() > 1000  # the imports alone are thousands of objects
    finally:
        served.should_exit = True
        gc.unfreeze()  # this test process goes on: give its objects back to the collector


def _wait_ready(url: str) -> None:
    for _ in range(200):
        if httpx.get(f"{url}/readyz").status_code == 200:
            return
        threading.Event().wait(0.05)
    raise AssertionError("not ready")


def test_a_score_body_over_the_request_limit_is_refused_as_it_is_read(tmp_path: Any) -> None:
    """intake.max_request_bytes ("auto": one listing's photos in base64 plus 1 MiB, here 1,181,910 bytes):
    a declared Content-Length over it is answered 413 before anything is read, a chunked body growing past
    it is cut off where the route reads it; both with the service's JSON error. (Without it a multipart
    part was spooled whole before the photo's own limit applied.)"""
    settings = Settings(data_dir=tmp_path, intake={"max_images": 1, "max_image_bytes": 100_000})
    assert settings.intake.request_limit() == 1_181_910
    server, t, url = _serve(create_app(settings, container_factory=lambda _: _FakeContainer()))

    def chunks() -> Any:
        for _ in range(30):
            yield b" " * 100_000

    try:
        upload = httpx.post(f"{url}/v1/score", data={"listing": '{"listing_id": "x"}'},
                            files=[("images", ("a.jpg", b"\xff" * 3_000_000, "image/jpeg"))], timeout=30)
        streamed = httpx.post(f"{url}/v1/score/batch", content=chunks(), timeout=30,
                              headers={"content-type": "application/json"})
        for r in (upload, streamed):
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "too_large" and r.json()["error"]["field"] == "body"
        small = httpx.post(f"{url}/v1/score", json={"listing_id": 1}, timeout=30)
        assert small.status_code == 422  # read whole and validated: the limit leaves it alone
        # Another route (a brand's catalog upload) is not held to the score limit.
        other = httpx.post(f"{url}/v1/nope", content=b" " * 2_000_000, timeout=30)
        assert other.status_code == 404
    finally:
        server.should_exit = True
        t.join(timeout=10)
