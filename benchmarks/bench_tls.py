"""What TLS costs serverlayer's HTTP layers: HTTPS against plain HTTP, side by side.

Run from the checkout, after ``pip install -e '.[bench]'``::

    python benchmarks/bench_tls.py            # full run, a few seconds
    python benchmarks/bench_tls.py --quick    # smoke run, about a second

It measures, in one process:

1. What the certificate authority costs: constructing
   ``serverlayer.tls.CertificateAuthority()`` (a trustme ECDSA CA whose PEM
   goes to a temporary directory), and that CA's first server certificate,
   ``server_context`` for a set of names it has not seen (median of
   ``--rounds`` new CAs). A test process pays the first once and the second
   once per set of names, so neither has a target. The script drops every
   CA it made and checks that their temporary directories are gone.
2. ``setUp`` + ``tearDown`` of the wsgi, custom and static layers with
   ``tls=True``, once the process's CA and certificate exist, interleaved
   round by round with the same layers without TLS (median of ``--rounds``).
3. sequential GETs to the wsgi layer with ``tls=True`` over one keep-alive
   ``http.client.HTTPSConnection`` with the layer's ``ssl_context``, against
   one ``http.client.HTTPConnection`` to the same layer without TLS (median
   requests/s of ``--repeats`` runs of ``--requests`` each). No target.

Every layer listens on 127.0.0.1; HTTPS clients verify the certificate
against the test CA. The table's ratio says what HTTPS costs relative to
HTTP (its time over HTTP's; HTTP's requests/s over its own), for
information only. The script is a report, not a test: it exits 0 whether
targets are met or not.
"""

from __future__ import annotations

import argparse
import functools
import gc
import http.client
import http.server
import importlib.metadata
import os
import ssl
import sys
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import _timing

HOST = "127.0.0.1"
BODY = b"Hello, benchmark!\n"
HTTPS_SETUP_TEARDOWN_TARGET_MS = 10.0
PEER = "HTTP"
OURS = "HTTPS"

try:
    import serverlayer
    import serverlayer.custom
    import serverlayer.static
    import serverlayer.tls
    import serverlayer.wsgi
