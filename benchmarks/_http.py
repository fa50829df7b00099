"""HTTP helpers shared by ``bench_http``, ``bench_tls`` and ``bench_peers``.

The same application, handler and client on every side, so that the
contenders differ only in the servers being compared.
"""

from __future__ import annotations

import http.client
import http.server
import os
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import _timing

HOST = "127.0.0.1"
#: What every HTTP server answers.
BODY = b"Hello, benchmark!\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI layers' application: answers ``BODY`` to any path."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


class Handler(http.server.BaseHTTPRequestHandler):
    """The custom layers' handler: answers GET, logs nothing."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class CountingConnection(http.client.HTTPConnection):
    """Counts the TCP connections http.client opens."""

    connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


class CountingHTTPSConnection(http.client.HTTPSConnection, CountingConnection):
    """Counts the TCP connections (each with a handshake) http.client opens:
    ``HTTPSConnection.connect`` calls ``CountingConnection.connect`` before
    its handshake."""


def connection(port: int, context: ssl.SSLContext | None) -> CountingConnection:
    """A client for the server on ``port``; HTTPS verified by ``context`` if given."""
    if context is not None:
        return CountingHTTPSConnection(HOST, port, timeout=10, context=context)
    return CountingConnection(HOST, port, timeout=10)


def check(port: int, response: http.client.HTTPResponse, body: bytes, expected: bytes) -> None:
    if response.status != 200 or body != expected:
        raise RuntimeError(f"the server on port {port} answered {response.status} {body[:60]!r}")


def gets(port: int, context: ssl.SSLContext | None, path: str, expected: bytes, requests: int) -> int:
    """``requests`` sequential GETs over one keep-alive connection, each
    answer checked; returns how many TCP connections that took."""
    client = connection(port, context)
    try:
        for _ in range(requests):
            client.request("GET", path)
            response = client.getresponse()
            check(port, response, response.read(), expected)
    finally:
        client.close()
    return client.connects


def layer_gets(layer: Any, requests: int, path: str = "/") -> int:
    """``gets`` of ``BODY`` from a layer's server, over HTTPS if it publishes an ``ssl_context``."""
    return gets(layer["http_port"], layer.get("ssl_context"), path, BODY, requests)


def provide_file(documentroot: str, body: bytes, name: str = "index.txt") -> str:
    """Put ``body`` into a static server's ``documentroot``; returns the path to GET it from."""
    with open(os.path.join(documentroot, name), "wb") as file:
        file.write(body)
    return f"/{name}"


@dataclass
class Pair:
    """The same kind of layer twice: the one in the table's ``ours`` column
    and the one it is compared with, in the ``peer`` column."""

    kind: str
    ours: Any
    peer: Any

    def layers(self) -> dict[str, Any]:
        return {"ours": self.ours, "peer": self.peer}


def check_serves(pair: Pair, quiet: _timing.OutputTrap, also: Callable[[Any, str], None] | None = None) -> float:
    """Set up, GET once, tear down: a warm-up that proves both layers serve
    (the static ones a file put into their documentroot). ``also`` checks
    more while a layer is set up, given it and the path.

    Returns the milliseconds ``pair.ours``' ``setUp`` took.
    """
    ours_set_up_ms = 0.0
    for layer in (pair.ours, pair.peer):
        with quiet():
            set_up_ms = _timing.elapsed(layer.setUp) * 1000
            try:
                path = provide_file(layer["documentroot"], BODY) if pair.kind == "static" else "/"
                layer_gets(layer, 1, path)
                if also is not None:
                    also(layer, path)
            finally:
                layer.tearDown()
        if layer is pair.ours:
            ours_set_up_ms = set_up_ms
    return ours_set_up_ms


def get_rates(
    pair: Pair, requests: int, repeats: int, quiet: _timing.OutputTrap
) -> tuple[dict[str, float], dict[str, int]]:
    """Median requests/s of ``repeats`` runs of ``requests`` sequential GETs
    to each layer of ``pair``, over one connection each run; and the TCP
    connections each run took (a server that closes makes http.client
    reconnect, which is part of what is measured)."""
    connects: dict[str, int] = {}

    def run(name: str, layer: Any) -> float:
        with quiet():
            connects[name], seconds = _timing.timed(lambda: layer_gets(layer, requests))
        return requests / seconds

    rates = _timing.rate_medians(
        pair.layers(), run, repeats, quiet, warm_up=lambda layer: layer_gets(layer, min(100, requests))
    )
    return rates, connects
