"""Catalog management end to end: HTTP uploads, deletes, bulk zips, the CLI import, restarts."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.container import build_container
from service.domain.model import ListingImage, ReferenceKind
from tests.conftest import REPO_ROOT, SEMANTIC_MODEL, jpeg_bytes
from tests.e2e.conftest import load, start_server

pytestmark = pytest.mark.slow


def _search_copy(container: Any, pixels: np.ndarray) -> list[int]:
    """Ids the copy index returns for a photo (top 5)."""
    emb = container.embedders[container.roles.copy]
    vec = emb.embed([ListingImage("q" * 64, pixels)], persist=False).vectors
    index = container.indexes.open(container.roles.copy, ReferenceKind.PRODUCT, model_id=emb.model_id,
                                   dim=emb.embedder.dim)
    _, ids = index.search(vec, 5)
    return [int(i) for i in ids[0] if i >= 0]


@pytest.fixture
def server(make_settings: Any, shared_models: Any) -> Any:
    settings = make_settings()
    srv, thread, container = start_server(settings, shared_models[1])
    client = httpx.Client(base_url=f"http://127.0.0.1:{srv.config.port}", timeout=60)
    yield client, container, settings
    client.close()
    srv.should_exit = True
    thread.join(timeout=30)


def test_upload_duplicate_delete_and_restart(server: Any, grocery_dir: Path, shared_models: Any) -> None:
    client, container, settings = server
    assert client.post("/v1/brands", json={"slug": "arla", "name": "Arla"}).status_code == 201
    photo = (grocery_dir / "catalogue" / "Arla-Sour-Milk.jpg").read_bytes()
    form = {"kind": "product", "sku": "SOUR-1", "price": "12.5", "currency": "eur", "title": "Sour milk"}
    first = client.post("/v1/brands/arla/references", files=[("files", ("a.jpg", photo, "image/jpeg"))], data=form)
    assert first.status_code == 201, first.text
    ref = first.json()[0]
    assert ref["created"] is True and len(ref["phash"]) == 16
    again = client.post("/v1/brands/arla/references", files=[("files", ("b.jpg", photo, "image/jpeg"))], data=form)
    assert again.json()[0] == {**ref, "created": False}
    assert len(client.get("/v1/brands/arla/references").json()) == 1
    product = client.get("/v1/brands/arla/products/SOUR-1").json()
    assert product["reference_price"] == {"amount": 12.5, "currency": "EUR"}

    pixels = load(grocery_dir / "catalogue" / "Arla-Sour-Milk.jpg")
    assert _search_copy(container, pixels)[0] == ref["id"]
    assert container.index_sizes()["sscd_distilled/product"] == 1

    # A restart (a new container on the same data dir) keeps the catalog and its index, without re-embedding.
    restarted = build_container(settings, embedders=shared_models[1])
    try:
        assert _search_copy(restarted, pixels)[0] == ref["id"]
        assert restarted.index_sizes()[f"{SEMANTIC_MODEL}/product"] == 1
    finally:
        restarted.close()

    assert client.delete(f"/v1/brands/arla/references/{ref['id']}").status_code == 204
    assert ref["id"] not in _search_copy(container, pixels)
    assert client.get(f"/v1/brands/arla/references/{ref['id']}").status_code == 404
    assert client.delete(f"/v1/brands/arla/references/{ref['id']}").status_code == 404


def test_brand_scoping_and_bad_input(server: Any, grocery_dir: Path) -> None:
    client, _, _ = server
    client.post("/v1/brands", json={"slug": "alpro", "name": "Alpro"})
    client.post("/v1/brands", json={"slug": "arla", "name": "Arla"})
    photo = (grocery_dir / "catalogue" / "Alpro-Vanilla-Soyghurt.jpg").read_bytes()
    r = client.post("/v1/brands/alpro/references", files=[("files", ("a.jpg", photo, "image/jpeg"))],
                    data={"kind": "product", "sku": "V-1"})
    ref_id = r.json()[0]["id"]
    # Another brand cannot see or delete it.
    assert client.get(f"/v1/brands/arla/references/{ref_id}").status_code == 404
    assert client.delete(f"/v1/brands/arla/references/{ref_id}").status_code == 404
    assert client.get(f"/v1/brands/alpro/references/{ref_id}").status_code == 200
    # Bad input names its field and stores nothing.
    bad = client.post("/v1/brands/alpro/references", files=[("files", ("x.svg", b"<svg/>", "image/svg+xml"))],
                      data={"kind": "product", "sku": "V-2"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "files[0]"
    assert client.post("/v1/brands/alpro/references", files=[("files", ("a.jpg", photo, "image/jpeg"))],
                       data={"kind": "product"}).json()["error"]["field"] == "sku"
    assert client.post("/v1/brands", json={"slug": "Not A Slug!", "name": "x"}).json()["error"]["field"] == "slug"
    assert client.post("/v1/brands", json={"slug": "alpro", "name": "dup"}).status_code == 409
    assert len(client.get("/v1/brands/alpro/references").json()) == 1
    assert client.get("/v1/brands/nope/references").status_code == 404


def test_a_brand_changes_its_thresholds_and_names(server: Any) -> None:
    client, _, _ = server
    client.post("/v1/brands", json={"slug": "alpro", "name": "Alpro", "aliases": ["Alpro Soya"],
                                    "review_threshold": 0.4, "likely_threshold": 0.7})
    r = client.patch("/v1/brands/alpro", json={"likely_threshold": 0.6})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("name", "aliases", "review_threshold", "likely_threshold")} == \
        {"name": "Alpro", "aliases": ["Alpro Soya"], "review_threshold": 0.4, "likely_threshold": 0.6}
    r = client.patch("/v1/brands/alpro", json={"name": "Alpro EU", "aliases": [], "review_threshold": None})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["aliases"], r.json()["review_threshold"]) == ("Alpro EU", [], None)
    assert client.get("/v1/brands/alpro").json() == r.json()
    # Bad input names its field and changes nothing.
    for body, field in (({"review_threshold": 0.9}, "review_threshold"),  # above the kept likely one
                        ({"likely_threshold": 2}, "likely_threshold"),
                        ({"name": None}, "name"), ({"name": ""}, "name"), ({"aliases": None}, "aliases"),
                        ({"aliases": "Alpro"}, "aliases"), ({"slug": "other"}, "slug")):
        bad = client.patch("/v1/brands/alpro", json=body)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == field, (body, bad.text)
    assert client.get("/v1/brands/alpro").json() == r.json()
    missing = client.patch("/v1/brands/nope", json={"likely_threshold": 0.6})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "brand"


def test_bulk_zip_and_sellers(server: Any, grocery_dir: Path) -> None:
    client, container, _ = server
    client.post("/v1/brands", json={"slug": "tropicana", "name": "Tropicana"})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("catalog.csv", "brand,sku,kind,image,ref_id,title,price,currency\n"
                    ",TROP-APPLE,product,img/apple.jpg,a1,Apple juice,3.5,USD\n"
                    ",TROP-MAND,product,img/mand.jpg,m1,Mandarin,4,USD\n"
                    ",TROP-X,product,img/missing.jpg,,,,\n"
                    "other-brand,TROP-Y,product,img/apple.jpg,,,,\n")
        zf.write(grocery_dir / "catalogue" / "Tropicana-Apple-Juice.jpg", "img/apple.jpg")
        zf.write(grocery_dir / "catalogue" / "Tropicana-Mandarin-Morning.jpg", "img/mand.jpg")
    r = client.post("/v1/brands/tropicana/references/bulk", files=[("file", ("c.zip", buf.getvalue()))])
    assert r.status_code == 422 and "other-brand" in r.json()["error"]["message"]  # never another brand's rows
    good = buf.getvalue()
    buf2 = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(buf2, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "catalog.csv":
                data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(b"other-brand"))
            dst.writestr(info, data)
    r = client.post("/v1/brands/tropicana/references/bulk", files=[("file", ("c.zip", buf2.getvalue()))])
    body = r.json()
    assert (body["rows"], body["added"], body["duplicates"]) == (3, 2, 0), body
    assert body["errors"][0]["line"] == 4 and "missing.jpg" in body["errors"][0]["reason"]
    assert container.index_sizes()[f"{SEMANTIC_MODEL}/product"] == 2
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.csv", "brand,sku,kind,image\n")
    assert client.post("/v1/brands/tropicana/references/bulk",
                       files=[("file", ("e.zip", evil.getvalue()))]).status_code == 422
    assert client.post("/v1/brands/tropicana/sellers", json={"seller_id": "trop-store"}).status_code == 201
    assert [s["seller_id"] for s in client.get("/v1/brands/tropicana/sellers").json()] == ["trop-store"]
    assert client.delete("/v1/brands/tropicana/sellers/trop-store").status_code == 204
    assert client.delete("/v1/brands/tropicana/sellers/trop-store").status_code == 404


def _cli(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COUNTERLENS_DATA_DIR=str(data_dir))
    return subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "counterlens"), *args], env=env, text=True,
                          capture_output=True, timeout=600)


def test_cli_catalog_import_reports_bad_rows_and_is_idempotent(make_settings: Any, grocery_dir: Path,
                                                               tmp_path: Path) -> None:
    settings = make_settings()
    folder = tmp_path / "cat"
    folder.mkdir()
    for name in ("Arla-Standard-Milk", "Yoggi-Vanilla-Yoghurt"):
        (folder / f"{name}.jpg").write_bytes((grocery_dir / "catalogue" / f"{name}.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [["brand", "sku", "kind", "image", "ref_id", "title", "price", "currency"],
            ["arla", "MILK", "product", "Arla-Standard-Milk.jpg", "m1", "Milk", "2.0", "EUR"],
            ["yoggi", "VAN", "product", "Yoggi-Vanilla-Yoghurt.jpg", "", "", "", ""],
            ["yoggi", "X", "product", "broken.jpg", "", "", "", ""],
            ["yoggi", "Y", "gadget", "broken.jpg", "", "", "", ""],
            ["arla", "Z", "product", "../../etc/passwd", "", "", "", ""],
            ["arla", "P", "product", "Arla-Standard-Milk.jpg", "", "", "cheap", ""]]
    with (folder / "catalog.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    first = _cli(["catalog", "import", str(folder / "catalog.csv")], settings.data_dir)
    assert first.returncode == 0, first.stderr
    assert "6 rows: 2 added, 0 already present, 4 errors, 2 new brands" in first.stdout
    for line in ("line 4", "line 5", "line 6", "line 7"):
        assert line in first.stderr
    assert "outside the manifest" in first.stderr and "kind must be" in first.stderr
    again = _cli(["catalog", "import", str(folder / "catalog.csv")], settings.data_dir)
    assert "2 already present" in again.stdout and "0 added" in again.stdout
    stats = _cli(["catalog", "stats"], settings.data_dir)
    assert "arla" in stats.stdout and "yoggi" in stats.stdout
    out = tmp_path / "export"
    exported = _cli(["catalog", "export", "--brand", "arla", "--to", str(out)], settings.data_dir)
    assert exported.returncode == 0, exported.stderr
    assert "MILK" in (out / "catalog.csv").read_text()
    missing = _cli(["catalog", "import", str(folder / "nope.csv")], settings.data_dir)
    assert missing.returncode == 2 and "no such manifest" in missing.stderr


def test_cli_reindex_after_model_change_reuses_stored_embeddings(make_settings: Any, grocery_dir: Path,
                                                                tmp_path: Path) -> None:
    settings = make_settings()
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(load(grocery_dir / "catalogue" / "Arla-Sour-Milk.jpg")))
    (folder / "catalog.csv").write_text("brand,sku,kind,image\narla,S,product,a.jpg\n")
    assert _cli(["catalog", "import", str(folder / "catalog.csv")], settings.data_dir).returncode == 0
    # Switch the semantic model to the copy model: its index must be (re)built; nothing else changes.
    env_dir = settings.data_dir
    r = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "counterlens"), "reindex"], text=True, capture_output=True,
                       env=dict(os.environ, COUNTERLENS_DATA_DIR=str(env_dir),
                                COUNTERLENS_MODELS__SEMANTIC_MODEL=""), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "sscd_distilled/product" in r.stdout and "loaded" in r.stdout
