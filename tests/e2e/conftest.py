"""A real counterlens server on 127.0.0.1 (uvicorn in a thread) with a small real catalog: grocery-dev
catalogue photos as brands' product references and simple-icons logos."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from service.api.app import create_app
from service.container import build_container
from service.demo import logo_on_white
from service.settings import Settings
from tests.conftest import jpeg_bytes, png_bytes

PRODUCTS = {  # brand -> [(catalogue class, sku, reference price USD)]
    "arla": [("Arla-Standard-Milk", "ARLA-MILK-1L", 20.0), ("Arla-Natural-Yoghurt", "ARLA-YOG-1L", 24.0)],
    "tropicana": [("Tropicana-Apple-Juice", "TROP-APPLE-1L", 30.0)],
    "alpro": [("Alpro-Shelf-Soy-Milk", "ALPRO-SOY-1L", 22.0)],
}
LOGOS = {"starbucks": "starbucks", "redbull": "redbull"}
AUTHORIZED = {"arla": "arla-official-store"}


@dataclass
class LiveServer:
    url: str
    settings: Settings
    container: Any
    client: httpx.Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(settings: Settings, embedders: dict[str, Any]) -> tuple[uvicorn.Server, threading.Thread, Any]:
    holder: dict[str, Any] = {}

    def factory(s: Settings) -> Any:
        holder["c"] = build_container(s, embedders=embedders)
        return holder["c"]

    app = create_app(settings, container_factory=factory)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return server, thread, holder["c"]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, shared_models: tuple[Path, dict[str, Any]],
         grocery_dir: Path) -> Iterator[LiveServer]:
    import shutil

    data = tmp_path_factory.mktemp("live")
    shutil.copytree(shared_models[0], data / "models")
    settings = Settings(data_dir=data, scoring={"logo_search": "always"},
                        intake={"allow_private_hosts": []})
    server, thread, container = start_server(settings, shared_models[1])
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=60)
    for brand, items in PRODUCTS.items():
        assert client.post("/v1/brands", json={"slug": brand, "name": brand.title()}).status_code == 201
        for cls, sku, price in items:
            data_bytes = (grocery_dir / "catalogue" / f"{cls}.jpg").read_bytes()
            r = client.post(f"/v1/brands/{brand}/references",
                            files=[("files", (f"{cls}.jpg", data_bytes, "image/jpeg"))],
                            data={"kind": "product", "sku": sku, "title": cls, "price": str(price),
                                  "currency": "USD", "ref_id": f"{sku}-photo"})
            assert r.status_code == 201, r.text
    for brand, slug in LOGOS.items():
        client.post("/v1/brands", json={"slug": brand, "name": brand.title()})
        r = client.post(f"/v1/brands/{brand}/references",
                        files=[("files", ("logo.png", png_bytes(np.asarray(logo_on_white(slug))), "image/png"))],
                        data={"kind": "logo", "ref_id": f"{slug}-logo"})
        assert r.status_code == 201, r.text
    for brand, seller in AUTHORIZED.items():
        assert client.post(f"/v1/brands/{brand}/sellers", json={"seller_id": seller}).status_code == 201
    yield LiveServer(url=f"http://127.0.0.1:{server.config.port}", settings=settings, container=container,
                     client=client)
    client.close()
    server.should_exit = True
    thread.join(timeout=30)


def load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def edited_copy(pixels: np.ndarray) -> bytes:
    """A counterfeiter's re-use of an official photo: cropped to 80%, colour-shifted, recompressed."""
    h, w = pixels.shape[:2]
    crop = pixels[int(h * 0.1):int(h * 0.9), int(w * 0.08):int(w * 0.88)].astype(np.float32)
    crop = np.clip(crop * np.array([1.08, 1.0, 0.93]) + 6, 0, 255).astype(np.uint8)
    return jpeg_bytes(crop, quality=55)
