"""What matching on request bodies costs the content layer.

Run from the checkout, after ``pip install -e '.[bench]'``::

    python benchmarks/bench_matching.py            # full run, about half a minute
    python benchmarks/bench_matching.py --quick    # smoke run, a few seconds

Three content layers in one process, each with 20 routes that the measured
GETs to ``/hit`` do not match and, after them, the route they do. On the
baseline the 20 routes match on paths of their own. On the second each
route also matches a body (``json=``, ``json_subset=``, ``form=``,
``data=`` and ``match=`` in turn). On the third the 20 body-matching routes
are on ``/hit`` itself, so every GET tries all 20 body matchers before it
finds its route. The client makes sequential GETs over one
``http.client.HTTPConnection``, the layers taking turns run by run; the
table shows the median requests/s and the ratio to the baseline. The
target: body matchers keep at least 0.9x the rate. The script is a report, not a test: it exits 0 whether the
target is met or not.
"""

from __future__ import annotations

import sys
from typing import Any

import _http
import _timing
from _http import BODY, HOST

ROUTES = 20
TARGET_RATIO = 0.9
BASELINE = "path-only routes"
COUNTS = (
    _timing.Count("requests", 2000, 200, "GETs per run"),
    _timing.Count("repeats", 7, 2, "runs per layer"),
)

try:
    import serverlayer.content
except ImportError as exc:
    _timing.missing_extras("bench_matching", exc)


def body_matchers(number: int) -> dict[str, Any]:
    """The body matcher of route ``number``, a different kind in turn."""
    kinds: list[dict[str, Any]] = [
        {"json": {"order": number}},
        {"json_subset": {"order": {"id": number}}},
        {"form": {"order": str(number)}},
        {"data": f"order {number}"},
        {"match": lambda request: request.body.startswith(b"order")},
    ]
    return kinds[number % len(kinds)]


def program(layer: Any, kind: str) -> None:
    """Route ``/hit`` after 20 routes of ``kind``: ``path-only`` (each on a
    path of its own), ``elsewhere`` (the same, each matching a body too) or
    ``same-path`` (each on ``/hit`` with a body the GETs do not have, so
    that every request tries all 20 body matchers)."""
    content = layer["http_content"]
    for number in range(ROUTES):
        if kind == "path-only":
            content.route(f"/route-{number}").respond("no")
        elif kind == "elsewhere":
            content.route(f"/route-{number}", **body_matchers(number)).respond("no")
        else:
            content.route("/hit", **body_matchers(number)).respond("no")
    content.route("/hit").respond(BODY)


KINDS = {
    "path-only": "BENCH_PATH_ONLY",
    "elsewhere": "BENCH_BODY_MATCHERS_ELSEWHERE",
    "same-path": "BENCH_BODY_MATCHERS_SAME_PATH",
}
MEASURES = {
    "elsewhere": f"GETs to /hit, {ROUTES} body-matching routes on other paths first",
    "same-path": f"GETs to /hit, {ROUTES} body-matching routes on /hit first",
}


def main(argv: list[str] | None = None) -> int:
    arguments = _timing.options(__doc__, COUNTS, "2 runs of 200 GETs", argv)

    def measure(quiet: _timing.OutputTrap) -> _timing.Findings:
        layers = {kind: serverlayer.content.Layer(name=name, host=HOST) for kind, name in KINDS.items()}

        def run(name: str, layer: Any) -> float:
            with quiet():
                _, seconds = _timing.timed(lambda: _http.layer_gets(layer, arguments.requests, "/hit"))
            return arguments.requests / seconds

        def warm_up(layer: Any) -> None:
            program(layer, next(kind for kind, each in layers.items() if each is layer))
            _http.layer_gets(layer, min(100, arguments.requests), "/hit")

        rates = _timing.rate_medians(layers, run, arguments.repeats, quiet, warm_up)
        rows = []
        for kind, measure in MEASURES.items():
            ratio = rates[kind] / rates["path-only"]
            rows.append(
                _timing.rate_row(
                    measure,
                    rates[kind],
                    rates["path-only"],
                    "req/s",
                    ratio=ratio,
                    target=f">= {TARGET_RATIO:g}x",
                    met=ratio >= TARGET_RATIO,
                )
            )
        return _timing.Findings(_timing.table(rows, peer=BASELINE, ours="body matchers"), [])

    return _timing.report(
        "Content layer: routes matching on bodies vs on paths only (medians, interleaved)",
        {"counts": f"{arguments.repeats} x {arguments.requests} GETs per layer over one HTTPConnection"},
        measure,
        ["ratio: the body matchers' rate over the path-only rate (1 is no cost)"],
    )

if __name__ == "__main__":
    sys.exit(main())
