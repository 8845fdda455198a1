"""Catalog changes re-match stored listings in the background (no re-embedding): a brand adding a
reference, authorizing or revoking a seller, changing a product's reference price, its verdict
thresholds or its names."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pytest
import skimage.data
import uvicorn
from PIL import Image

from embeddings.thread_batcher import ThreadBatcher
from service.api.app import create_app
from service.container import Container, build_container
from tests.conftest import jpeg_bytes
from tests.e2e.conftest import _free_port, edited_copy, load

pytestmark = pytest.mark.slow

PHOTO = "God-Morgon-Orange-Juice.jpg"


@dataclass
class Served:
    client: httpx.Client
    holder: dict[str, Container]

    @property
    def container(self) -> Container:
        return self.holder["c"]

    def latest(self, listing_id: str) -> dict[str, Any]:
        """The listing's newest stored score, once the background rescans have nothing left to do."""
        rescans = self.container.stored_rescans
        assert rescans is not None and rescans.wait_idle(timeout=60)
        history: list[dict[str, Any]] = self.client.get(f"/v1/listings/{listing_id}").json()["history"]
        return history[0]

    def open_review(self, brand: str) -> set[str]:
        return {item.listing_id for item in self.container.listings.review_queue(brand)}


@pytest.fixture
def served(make_settings: Any, shared_models: Any) -> Iterator[Served]:
    """The API on a real loopback server, with background rescans on (the models shared)."""
    holder: dict[str, Container] = {}

    def factory(s: Any) -> Container:
        holder["c"] = build_container(s, embedders=shared_models[1], background_rescans=True)
        return holder["c"]

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(make_settings(), container_factory=factory),
                                           host="127.0.0.1", port=port, log_level="warning"))
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
        yield Served(client, holder)
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=30)


def _copy_listing(grocery_dir: Path, listing_id: str, seller: str) -> dict[str, Any]:
    """An edited copy of God Morgon's official photo at 3.00 (its reference price is 15.00)."""
    copy = edited_copy(load(grocery_dir / "catalogue" / PHOTO))
    return {"listing_id": listing_id, "title": "orange juice", "price": {"amount": 3.0}, "seller": {"id": seller},
            "images": [{"base64": base64.b64encode(copy).decode()}]}


def _add_reference(served: Served, grocery_dir: Path) -> None:
    served.client.post("/v1/brands", json={"slug": "god-morgon", "name": "God Morgon"})
    photo = (grocery_dir / "catalogue" / PHOTO).read_bytes()
    r = served.client.post("/v1/brands/god-morgon/references", files=[("files", ("g.jpg", photo, "image/jpeg"))],
                           data={"kind": "product", "sku": "GM-OJ", "price": "15"})
    assert r.status_code == 201, r.text


def test_new_reference_flags_a_stored_listing(served: Served, grocery_dir: Path) -> None:
    client = served.client
    first = client.post("/v1/score", json=_copy_listing(grocery_dir, "early", "s9")).json()
    assert first["verdict"] == "clear" and first["matches"] == []
    container = served.container
    batchers = {n: cast(ThreadBatcher, e.embedder) for n, e in container.embedders.items()}
    runs_before = {n: b.images_run for n, b in batchers.items()}

    _add_reference(served, grocery_dir)
    latest = served.latest("early")
    assert latest["verdict"] == "likely_counterfeit", latest
    assert "early" in served.open_review("god-morgon")
    # Only the new reference itself went through the models: the listing's photo was not re-embedded.
    added = {n: b.images_run - runs_before[n] for n, b in batchers.items()}
    assert all(v <= 1 for v in added.values()), added
    status = client.get("/v1/jobs/stored-rescan").json()
    assert status["enabled"] and status["runs"] >= 1


def test_a_brands_sellers_and_prices_re_read_its_stored_listings(served: Served, grocery_dir: Path) -> None:
    client = served.client
    _add_reference(served, grocery_dir)
    for lid, seller in (("by-s9", "s9"), ("by-other", "s10")):
        got = client.post("/v1/score", json=_copy_listing(grocery_dir, lid, seller)).json()
        assert got["verdict"] == "likely_counterfeit", got
    flagged = served.latest("by-s9")
    other = served.latest("by-other")
    runs = client.get("/v1/jobs/stored-rescan").json()["runs"]

    # The brand authorizes s9: s9's stored listing is read again without any call from the platform,
    # and leaves the review queue; the other seller's listing stays flagged.
    assert client.post("/v1/brands/god-morgon/sellers", json={"seller_id": "s9"}).status_code == 201
    authorized = served.latest("by-s9")
    assert authorized["risk"] < flagged["risk"] - 0.3 and authorized["verdict"] == "clear", authorized
    assert "by-s9" not in served.open_review("god-morgon")
    assert "by-other" in served.open_review("god-morgon")
    assert served.latest("by-other")["verdict"] == "likely_counterfeit"
    assert client.get("/v1/jobs/stored-rescan").json()["runs"] == runs + 1
    # The jobs ran in one child process (started by the first, kept for the next), not in the server's.
    process = served.container.rescan_process
    assert process is not None and process.started == 1

    # Authorizing it again changes nothing: no rescan.
    assert client.post("/v1/brands/god-morgon/sellers", json={"seller_id": "s9"}).status_code == 201
    served.latest("by-s9")
    assert client.get("/v1/jobs/stored-rescan").json()["runs"] == runs + 1

    # Revoked: flagged again.
    assert client.delete("/v1/brands/god-morgon/sellers/s9").status_code == 204
    revoked = served.latest("by-s9")
    assert revoked["verdict"] == "likely_counterfeit" and revoked["risk"] == pytest.approx(flagged["risk"], abs=1e-6)
    assert "by-s9" in served.open_review("god-morgon")

    # The brand's reference price drops to the listings' 3.00: they are no longer priced far below it.
    r = client.put("/v1/brands/god-morgon/products/GM-OJ", json={"title": "Orange juice",
                                                                 "price": {"amount": 3.0, "currency": "USD"}})
    assert r.status_code == 200, r.text
    repriced = served.latest("by-other")
    assert repriced["risk"] < other["risk"] - 0.05, (other, repriced)
    assert not any("reference price" in reason for reason in repriced["result"]["reasons"]), repriced["result"]


