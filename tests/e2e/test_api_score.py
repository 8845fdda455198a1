"""POST /v1/score end to end: real HTTP, real models, real FAISS and SQLite, real photos."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.demo import render_logo
from tests.conftest import jpeg_bytes
from tests.e2e.conftest import LiveServer, edited_copy, load

pytestmark = pytest.mark.slow


def _score(live: LiveServer, listing: dict[str, Any], photos: list[bytes]) -> dict[str, Any]:
    body = dict(listing, images=[{"base64": base64.b64encode(p).decode()} for p in photos])
    r = live.client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _signals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in result["signals"]}


def test_edited_copy_at_30_percent_is_likely_counterfeit(live: LiveServer, grocery_dir: Path) -> None:
    copy = edited_copy(load(grocery_dir / "catalogue" / "Arla-Standard-Milk.jpg"))
    res = _score(live, {"listing_id": "cheap-copy", "title": "Organic milk 1L",
                        "price": {"amount": 6.0, "currency": "USD"}, "seller": {"id": "deals-4-u"}}, [copy])
    assert res["verdict"] == "likely_counterfeit", res
    assert res["brand"] == "arla"
    sig = _signals(res)
    assert sig["copy"]["score"] > 0.5 and sig["price"]["score"] > 0.5
    text = " ".join(res["reasons"])
    assert "copy of arla" in text and "30% of the reference price" in text
    best = res["matches"][0]
    assert (best["brand"], best["sku"], best["image_index"]) == ("arla", "ARLA-MILK-1L", 0)


def test_same_copy_at_full_price_from_authorized_seller_is_clear(live: LiveServer, grocery_dir: Path) -> None:
    copy = edited_copy(load(grocery_dir / "catalogue" / "Arla-Standard-Milk.jpg"))
    res = _score(live, {"listing_id": "official", "title": "Arla standard milk 1L",
                        "price": {"amount": 20.0, "currency": "USD"},
                        "seller": {"id": "arla-official-store"}}, [copy])
    assert res["verdict"] == "clear", res
    assert any(m["signal"] == "copy" and m["brand"] == "arla" for m in res["matches"])
    cheap = live.client.get("/v1/listings/cheap-copy").json()["history"][0]["risk"]
    assert res["risk"] < cheap - 0.3


def test_price_in_other_currency_is_converted(live: LiveServer, grocery_dir: Path) -> None:
    copy = edited_copy(load(grocery_dir / "catalogue" / "Tropicana-Apple-Juice.jpg"))
    # 30 USD reference; 276 SEK ~ 26 USD at the default 10.5 SEK/USD: a normal price.
    normal = _score(live, {"listing_id": "sek-normal", "title": "Apple juice",
                           "price": {"amount": 276, "currency": "SEK"}}, [copy])
    cheap = _score(live, {"listing_id": "sek-cheap", "title": "Apple juice",
                          "price": {"amount": 60, "currency": "SEK"}}, [copy])
    assert _signals(normal)["price"]["score"] < 0.2 < _signals(cheap)["price"]["score"]


def test_unrelated_photo_is_clear(live: LiveServer) -> None:
    import skimage.data

    cat = np.asarray(Image.open(Path(skimage.data.__file__).parent / "chelsea.png").convert("RGB"))
    res = _score(live, {"listing_id": "cat", "title": "Cat poster", "price": {"amount": 3.0}}, [jpeg_bytes(cat)])
    assert res["verdict"] == "clear" and res["risk"] < 0.2, res
    assert not [m for m in res["matches"] if m["signal"] in ("copy", "lookalike")]


def test_logo_small_on_another_product_is_flagged_with_logo_evidence(live: LiveServer, grocery_dir: Path) -> None:
    photo = Image.open(grocery_dir / "catalogue" / "Cabbage.jpg").convert("RGB")
    w = int(photo.width * 0.28)
    logo = render_logo("starbucks", w)
    photo.paste(logo, (int(photo.width * 0.55), int(photo.height * 0.1)), logo)
    res = _score(live, {"listing_id": "logo-on-cabbage", "title": "Travel mug",
                        "price": {"amount": 9.0}, "seller": {"id": "new-shop", "account_age_days": 4,
                                                             "stock": 800}},
                 [jpeg_bytes(np.asarray(photo), 90)])
    logos = [m for m in res["matches"] if m["signal"] == "logo"]
    assert logos and logos[0]["brand"] == "starbucks", res
    x0, y0, x1, y1 = logos[0]["box"]
    # The box found overlaps the pasted logo.
    lx0, ly0 = int(photo.width * 0.55), int(photo.height * 0.1)
    assert x0 < lx0 + w and lx0 < x1 and y0 < ly0 + w and ly0 < y1
    assert res["verdict"] != "clear", res
    assert res["ran"]["logo_crops"] is True


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    _CountingHandler.hits = 0
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "0x7f000001", "[::ffff:127.0.0.1]"])
def test_private_address_urls_are_refused_without_a_request(live: LiveServer, counting_server: int,
                                                            host: str) -> None:
    r = live.client.post("/v1/score", json={"listing_id": "ssrf", "title": "x",
                                            "images": [{"url": f"http://{host}:{counting_server}/a.jpg"}]})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "url_forbidden"
    assert r.json()["error"]["field"] == "images[0].url"
    assert _CountingHandler.hits == 0


def test_metadata_address_is_refused(live: LiveServer) -> None:
    r = live.client.post("/v1/score", json={"listing_id": "ssrf2", "images": [
        {"url": "http://169.254.169.254/latest/meta-data/"}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "url_forbidden"


@pytest.mark.parametrize(("body", "field"), [
    ({"title": "no id"}, "listing_id"),
    ({"listing_id": "p", "price": {"amount": -3}}, "price.amount"),
    ({"listing_id": "p", "images": [{"base64": "!!!notbase64"}]}, "images[0].base64"),
    ({"listing_id": "p", "images": [{"base64": base64.b64encode(b"<svg></svg>").decode()}]}, "images[0].base64"),
    ({"listing_id": "p", "price": {"amount": 3, "currency": "XYZ"}}, "price.currency"),
])
def test_bad_input_names_the_field(live: LiveServer, body: dict[str, Any], field: str) -> None:
    r = live.client.post("/v1/score", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["field"] == field, r.json()


def test_multipart_upload_and_batch(live: LiveServer, grocery_dir: Path) -> None:
    import json

    copy = edited_copy(load(grocery_dir / "catalogue" / "Alpro-Shelf-Soy-Milk.jpg"))
    r = live.client.post("/v1/score", data={"listing": json.dumps({"listing_id": "mp", "title": "soy milk",
                                                                    "price": {"amount": 5}})},
                         files=[("images", ("a.jpg", copy, "image/jpeg"))])
    assert r.status_code == 200, r.text
    assert r.json()["brand"] == "alpro"
    batch = live.client.post("/v1/score/batch", json={"listings": [
        {"listing_id": "b1", "images": [{"base64": base64.b64encode(copy).decode()}]},
        {"listing_id": "b2", "images": [{"url": "http://10.0.0.1/x.jpg"}]},
    ]})
    assert batch.status_code == 200
    items = {i["listing_id"]: i for i in batch.json()["results"]}
    assert items["b1"]["result"]["brand"] == "alpro"
    assert items["b2"]["error"]["code"] == "url_forbidden"
    assert items["b2"]["error"]["field"] == "listings[1].images[0].url"


def test_a_batch_item_that_fails_on_our_side_is_its_own_error(live: LiveServer, grocery_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while scoring one listing of a batch answers that item with internal_error; the batch's other
    listings are scored and answered (not a 500 for all of them)."""
    from service.api.routers import score as score_router

    real = score_router._score_one

    async def failing_for_b2(request: Any, body: Any, sources: Any) -> Any:
        if body.listing_id == "bug-2":
            raise RuntimeError("a bug")
        return await real(request, body, sources)

    monkeypatch.setattr(score_router, "_score_one", failing_for_b2)
    copy = edited_copy(load(grocery_dir / "catalogue" / "Alpro-Shelf-Soy-Milk.jpg"))
    batch = live.client.post("/v1/score/batch", json={"listings": [
        {"listing_id": "bug-1", "images": [{"base64": base64.b64encode(copy).decode()}]},
        {"listing_id": "bug-2", "images": [{"base64": base64.b64encode(copy).decode()}]},
    ]})
    assert batch.status_code == 200, batch.text
    items = {i["listing_id"]: i for i in batch.json()["results"]}
    assert items["bug-1"]["result"]["brand"] == "alpro"
    assert items["bug-2"]["error"] == {"code": "internal_error", "message": "internal server error",
                                       "field": "listings[1]"}