except ImportError as exc:
    sys.exit(
        f"bench_tls: {exc}\n"
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
    """The same kind of layer with TLS and without."""

    kind: str
    https: Any
    http: Any


def make_layers() -> list[Pair]:
    pairs = []
    for kind, make in (
        ("wsgi", functools.partial(serverlayer.wsgi.Layer, app)),
        ("custom", functools.partial(serverlayer.custom.Layer, Handler)),
        ("static", serverlayer.static.Layer),
    ):
        name = f"BENCH_{kind.upper()}"
        pairs.append(
            Pair(kind, make(name=f"{name}_TLS", host=HOST, tls=True), make(name=name, host=HOST))
        )
    return pairs


class CountingHTTPConnection(http.client.HTTPConnection):
    """Counts the TCP connections http.client opens."""

    connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


class CountingHTTPSConnection(http.client.HTTPSConnection):
    """Counts the TCP connections (each with a handshake) http.client opens."""

    connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


def get(layer: Any, requests: int) -> CountingHTTPConnection | CountingHTTPSConnection:
    """Send ``requests`` sequential GETs to ``layer``'s server; check each answer."""
    connection: CountingHTTPConnection | CountingHTTPSConnection
    if layer.tls:
        connection = CountingHTTPSConnection(HOST, layer["http_port"], timeout=10, context=layer["ssl_context"])
    else:
        connection = CountingHTTPConnection(HOST, layer["http_port"], timeout=10)
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


def fetch(layer: Any, path: str) -> bytes:
    """GET ``path`` from the layer's ``http_url`` with urllib, verifying HTTPS
    against the layer's ``ssl_context`` and bypassing any proxy."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if layer.tls:
        handlers.append(urllib.request.HTTPSHandler(context=layer["ssl_context"]))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(layer["http_url"] + path, timeout=10) as response:
        body: bytes = response.read()
        return body


def check_serves(pair: Pair, quiet: _timing.OutputTrap) -> float:
    """Set up, GET once with urllib, tear down: a warm-up that proves both
    layers serve, the TLS one over verified HTTPS.

    Returns the milliseconds the TLS layer's ``setUp`` took.
    """
    https_set_up_ms = 0.0
    for layer in (pair.https, pair.http):
        with quiet():
            set_up_ms = _timing.elapsed(layer.setUp) * 1000
            try:
                scheme = "https" if layer.tls else "http"
                if not layer["http_url"].startswith(f"{scheme}://"):
                    raise RuntimeError(f"{layer!r} publishes http_url {layer['http_url']!r}")
                path = ""
                if pair.kind == "static":
                    path = "index.txt"
                    with open(os.path.join(layer["documentroot"], path), "wb") as file:
                        file.write(BODY)
                if fetch(layer, path) != BODY:
                    raise RuntimeError(f"{layer!r} does not serve {path or '/'}")
            finally:
                layer.tearDown()
        if layer.tls:
            https_set_up_ms = set_up_ms
    return https_set_up_ms


def new_authority(number: int) -> tuple[float, float, str]:
    """Make a CA and its first server certificate, for names no CA has seen.

    Returns the milliseconds each took and the CA's directory. The CA goes
    when this returns, and removes its directory as it goes.
    """
    # A fresh set of names every round, as a layer with a host of its own has.
    names = serverlayer.tls.certificate_names(f"host{number}.test")
    authority, seconds = _timing.timed(serverlayer.tls.CertificateAuthority)
    certificate_seconds = _timing.elapsed(functools.partial(authority.server_context, names))
    return seconds * 1000, certificate_seconds * 1000, os.path.dirname(authority.ca_bundle)


def bench_certificate_authority(rounds: int, quiet: _timing.OutputTrap) -> tuple[list[_timing.Row], list[str]]:
    creation: list[float] = []
    certificate: list[float] = []
    directories: list[str] = []
    for number in range(rounds):
        with quiet():
            creation_ms, certificate_ms, directory = new_authority(number)
        creation.append(creation_ms)
        certificate.append(certificate_ms)
        directories.append(directory)
    gc.collect()  # in case a CA ended up in a reference cycle
    left = [directory for directory in directories if os.path.exists(directory)]
    rows = [
        _timing.Row(
            measure="new CertificateAuthority()",
            ours=f"{_timing.median(creation):.2f} ms",
            peer="-",
            ratio=None,
            target="-",
            met=None,
        ),
        _timing.Row(
            measure="its first server_context()",
            ours=f"{_timing.median(certificate):.2f} ms",
            peer="-",
            ratio=None,
            target="-",
            met=None,
        ),
    ]
    notes = [
        f"the process's first CertificateAuthority() (round 1 of {rounds}, one-time start-up included):"
        f" {creation[0]:.2f} ms, its first server_context() {certificate[0]:.2f} ms"
    ]
    if left:
        notes.append(
            f"TEMPORARY DIRECTORIES LEFT BEHIND: {len(left)} of {rounds} CAs' directories still exist,"
            f" e.g. {left[0]}"
        )
    else:
        notes.append(f"temporary CA directories: all {rounds} removed once the CAs were dropped")
    return rows, notes


def bench_setup_teardown(
    pairs: list[Pair], rounds: int, quiet: _timing.OutputTrap
) -> tuple[list[_timing.Row], str]:
    def cycle(layer: Any) -> _timing.Measurement:
        def measure() -> float:
            def set_up_and_tear_down() -> None:
                layer.setUp()
                layer.tearDown()

            with quiet():
                return _timing.elapsed(set_up_and_tear_down) * 1000

        return measure

    rows = []
    first_https_set_up_ms: float | None = None
    for pair in pairs:
        set_up_ms = check_serves(pair, quiet)
        if first_https_set_up_ms is None:
            first_https_set_up_ms = set_up_ms
        results = _timing.interleaved({"https": cycle(pair.https), "http": cycle(pair.http)}, rounds)
        https, plain = _timing.median(results["https"]), _timing.median(results["http"])
        rows.append(
            _timing.Row(
                measure=f"{pair.kind} setUp+tearDown",
                ours=f"{https:.2f} ms",
                peer=f"{plain:.2f} ms",
                ratio=https / plain,
                target=f"<= {HTTPS_SETUP_TEARDOWN_TARGET_MS:g} ms",
                met=https <= HTTPS_SETUP_TEARDOWN_TARGET_MS,
            )
        )
    note = (
        f"the process's first HTTPS setUp (makes its CA and the certificate for"
        f" {', '.join(serverlayer.tls.certificate_names(HOST))}): {first_https_set_up_ms:.2f} ms,"
        " untimed warm-up"
    )
    return rows, note


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
        pair.https.setUp()
        try:
            pair.http.setUp()
        except BaseException:
            pair.https.tearDown()
            raise
    try:
        with quiet():
            for layer in (pair.https, pair.http):
                get(layer, min(100, requests))  # warm up
        results = _timing.interleaved(
            {"https": throughput("https", pair.https), "http": throughput("http", pair.http)}, repeats
        )
    finally:
        with quiet():
            pair.http.tearDown()
            pair.https.tearDown()
    https, plain = _timing.median(results["https"]), _timing.median(results["http"])
    row = _timing.Row(
        measure=f"wsgi {requests} GETs, one connection",
        ours=f"{https:,.0f} req/s",
        peer=f"{plain:,.0f} req/s",
        ratio=plain / https,
        target="-",
        met=None,
    )
    note = f"TCP connections per {requests} GETs: HTTPS {connects['https']}, HTTP {connects['http']}"
    return row, note


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=50,
        help="new CAs, and setUp+tearDown rounds per layer (default 50)",
    )
    parser.add_argument(
        "--requests", type=int, default=500, help="GETs per throughput run (default 500)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="throughput runs per scheme (default 5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 rounds, 2 runs of 100 GETs"
    )
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.rounds, arguments.requests, arguments.repeats = 3, 100, 2
    for option in ("rounds", "requests", "repeats"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option} must be at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    _timing.print_environment(
        "TLS: serverlayer's HTTP layers over HTTPS vs plain HTTP (medians, interleaved)",
        {
            "packages": (
                f"serverlayer {serverlayer.__version__},"
                f" trustme {importlib.metadata.version('trustme')},"
                f" cryptography {importlib.metadata.version('cryptography')},"
                f" waitress {importlib.metadata.version('waitress')}"
            ),
            "openssl": ssl.OPENSSL_VERSION,
            "counts": (
                f"{arguments.rounds} new CAs; {arguments.rounds} setUp+tearDown rounds per layer;"
                f" {arguments.repeats} x {arguments.requests} GETs"
            ),
        },
    )
    quiet = _timing.OutputTrap()
    load = _timing.MachineLoad()
    rows, notes = bench_certificate_authority(arguments.rounds, quiet)
    pairs = make_layers()
    setup_rows, setup_note = bench_setup_teardown(pairs, arguments.rounds, quiet)
    rows += setup_rows
    notes.append(setup_note)
    throughput_row, throughput_note = bench_wsgi_throughput(
        pairs[0], arguments.requests, arguments.repeats, quiet
    )
    rows.append(throughput_row)
    notes.append(throughput_note)
    _timing.print_table(rows, peer=PEER, ours=OURS)
    print()
    print("ratio: what HTTPS costs relative to HTTP, for information (its time over HTTP's,")
    print("  HTTP's requests/s over its own; above 1 HTTPS costs more); '-': no comparison or no target")
    for note in notes:
        print(note)
    _timing.print_machine_load(load)
    if quiet.text:
        print(f"suppressed {len(quiet.text)} characters the layers printed; first line:")
        print(f"  {quiet.text.splitlines()[0][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
