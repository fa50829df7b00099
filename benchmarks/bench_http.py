"""serverlayer's HTTP layers against gocept.httpserverlayer 4.0, side by side.

Run from the checkout, after ``pip install -e '.[bench]'``::

    python benchmarks/bench_http.py            # full run, about a minute
    python benchmarks/bench_http.py --quick    # smoke run, a few seconds

It measures, for serverlayer and for gocept.httpserverlayer (the peer) in
one process, interleaved round by round:

1. ``setUp`` + ``tearDown`` of the wsgi, custom and static layers (median of
   ``--rounds``; the peer's servers poll for shutdown every 0.5 s, so each
   of its rounds takes about that long);
2. sequential GETs to the wsgi layer over one ``http.client.HTTPConnection``
   (median requests/s of ``--repeats`` runs of ``--requests`` each). The
   peer's wsgiref server speaks HTTP/1.0 and closes every connection, so
   http.client reconnects for each request; that is part of what is measured.

Both packages serve the same WSGI application and the same request handler
on 127.0.0.1. The table's ratio says how many times better serverlayer does
(faster set-up and tear-down, more requests per second). The script is a
report, not a test: it exits 0 whether targets are met or not.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import _timing

HOST = "127.0.0.1"
BODY = b"Hello, benchmark!\n"
SETUP_TEARDOWN_TARGET_MS = 5.0
THROUGHPUT_TARGET_RATIO = 1.5
PEER = "gocept 4.0"

try:
    import gocept.httpserverlayer.custom as peer_custom
    import gocept.httpserverlayer.static as peer_static
    import gocept.httpserverlayer.wsgi as peer_wsgi

    import serverlayer
    import serverlayer.custom
    import serverlayer.static
    import serverlayer.wsgi
except ImportError as exc:
    sys.exit(
        f"bench_http: {exc}\n"
        "Install serverlayer with its benchmark extras from the checkout:"
        " pip install -e '.[bench]'"
    )


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
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


@dataclass
class Pair:
    """The same kind of layer from both packages."""

    kind: str
    ours: Any
    peer: Any


def make_layers() -> list[Pair]:
    # The peer's wsgi layer takes its host from here only; its custom and
    # static layers from the ``host`` attribute. Both default to localhost.
    os.environ["GOCEPT_HTTP_APP_HOST"] = HOST
    peer_wsgi_layer = peer_wsgi.Layer(name="BENCH_PEER_WSGI")
    peer_wsgi_layer.wsgi_app = app
    peer_custom_layer = peer_custom.Layer(Handler, name="BENCH_PEER_CUSTOM")
    peer_custom_layer.host = HOST
    peer_static_layer = peer_static.Layer(name="BENCH_PEER_STATIC")
    peer_static_layer.host = HOST
    return [
        Pair("wsgi", serverlayer.wsgi.Layer(app, name="BENCH_WSGI", host=HOST), peer_wsgi_layer),
        Pair(
            "custom",
            serverlayer.custom.Layer(Handler, name="BENCH_CUSTOM", host=HOST),
            peer_custom_layer,
        ),
        Pair("static", serverlayer.static.Layer(name="BENCH_STATIC", host=HOST), peer_static_layer),
    ]


class CountingConnection(http.client.HTTPConnection):
    """Counts the TCP connections http.client opens."""

    connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


def get(layer: Any, requests: int) -> CountingConnection:
    """Send ``requests`` sequential GETs to ``layer``'s server; check each answer."""
    connection = CountingConnection(HOST, layer["http_port"], timeout=10)
    try:
        for _ in range(requests):
            connection.request("GET", "/")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200 or body != BODY:
                raise RuntimeError(f"{layer!r} answered {response.status} {body[:60]!r}")
    finally:
        connection.close()
    return connection


def check_serves(pair: Pair, quiet: _timing.OutputTrap) -> None:
    """Set up, GET once, tear down: a warm-up that proves both layers serve."""
    for layer in (pair.ours, pair.peer):
        with quiet():
            layer.setUp()
            try:
                if pair.kind == "static":
                    with open(os.path.join(layer["documentroot"], "index.txt"), "wb") as file:
                        file.write(BODY)
                    connection = http.client.HTTPConnection(HOST, layer["http_port"], timeout=10)
                    try:
                        connection.request("GET", "/index.txt")
                        response = connection.getresponse()
                        if response.status != 200 or response.read() != BODY:
                            raise RuntimeError(f"{layer!r} does not serve its documentroot")
                    finally:
                        connection.close()
                else:
                    get(layer, 1)
            finally:
                layer.tearDown()


