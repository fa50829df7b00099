"""Smoke test of an installed serverlayer: every layer kind serves.

Run by ``.ci/release_check`` with the Python of a fresh virtualenv into
which only the built wheel (with its ``asgi`` and ``websocket`` extras) was
installed, from a directory outside the checkout, so that it proves what a
user's ``pip install serverlayer`` gets, not what the checkout has.
"""

from __future__ import annotations

import http.client
import json
import os
import smtplib
import ssl
import sys
import tempfile
import urllib.request
from pathlib import Path

import serverlayer
from serverlayer import asgi, content, custom, smtp, static, wsgi


def get(url: str, context: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.read()


def check(name: str, layer: object, probe: object) -> None:
    layer.setUp()  # type: ignore[attr-defined]
    try:
        probe(layer)  # type: ignore[operator]
    finally:
        layer.tearDown()  # type: ignore[attr-defined]
    print(f"ok: {name}")


def wsgi_app(environ: dict, start_response: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])  # type: ignore[operator]
    return [f"wsgi {environ['wsgi.url_scheme']}".encode()]


class Hello(custom.RequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"custom")


async def asgi_app(scope: dict, receive: object, send: object) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"asgi"})  # type: ignore[operator]


def main() -> int:
    package = Path(serverlayer.__file__).resolve().parent
    checkout = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
    if checkout is not None and checkout in package.parents:
        print(f"serverlayer was imported from the checkout ({package}), not from the wheel", file=sys.stderr)
        return 1
    if not (package / "py.typed").exists():
        print("the wheel has no py.typed", file=sys.stderr)
        return 1

    check("wsgi", wsgi.Layer(wsgi_app, name="SMOKE_WSGI"),
          lambda layer: assert_equal(get(layer["http_url"]), b"wsgi http"))
    check("wsgi over TLS", wsgi.Layer(wsgi_app, name="SMOKE_HTTPS", tls=True),
          lambda layer: assert_equal(get(layer["http_url"], layer["ssl_context"]), b"wsgi https"))
    check("custom", custom.Layer(Hello, name="SMOKE_CUSTOM"),
          lambda layer: assert_equal(get(layer["http_url"]), b"custom"))

    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "page.txt").write_text("static")
        check("static", static.Layer(name="SMOKE_STATIC", documentroot=directory),
              lambda layer: assert_equal(get(layer["http_url"] + "page.txt"), b"static"))

    def content_probe(layer: object) -> None:
        stand_in = layer["http_content"]  # type: ignore[index]
        stand_in.route("/ping").respond_json({"pong": True})
        assert_equal(json.loads(get(stand_in.url_for("/ping"))), {"pong": True})

    check("content", content.Layer(name="SMOKE_CONTENT"), content_probe)
    check("asgi", asgi.Layer(asgi_app, name="SMOKE_ASGI"),
          lambda layer: assert_equal(get(layer["http_url"]), b"asgi"))

    def smtp_probe(layer: object) -> None:
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=10) as client:  # type: ignore[index]
            client.sendmail("a@example.org", ["b@example.org"], b"Subject: smoke\r\n\r\nhi\r\n")
        assert_equal(layer["outbox"][0]["Subject"], "smoke")  # type: ignore[index]

    check("smtp", smtp.Layer(name="SMOKE_SMTP"), smtp_probe)

    with content.Layer(name="SMOKE_WITH") as server:  # the context manager, too
        server["http_content"].serve_content("served")
        connection = http.client.HTTPConnection(server["http_host"], server["http_port"], timeout=10)
        connection.request("GET", "/")
        assert_equal(connection.getresponse().read(), b"served")
        connection.close()
    print("ok: a layer as a context manager")
    print(f"serverlayer {os.path.dirname(serverlayer.__file__)}: every layer kind served")
    return 0


def assert_equal(got: object, expected: object) -> None:
    if got != expected:
        raise AssertionError(f"expected {expected!r}, got {got!r}")


if __name__ == "__main__":
    sys.exit(main())