def test_scores_are_stored_with_history_and_review_queue(live: LiveServer, grocery_dir: Path) -> None:
    copy = edited_copy(load(grocery_dir / "catalogue" / "Arla-Natural-Yoghurt.jpg"))
    for price in (24.0, 5.0):
        _score(live, {"listing_id": "hist", "title": "yoghurt", "price": {"amount": price},
                      "seller": {"id": "s-hist"}}, [copy])
    got = live.client.get("/v1/listings/hist").json()
    assert [h["verdict"] for h in got["history"]][:2] == ["likely_counterfeit", "clear"]
    queue = live.container.listings.review_queue("arla")
    assert any(item.listing_id == "hist" for item in queue)
    assert not any(item.listing_id == "hist" for item in live.container.listings.review_queue("alpro"))


def test_health_and_metrics(live: LiveServer, grocery_dir: Path) -> None:
    # A photo no other test sends, so this test's counters hold when it runs alone (``-k``) or first.
    photo = jpeg_bytes(load(grocery_dir / "catalogue" / "Tropicana-Apple-Juice.jpg")[::-1], quality=80)
    _score(live, {"listing_id": "metrics-own", "title": "juice", "price": {"amount": 3.0},
                  "seller": {"id": "s-metrics"}}, [photo])
    ready = live.client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert {m["provider"] for m in ready["models"].values()} == {"cpu"}
    assert live.client.get("/v1/listings/no-such-listing").status_code == 404
    metrics = live.client.get("/metrics").text
    assert "counterlens_http_requests_total" in metrics and 'route="/v1/score"' in metrics
    # Requests are counted by route template and status, not per id.
    assert 'method="GET",route="/v1/listings/{listing_id}",status="404"' in metrics
    assert "no-such-listing" not in metrics
    # The expensive signals are counted as they run (this server searches crops on every photo).
    crops = [line for line in metrics.splitlines()
             if line.startswith('counterlens_signals_run_total{signal="logo_crops"}')]
    assert crops and float(crops[0].rsplit(" ", 1)[1]) >= 1
    # Each image model's time in model calls, wall and CPU (a thread's CPU never exceeds its wall time).
    def model_counter(metric: str) -> dict[str, float]:
        prefix = f"counterlens_model_{metric}_total{{model="
        return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith(prefix)}
    busy, cpu = model_counter("busy_seconds"), model_counter("cpu_seconds")
    assert set(busy) == set(cpu) == set(ready["models"])
    assert all(0 < cpu[m] <= busy[m] + 0.01 for m in busy)
    # The new photos of the requests so far reached the models as they were queued; none was stored
    # by another process, so none was withdrawn.
    prefetched, withdrawn = model_counter("prefetched_photos"), model_counter("withdrawn_photos")
    assert set(prefetched) == set(withdrawn) == set(ready["models"])
    assert all(prefetched[m] >= 1 and withdrawn[m] == 0 for m in prefetched)
    # The scoring queue: batches and the listings in them, nothing waiting or refused between requests.
    queue = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
             if line.startswith("counterlens_score_")}
    assert 1 <= queue["counterlens_score_batches_total"] <= queue["counterlens_score_batched_listings_total"]
    assert queue["counterlens_score_queue_waiting"] == 0 and queue["counterlens_score_refused_total"] == 0
    assert queue["counterlens_score_slow_backlog"] == 0
    assert live.client.get("/openapi.json").json()["paths"]["/v1/score"]


