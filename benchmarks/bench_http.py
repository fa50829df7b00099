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

import os
import sys

import _http
import _timing
from _http import HOST, Pair

SETUP_TEARDOWN_TARGET_MS = 5.0
THROUGHPUT_TARGET_RATIO = 1.5
PEER = "gocept 4.0"
COUNTS = (
    _timing.Count("rounds", 20, 3, "setUp+tearDown rounds per layer"),
    _timing.Count("requests", 2000, 200, "GETs per throughput run"),
    _timing.Count("repeats", 5, 2, "throughput runs per package"),
)

try:
    import gocept.httpserverlayer.custom as peer_custom
    import gocept.httpserverlayer.static as peer_static
    import gocept.httpserverlayer.wsgi as peer_wsgi

    import serverlayer.custom
    import serverlayer.static
    import serverlayer.wsgi
except ImportError as exc:
    _timing.missing_extras("bench_http", exc)


def make_layers() -> list[Pair]:
    # The peer's wsgi layer takes its host from here only; its custom and
    # static layers from the ``host`` attribute. Both default to localhost.
    os.environ["GOCEPT_HTTP_APP_HOST"] = HOST
    peer_wsgi_layer = peer_wsgi.Layer(name="BENCH_PEER_WSGI")
    peer_wsgi_layer.wsgi_app = _http.app
    peer_custom_layer = peer_custom.Layer(_http.Handler, name="BENCH_PEER_CUSTOM")
    peer_custom_layer.host = HOST
    peer_static_layer = peer_static.Layer(name="BENCH_PEER_STATIC")
    peer_static_layer.host = HOST
    return [
        Pair("wsgi", serverlayer.wsgi.Layer(_http.app, name="BENCH_WSGI", host=HOST), peer_wsgi_layer),
        Pair("custom", serverlayer.custom.Layer(_http.Handler, name="BENCH_CUSTOM", host=HOST), peer_custom_layer),
        Pair("static", serverlayer.static.Layer(name="BENCH_STATIC", host=HOST), peer_static_layer),
    ]


def bench_setup_teardown(pairs: list[Pair], rounds: int, quiet: _timing.OutputTrap) -> list[_timing.Row]:
    rows = []
    for pair in pairs:
        _http.check_serves(pair, quiet)
        ms = _timing.lifecycle_medians(pair.layers(), rounds, quiet)
        rows.append(
            _timing.lifecycle_row(
                f"{pair.kind} setUp+tearDown",
                ms["ours"],
                ms["peer"],
                ratio=ms["peer"] / ms["ours"],
                target_ms=SETUP_TEARDOWN_TARGET_MS,
            )
        )
    return rows


def bench_wsgi_throughput(
    pair: Pair, requests: int, repeats: int, quiet: _timing.OutputTrap
) -> tuple[_timing.Row, str]:
    rates, connects = _http.get_rates(pair, requests, repeats, quiet)
    ratio = rates["ours"] / rates["peer"]
    row = _timing.rate_row(
        f"wsgi {requests} GETs, one HTTPConnection",
        rates["ours"],
        rates["peer"],
        "req/s",
        ratio=ratio,
        target=f">= {THROUGHPUT_TARGET_RATIO:g}x {PEER}",
        met=ratio >= THROUGHPUT_TARGET_RATIO,
    )
    note = f"TCP connections per {requests} GETs: serverlayer {connects['ours']}, {PEER} {connects['peer']}"
    return row, note


def main(argv: list[str] | None = None) -> int:
    arguments = _timing.options(__doc__, COUNTS, "3 rounds, 2 runs of 200 GETs", argv)

    def measure(quiet: _timing.OutputTrap) -> _timing.Findings:
        pairs = make_layers()
        rows = bench_setup_teardown(pairs, arguments.rounds, quiet)
        throughput_row, note = bench_wsgi_throughput(pairs[0], arguments.requests, arguments.repeats, quiet)
        return _timing.Findings(_timing.table([*rows, throughput_row], peer=PEER), [note])

    return _timing.report(
        "HTTP layers: serverlayer vs gocept.httpserverlayer (medians, interleaved)",
        {
            "packages": _timing.versions("waitress", "gocept.httpserverlayer"),
            "counts": (
                f"{arguments.rounds} setUp+tearDown rounds per layer;"
                f" {arguments.repeats} x {arguments.requests} GETs"
            ),
        },
        measure,
        ["ratio: how many times better serverlayer does (shorter time, more requests/s)"],
    )


if __name__ == "__main__":
    sys.exit(main())