def test_a_brands_thresholds_and_names_re_read_stored_listings(served: Served, grocery_dir: Path) -> None:
    client = served.client
    _add_reference(served, grocery_dir)
    got = client.post("/v1/score", json=_copy_listing(grocery_dir, "copy", "s9")).json()
    assert got["verdict"] == "likely_counterfeit", got
    flagged = served.latest("copy")
    # A listing that names the brand by a name the brand has not registered yet, on a photo unlike it.
    cat = np.asarray(Image.open(Path(skimage.data.__file__).parent / "chelsea.png").convert("RGB"))
    text_only = {"listing_id": "named", "title": "Morgonsol replica 1:1", "price": {"amount": 3.0},
                 "seller": {"id": "s7"}, "images": [{"base64": base64.b64encode(jpeg_bytes(cat)).decode()}]}
    client.post("/v1/score", json=text_only)
    client.post("/v1/score", json={**text_only, "listing_id": "zebrax", "title": "Zebrax replica 1:1 AAA"})
    before_brand = served.latest("zebrax")
    unnamed = served.latest("named")
    assert unnamed["verdict"] == "clear", unnamed
    runs = client.get("/v1/jobs/stored-rescan").json()["runs"]

    # The brand raises its thresholds above the listing's risk: the stored verdict follows (the risk
    # does not move) and the listing leaves the review queue.
    r = client.patch("/v1/brands/god-morgon", json={"review_threshold": 0.97, "likely_threshold": 0.99})
    assert r.status_code == 200, r.text
    relaxed = served.latest("copy")
    assert relaxed["verdict"] == "clear" and relaxed["risk"] == pytest.approx(flagged["risk"], abs=1e-6)
    assert "copy" not in served.open_review("god-morgon")
    assert client.get("/v1/jobs/stored-rescan").json()["runs"] == runs + 1
    # Only the review threshold back down: review, and in the queue again.
    client.patch("/v1/brands/god-morgon", json={"review_threshold": 0.9})
    assert served.latest("copy")["verdict"] == "review"
    assert "copy" in served.open_review("god-morgon")

    # A new alias: every stored listing is read again (any title may use it), and the one that used it
    # now names the brand (its risk under the brand's raised thresholds is still below review).
    assert client.patch("/v1/brands/god-morgon", json={"aliases": ["Morgonsol"]}).status_code == 200
    named = served.latest("named")
    assert named["risk"] > unnamed["risk"] + 0.1, (unnamed, named)
    assert any("Morgonsol" in reason for reason in named["result"]["reasons"]), named["result"]["reasons"]
    status = client.get("/v1/jobs/stored-rescan").json()
    assert status["runs"] == runs + 3 and status["last"]["brand"] is None and status["last"]["scanned"] == 3

    # The thresholds back to the service's (null): both listings are flagged and queued.
    r = client.patch("/v1/brands/god-morgon", json={"review_threshold": None, "likely_threshold": None})
    assert r.status_code == 200 and r.json()["review_threshold"] is None, r.text
    assert served.latest("named")["verdict"] == "review"
    assert served.latest("copy")["verdict"] == "likely_counterfeit"
    assert {"named", "copy"} <= served.open_review("god-morgon")

    # A brand that joins later: the stored listing that already named it is read again.
    assert client.post("/v1/brands", json={"slug": "zebrax", "name": "Zebrax"}).status_code == 201
    after_brand = served.latest("zebrax")
    assert after_brand["risk"] > before_brand["risk"] + 0.1, (before_brand, after_brand)
    assert any("Zebrax" in reason for reason in after_brand["result"]["reasons"]), after_brand["result"]["reasons"]
    assert before_brand["verdict"] == "clear" and after_brand["verdict"] == "review", after_brand
    assert "zebrax" in served.open_review("zebrax")
    assert client.get("/v1/jobs/stored-rescan").json()["last"]["brand"] is None
