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

import functools
import gc
import os
import ssl
import sys
import urllib.request
from typing import Any

import _http
import _timing
from _http import HOST, Pair

HTTPS_SETUP_TEARDOWN_TARGET_MS = 10.0
PEER = "HTTP"
OURS = "HTTPS"
COUNTS = (
    _timing.Count("rounds", 50, 3, "new CAs, and setUp+tearDown rounds per layer"),
    _timing.Count("requests", 500, 100, "GETs per throughput run"),
    _timing.Count("repeats", 5, 2, "throughput runs per scheme"),
)

try:
    import serverlayer.custom
    import serverlayer.static
    import serverlayer.tls
    import serverlayer.wsgi
except ImportError as exc:
    _timing.missing_extras("bench_tls", exc)


def make_layers() -> list[Pair]:
    """Each kind of layer with TLS (``ours``) and without (``peer``)."""
    pairs = []
    for kind, make in (
        ("wsgi", functools.partial(serverlayer.wsgi.Layer, _http.app)),
        ("custom", functools.partial(serverlayer.custom.Layer, _http.Handler)),
        ("static", serverlayer.static.Layer),
    ):
        name = f"BENCH_{kind.upper()}"
        pairs.append(Pair(kind, make(name=f"{name}_TLS", host=HOST, tls=True), make(name=name, host=HOST)))
    return pairs


def check_url(layer: Any, path: str) -> None:
    """GET ``path`` from the layer's ``http_url`` with urllib, verifying HTTPS
    against the layer's ``ssl_context`` and bypassing any proxy: the URL a
    test would use has the right scheme and works."""
    url = layer["http_url"]
    scheme = "https" if layer.tls else "http"
    if not url.startswith(f"{scheme}://"):
        raise RuntimeError(f"{layer!r} publishes http_url {url!r}")
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if layer.tls:
        handlers.append(urllib.request.HTTPSHandler(context=layer["ssl_context"]))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(url + path.lstrip("/"), timeout=10) as response:
        if response.read() != _http.BODY:
            raise RuntimeError(f"{layer!r} does not serve {path}")


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
        _timing.Row(measure, f"{_timing.median(values):.2f} ms", peer="-", ratio=None, target="-", met=None)
        for measure, values in (("new CertificateAuthority()", creation), ("its first server_context()", certificate))
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


def bench_setup_teardown(pairs: list[Pair], rounds: int, quiet: _timing.OutputTrap) -> tuple[list[_timing.Row], str]:
    rows = []
    first_https_set_up_ms: float | None = None
    for pair in pairs:
        set_up_ms = _http.check_serves(pair, quiet, also=check_url)
        if first_https_set_up_ms is None:
            first_https_set_up_ms = set_up_ms
        ms = _timing.lifecycle_medians(pair.layers(), rounds, quiet)
        rows.append(
            _timing.lifecycle_row(
                f"{pair.kind} setUp+tearDown",
                ms["ours"],
                ms["peer"],
                ratio=ms["ours"] / ms["peer"],
                target_ms=HTTPS_SETUP_TEARDOWN_TARGET_MS,
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
    rates, connects = _http.get_rates(pair, requests, repeats, quiet)
    https, plain = rates["ours"], rates["peer"]
    row = _timing.rate_row(f"wsgi {requests} GETs, one connection", https, plain, "req/s", ratio=plain / https)
    note = f"TCP connections per {requests} GETs: HTTPS {connects['ours']}, HTTP {connects['peer']}"
    return row, note


def main(argv: list[str] | None = None) -> int:
    arguments = _timing.options(__doc__, COUNTS, "3 rounds, 2 runs of 100 GETs", argv)

    def measure(quiet: _timing.OutputTrap) -> _timing.Findings:
        rows, notes = bench_certificate_authority(arguments.rounds, quiet)
        pairs = make_layers()
        setup_rows, setup_note = bench_setup_teardown(pairs, arguments.rounds, quiet)
        throughput_row, throughput_note = bench_wsgi_throughput(pairs[0], arguments.requests, arguments.repeats, quiet)
        table = _timing.table([*rows, *setup_rows, throughput_row], peer=PEER, ours=OURS)
        return _timing.Findings(table, [*notes, setup_note, throughput_note])

    return _timing.report(
        "TLS: serverlayer's HTTP layers over HTTPS vs plain HTTP (medians, interleaved)",
        {
            "packages": _timing.versions("trustme", "cryptography", "waitress"),
            "openssl": ssl.OPENSSL_VERSION,
            "counts": (
                f"{arguments.rounds} new CAs; {arguments.rounds} setUp+tearDown rounds per layer;"
                f" {arguments.repeats} x {arguments.requests} GETs"
            ),
        },
        measure,
        [
            "ratio: what HTTPS costs relative to HTTP, for information (its time over HTTP's,",
            "  HTTP's requests/s over its own; above 1 HTTPS costs more); '-': no comparison or no target",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