def bench_setup_teardown(
    pairs: list[Pair], rounds: int, quiet: _timing.OutputTrap
) -> list[_timing.Row]:
    def cycle(layer: Any) -> _timing.Measurement:
        def measure() -> float:
            def set_up_and_tear_down() -> None:
                layer.setUp()
                layer.tearDown()

            with quiet():
                return _timing.elapsed(set_up_and_tear_down) * 1000

        return measure

    rows = []
    for pair in pairs:
        check_serves(pair, quiet)
        results = _timing.interleaved({"ours": cycle(pair.ours), "peer": cycle(pair.peer)}, rounds)
        ours, peer = _timing.median(results["ours"]), _timing.median(results["peer"])
        rows.append(
            _timing.Row(
                measure=f"{pair.kind} setUp+tearDown",
                ours=f"{ours:.2f} ms",
                peer=f"{peer:.2f} ms",
                ratio=peer / ours,
                target=f"<= {SETUP_TEARDOWN_TARGET_MS:g} ms",
                met=ours <= SETUP_TEARDOWN_TARGET_MS,
            )
        )
    return rows


def bench_wsgi_throughput(
    pair: Pair, requests: int, repeats: int, quiet: _timing.OutputTrap
) -> tuple[_timing.Row, str]:
    connects: dict[str, int] = {}

    def throughput(name: str, layer: Any) -> _timing.Measurement:
        def measure() -> float:
            with quiet():
                connection, seconds = _timing.timed(lambda: get(layer, requests))
            connects[name] = connection.connects
            return requests / seconds

        return measure

    with quiet():
        pair.ours.setUp()
        try:
            pair.peer.setUp()
        except BaseException:
            pair.ours.tearDown()
            raise
    try:
        with quiet():
            for layer in (pair.ours, pair.peer):
                get(layer, min(100, requests))  # warm up
        results = _timing.interleaved(
            {"ours": throughput("ours", pair.ours), "peer": throughput("peer", pair.peer)}, repeats
        )
    finally:
        with quiet():
            pair.peer.tearDown()
            pair.ours.tearDown()
    ours, peer = _timing.median(results["ours"]), _timing.median(results["peer"])
    row = _timing.Row(
        measure=f"wsgi {requests} GETs, one HTTPConnection",
        ours=f"{ours:,.0f} req/s",
        peer=f"{peer:,.0f} req/s",
        ratio=ours / peer,
        target=f">= {THROUGHPUT_TARGET_RATIO:g}x {PEER}",
        met=ours / peer >= THROUGHPUT_TARGET_RATIO,
    )
    note = (
        f"TCP connections per {requests} GETs: serverlayer {connects['ours']},"
        f" {PEER} {connects['peer']}"
    )
    return row, note


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=20, help="setUp+tearDown rounds per layer (default 20)"
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="GETs per throughput run (default 2000)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="throughput runs per package (default 5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 rounds, 2 runs of 200 GETs"
    )
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.rounds, arguments.requests, arguments.repeats = 3, 200, 2
    for option in ("rounds", "requests", "repeats"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option} must be at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    _timing.print_environment(
        "HTTP layers: serverlayer vs gocept.httpserverlayer (medians, interleaved)",
        {
            "packages": (
                f"serverlayer {serverlayer.__version__},"
                f" waitress {importlib.metadata.version('waitress')},"
                f" gocept.httpserverlayer {importlib.metadata.version('gocept.httpserverlayer')}"
            ),
            "counts": (
                f"{arguments.rounds} setUp+tearDown rounds per layer;"
                f" {arguments.repeats} x {arguments.requests} GETs"
            ),
        },
    )
    quiet = _timing.OutputTrap()
    load = _timing.MachineLoad()
    pairs = make_layers()
    rows = bench_setup_teardown(pairs, arguments.rounds, quiet)
    throughput_row, note = bench_wsgi_throughput(
        pairs[0], arguments.requests, arguments.repeats, quiet
    )
    rows.append(throughput_row)
    _timing.print_table(rows, peer=PEER)
    print()
    print("ratio: how many times better serverlayer does (shorter time, more requests/s)")
    print(note)
    _timing.print_machine_load(load)
    if quiet.text:
        print(f"suppressed {len(quiet.text)} characters the layers printed; first line:")
        print(f"  {quiet.text.splitlines()[0][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