def test_a_photo_whose_body_does_not_decode_is_refused_by_field(live: LiveServer, grocery_dir: Path) -> None:
    """The header is checked up front, the body decoded only for photos the models have not seen: a
    truncated JPEG passes the first check and is refused when decoded, naming its field, and a batch
    request keeps the refusal to the listing it belongs to."""
    good = edited_copy(load(grocery_dir / "catalogue" / "Arla-Sour-Milk.jpg"))
    broken = good[: len(good) // 3]
    r = live.client.post("/v1/score", json={"listing_id": "trunc", "title": "milk", "images": [
        {"base64": base64.b64encode(good).decode()}, {"base64": base64.b64encode(broken).decode()}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "decode_failed" and r.json()["error"]["field"] == "images[1].base64"
    assert live.client.get("/v1/listings/trunc").status_code == 404  # nothing stored
    batch = live.client.post("/v1/score/batch", json={"listings": [
        {"listing_id": "trunc-b1", "images": [{"base64": base64.b64encode(broken).decode()}]},
        {"listing_id": "trunc-b2", "images": [{"base64": base64.b64encode(good).decode()}]}]})
    assert batch.status_code == 200, batch.text
    first, second = batch.json()["results"]
    assert first["error"]["field"] == "listings[0].images[0].base64" and first["result"] is None
    assert second["error"] is None and second["result"]["brand"] == "arla"


@contextmanager
def _small_queue(live: LiveServer) -> Iterator[None]:
    """The app's scoring queue replaced, meanwhile, by one that holds one waiting listing (one thread)."""
    from service.usecases.score_queue import ScoringQueue

    c = live.container
    c.score_queue()  # the app's own, started
    small = ScoringQueue(c.scorer, workers=1, max_waiting=1)
    with c._score_queue_lock:
        saved, c._score_queue = c._score_queue, small
    try:
        yield
    finally:
        with c._score_queue_lock:
            c._score_queue = saved
        small.close()


def _random_photo_bodies(prefix: str, n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"listing_id": f"{prefix}-{i}", "title": "Poster", "price": {"amount": 5.0},
             "images": [{"base64": base64.b64encode(
                 jpeg_bytes(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))).decode()}]}
            for i in range(n)]


def test_an_overloaded_service_refuses_with_503_and_retry_after(live: LiveServer) -> None:
    """A scoring queue that holds one waiting listing (one scoring thread), hit by 16 requests at once:
    those that find it full are answered 503 ``overloaded`` with a Retry-After and nothing of them is
    stored; every other one is scored and stored."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    bodies = _random_photo_bodies("burst", 16, 7)
    start = threading.Barrier(16)

    def post(body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            start.wait(10)
            return client.post("/v1/score", json=body)

    with _small_queue(live), ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, bodies))
        metrics = live.client.get("/metrics").text  # read while the small queue is the app's
    refused = [b["listing_id"] for b, r in zip(bodies, answers, strict=True) if r.status_code == 503]
    scored = [b["listing_id"] for b, r in zip(bodies, answers, strict=True) if r.status_code == 200]
    assert refused and scored and len(refused) + len(scored) == 16, [r.status_code for r in answers]
    assert f"counterlens_score_refused_total {float(len(refused))}" in metrics
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
    assert all(live.client.get(f"/v1/listings/{lid}").status_code == 404 for lid in refused)
    assert all(live.client.get(f"/v1/listings/{lid}").status_code == 200 for lid in scored)


def test_a_batch_into_an_overloaded_service_says_which_items_to_send_again_and_when(live: LiveServer) -> None:
    """A batch's listings are queued together: into a queue that holds one waiting listing, the ones
    that find it full come back as items with error ``overloaded`` and ``retry_after_s`` (what a single
    request's 503 says in its Retry-After); the batch itself is a 200 and its other items are scored."""
    bodies = _random_photo_bodies("batch-burst", 12, 8)
    with _small_queue(live):
        r = live.client.post("/v1/score/batch", json={"listings": bodies})
    assert r.status_code == 200, r.text
    items = {item["listing_id"]: item for item in r.json()["results"]}
    assert set(items) == {b["listing_id"] for b in bodies}
    refused = [lid for lid, item in items.items() if item["error"] is not None]
    scored = [lid for lid, item in items.items() if item["result"] is not None]
    assert refused and scored and len(refused) + len(scored) == 12
    for lid in refused:
        assert items[lid]["error"]["code"] == "overloaded" and items[lid]["error"]["retry_after_s"] == 1
        assert live.client.get(f"/v1/listings/{lid}").status_code == 404
    assert all(live.client.get(f"/v1/listings/{lid}").status_code == 200 for lid in scored)


@pytest.mark.parametrize("raw", [b'{"listing_id": "broken"', b"\xff\xfe{}", b""])
def test_a_body_that_is_not_json_is_a_400_and_stores_nothing(live: LiveServer, raw: bytes) -> None:
    r = live.client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert live.client.get("/v1/listings/broken").status_code == 404


def test_a_multipart_listing_field_that_is_not_json_is_a_400_naming_it(live: LiveServer) -> None:
    r = live.client.post("/v1/score", data={"listing": "{nope"},
                         files=[("images", ("a.jpg", jpeg_bytes(np.zeros((8, 8, 3), np.uint8)), "image/jpeg"))])
    assert r.status_code == 400 and r.json()["error"] == {
        "code": "invalid_json", "message": "the 'listing' field is not valid JSON", "field": "listing"}


def test_json_that_only_pythons_parser_reads_is_validated_as_before(live: LiveServer) -> None:
    """A UTF-8 BOM and a lone surrogate escape (a string cut inside an emoji) are read as JSON and
    validated field by field: a 422 naming the field, not a 400 for the whole body."""
    bom = live.client.post("/v1/score", content=b'\xef\xbb\xbf{"title": "no id"}',
                           headers={"content-type": "application/json"})
    assert bom.status_code == 422 and bom.json()["error"]["field"] == "listing_id", bom.text
    cut = live.client.post("/v1/score", content=b'{"listing_id": "cut", "title": "Mug \\ud83d"}',
                           headers={"content-type": "application/json"})
    assert cut.status_code == 422 and cut.json()["error"]["field"] == "title", cut.text
    assert live.client.get("/v1/listings/cut").status_code == 404
