"""A brand adding references re-matches stored listings in the background (no re-embedding)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.app import create_app
from service.container import build_container
from tests.e2e.conftest import _free_port, edited_copy, load

pytestmark = pytest.mark.slow


def test_new_reference_flags_a_stored_listing(make_settings: Any, shared_models: Any, grocery_dir: Path) -> None:
    import threading

    import uvicorn

    settings = make_settings()
    holder: dict[str, Any] = {}

    def factory(s: Any) -> Any:
        holder["c"] = build_container(s, embedders=shared_models[1], background_rescans=True)
        return holder["c"]

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, container_factory=factory), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        for _ in range(600):
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        copy = edited_copy(load(grocery_dir / "catalogue" / "God-Morgon-Orange-Juice.jpg"))
        listing = {"listing_id": "early", "title": "orange juice", "price": {"amount": 3.0},
                   "seller": {"id": "s9"}, "images": [{"base64": base64.b64encode(copy).decode()}]}
        first = client.post("/v1/score", json=listing).json()
        assert first["verdict"] == "clear" and first["matches"] == []
        container = holder["c"]
        runs_before = {n: e.embedder.images_run for n, e in container.embedders.items()}

        client.post("/v1/brands", json={"slug": "god-morgon", "name": "God Morgon"})
        photo = (grocery_dir / "catalogue" / "God-Morgon-Orange-Juice.jpg").read_bytes()
        r = client.post("/v1/brands/god-morgon/references", files=[("files", ("g.jpg", photo, "image/jpeg"))],
                        data={"kind": "product", "sku": "GM-OJ", "price": "15"})
        assert r.status_code == 201
        assert container.stored_rescans.wait_idle(timeout=60)
        latest = client.get("/v1/listings/early").json()["history"][0]
        assert latest["verdict"] == "likely_counterfeit", latest
        assert any(item.listing_id == "early" for item in container.listings.review_queue("god-morgon"))
        # Only the new reference itself went through the models: the listing's photo was not re-embedded.
        added = {n: e.embedder.images_run - runs_before[n] for n, e in container.embedders.items()}
        assert all(v <= 1 for v in added.values()), added
        status = client.get("/v1/jobs/stored-rescan").json()
        assert status["enabled"] and status["runs"] >= 1
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=30)
