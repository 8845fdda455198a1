"""Fixtures of the intake tests: a real HTTP(S) image server on 127.0.0.1 that counts every request it
receives, real grocery photos, and a throw-away CA for the TLS test (made with the openssl CLI)."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

# One in-store photo (256x256 JPEG, about 20 KB) served as "the image".
PHOTO = Path("instore/Avocado/train_Avocado_001.jpg")


@dataclass
class Hit:
    path: str
    host: str | None


@dataclass
class ImageServer:
    """A threaded HTTP server with test routes; ``hits`` records every request that reached it."""

    photo: bytes
    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    scheme: str = "http"

    def url(self, path: str, host: str = "localhost") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [h.path for h in self.hits]

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()


def _handler(server: ImageServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str = "image/jpeg",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self._send(302, b"", "text/plain", {"Location": location})

        def do_GET(self) -> None:
            with server.lock:
                server.hits.append(Hit(self.path, self.headers.get("Host")))
            parts = urlsplit(self.path)
            route, query = parts.path, parse_qs(parts.query)
            # The client hanging up is part of several tests (size limit, timeout).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._route(route, query)

        def _route(self, route: str, query: dict[str, list[str]]) -> None:
            if route == "/photo.jpg":
                self._send(200, server.photo)
            elif route == "/declared-huge":
                # Declares 1 GB and sends nothing: the client must refuse on the header alone.
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.flush()
                server.stopping.wait(2.0)
                self.close_connection = True
            elif route == "/chunked":
                total = int(query["bytes"][0])
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                sent, chunk = 0, b"\xff" * 16384
                while sent < total and not server.stopping.is_set():
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                self.wfile.write(b"0\r\n\r\n")
            elif route == "/slow-headers":
                server.stopping.wait(float(query.get("s", ["3"])[0]))
                self._send(200, server.photo)
            elif route == "/drip":
                # Headers at once, then one byte every 50 ms: each read is quick, the whole is not.
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(server.photo)))
                self.end_headers()
                for i in range(len(server.photo)):
                    if server.stopping.wait(0.05):
                        break
                    self.wfile.write(server.photo[i : i + 1])
                    self.wfile.flush()
                self.close_connection = True
            elif route.startswith("/redirect/"):
                n = int(route.rsplit("/", 1)[1])
                self._redirect(f"/redirect/{n - 1}" if n > 1 else "/photo.jpg")
            elif route == "/to":
                self._redirect(query["u"][0])
            elif route == "/status":
                self._send(int(query["code"][0]), b"nope", "text/plain")
            elif route == "/page.html":
                self._send(200, b"<!doctype html><html><body>not an image</body></html>", "text/html")
            elif route == "/svg-as-jpeg":
                self._send(200, b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
            else:
                self._send(404, b"not found", "text/plain")

    return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-answer is what several tests do on purpose


def _start(server: ImageServer, tls: ssl.SSLContext | None = None) -> tuple[_QuietServer, threading.Thread]:
    httpd = _QuietServer(("127.0.0.1", 0), _handler(server))
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        server.scheme = "https"
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return httpd, thread


@pytest.fixture(scope="session")
def photo_bytes(grocery_dir: Path) -> bytes:
    return (grocery_dir / PHOTO).read_bytes()


@pytest.fixture(scope="module")
def image_server_module(photo_bytes: bytes) -> Iterator[ImageServer]:
    server = ImageServer(photo=photo_bytes)
    httpd, thread = _start(server)
    yield server
    server.stopping.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def image_server(image_server_module: ImageServer) -> ImageServer:
    """The module's server with its request log emptied for this test."""
    image_server_module.reset()
    return image_server_module


@dataclass
class CertificateAuthority:
    ca_file: Path
    cert_file: Path
    key_file: Path
    hostname: str


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA and a server certificate for ``images.test``, made with the openssl command line tool."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the TLS pinning test needs the openssl command line tool on PATH")
    d = tmp_path_factory.mktemp("ca")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=counterlens test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.test")
    (d / "leaf.ext").write_text("subjectAltName=DNS:images.test\nbasicConstraints=CA:FALSE\n"
                                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    return CertificateAuthority(d / "ca.pem", d / "leaf.pem", d / "leaf.key", "images.test")


@dataclass
class TlsServer:
    server: ImageServer
    sni_names: list[str | None]


@pytest.fixture(scope="module")
def tls_image_server(photo_bytes: bytes, test_ca: CertificateAuthority) -> Iterator[TlsServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(test_ca.cert_file, test_ca.key_file)
    sni_names: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni_names.append(name)

    ctx.sni_callback = record_sni
    server = ImageServer(photo=photo_bytes)
    httpd, thread = _start(server, tls=ctx)
    yield TlsServer(server, sni_names)
    server.stopping.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)

