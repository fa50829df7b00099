"""serverlayer's SMTP layer against a bare aiosmtpd Controller, side by side.

Run from the checkout, after ``pip install -e '.[bench]'``::

    python benchmarks/bench_smtp.py            # full run, a few seconds
    python benchmarks/bench_smtp.py --quick    # smoke run, about a second

It measures, for serverlayer and for ``aiosmtpd.controller.Controller``
(the peer) in one process, interleaved round by round:

1. ``setUp`` + ``tearDown`` of ``serverlayer.smtp.Layer`` against making a
   ``Controller`` and calling its ``start()`` and ``stop()`` (median of
   ``--rounds``). A Controller can neither listen on port 0 nor start twice,
   so every round makes a new one, on a port found free by binding a socket
   to port 0 and closing it; finding that port is not timed.
2. ``--messages`` small messages sent with ``sendmail`` over one
   ``smtplib.SMTP`` connection, connecting and QUIT included (median
   messages/s of ``--repeats`` runs). After every run the script counts
   what arrived, in the layer's ``outbox`` and in the peer handler's list of
   envelopes, and reports any mail that went missing.

The peer's handler only stores each envelope; serverlayer's stores the
envelope and the raw message, and parses it into the ``EmailMessage`` that
tests read from ``outbox`` when a test first reads it, so parsing is not
part of the server's answer and not measured here. Both listen on 127.0.0.1. The
table's ratio says how many times better serverlayer does (faster set-up
and tear-down, more messages per second). Whatever aiosmtpd logs goes to a
trap, not to the terminal. The script is a report, not a test: it exits 0
whether targets are met or not.
"""

from __future__ import annotations

import functools
import smtplib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import _timing

HOST = "127.0.0.1"
SENDER = "sender@example.com"
RECIPIENTS = ["recipient@example.com"]
MESSAGE = (
    b"From: sender@example.com\r\n"
    b"To: recipient@example.com\r\n"
    b"Subject: benchmark\r\n"
    b"\r\n"
    b"Hello, benchmark!\r\n"
)
SETUP_TEARDOWN_TARGET_MS = 5.0
THROUGHPUT_TARGET_RATIO = 0.9
PEER = "aiosmtpd Controller"
#: Seconds to wait for mail still on its way after a run; ``sendmail``
#: returns once the server answered 250, so it is normally all there.
ARRIVAL_TIMEOUT = 2.0
#: What aiosmtpd and its event loops log to.
LOGGERS = ("mail.log", "asyncio")
COUNTS = (
    _timing.Count("rounds", 50, 3, "setUp+tearDown rounds per package"),
    _timing.Count("messages", 500, 100, "messages per throughput run"),
    _timing.Count("repeats", 5, 2, "throughput runs per package"),
)

try:
    from aiosmtpd.controller import Controller

    import serverlayer.smtp
except ImportError as exc:
    _timing.missing_extras("bench_smtp", exc)


class StoringHandler:
    """The peer's handler: keeps every envelope, nothing else."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


def free_port() -> int:
    """A port nothing listens on now: bind port 0, note the port, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Peer:
    """The peer dressed as the layer, so that both take the same measures:
    ``setUp`` starts a new Controller (one can neither listen on port 0 nor
    start twice) and its ``smtp_port`` and ``outbox`` (the handler's
    envelopes) are items, as the layer's are."""

    def __init__(self) -> None:
        self.handler = StoringHandler()
        self.port = 0
        self.controller: Any = None

    def prepare(self) -> None:
        """A new handler and a free port: what ``setUp`` does before starting
        the Controller, and what the set-up measure leaves untimed."""
        self.handler = StoringHandler()
        self.port = free_port()

    def start(self) -> None:
        self.controller = Controller(self.handler, hostname=HOST, port=self.port)
        self.controller.start()

    def setUp(self) -> None:
        self.prepare()
        self.start()

    def tearDown(self) -> None:
        self.controller.stop()

    def __getitem__(self, name: str) -> Any:
        return {"smtp_port": self.port, "outbox": self.handler.envelopes}[name]


@dataclass
class Sent:
    """One run of ``send``: what the server accepted, and why it stopped early."""

    accepted: int = 0
    error: str | None = None

    def problem(self, messages: int, received: int) -> str | None:
        """What went wrong when ``messages`` were sent and ``received`` arrived, if anything."""
        if self.accepted == messages == received and self.error is None:
            return None
        problem = f"{received} of {messages} arrived"
        if self.error is not None:
            problem += f", sending stopped after {self.accepted} ({self.error})"
        return problem


def send(port: int, messages: int, timeout: float = 10) -> Sent:
    """Send ``messages`` messages over one SMTP connection, then QUIT.

    A refusal or a broken connection ends the run; it is recorded, not
    raised, so that the report can say how much mail got through.
    """
    sent = Sent()
    try:
        connection = smtplib.SMTP(HOST, port, timeout=timeout)
        try:
            for _ in range(messages):
                connection.sendmail(SENDER, RECIPIENTS, MESSAGE)
                sent.accepted += 1
        finally:
            connection.quit()
    except (smtplib.SMTPException, OSError) as exc:
        sent.error = f"{type(exc).__name__}: {exc}"
    return sent


def arrived(count: Callable[[], int], expected: int) -> int:
    """How many messages the server holds, once ``expected`` arrived or time is up."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while count() < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return count()


def check_receives(port: int, count: Callable[[], int], timeout: float = 10) -> None:
    """Send one message and see it arrive; raise if it does not."""
    sent = send(port, 1, timeout)
    received = arrived(count, 1)
    if sent.error is not None or received != 1:
        raise RuntimeError(f"does not receive mail: {sent.error or f'{received} arrived'}")


def check_serves(servers: dict[str, Any], quiet: _timing.OutputTrap) -> None:
    """Set up, send one message, tear down: a warm-up that proves each receives mail."""
    for name, server in servers.items():
        try:
            with quiet(), _timing.all_set_up(quiet, [server]):
                check_receives(server["smtp_port"], functools.partial(len, server["outbox"]))
        except RuntimeError as exc:
            raise RuntimeError(f"{name} {exc}") from exc


def bench_setup_teardown(layer: Any, rounds: int, quiet: _timing.OutputTrap) -> _timing.Row:
    peer = Peer()

    def start_and_stop_peer() -> float:
        def start_and_stop() -> None:
            peer.start()
            peer.tearDown()

        peer.prepare()  # finding a free port is not timed
        with quiet():
            return _timing.elapsed(start_and_stop) * 1000

    check_serves({"serverlayer": layer, PEER: peer}, quiet)
    results = _timing.interleaved({"ours": _timing.lifecycle(layer, quiet), "peer": start_and_stop_peer}, rounds)
    ms = _timing.medians(results)
    return _timing.lifecycle_row(
        "setUp+tearDown", ms["ours"], ms["peer"], ratio=ms["peer"] / ms["ours"], target_ms=SETUP_TEARDOWN_TARGET_MS
    )


@dataclass
class Losses:
    """Throughput runs in which mail went missing, per contender."""

    runs: dict[str, list[str]] = field(default_factory=lambda: {"ours": [], "peer": []})

    def lines(self, messages: int, repeats: int) -> list[str]:
        lines = []
        for name, label in (("ours", "serverlayer"), ("peer", PEER)):
            if self.runs[name]:
                lines.append(f"LOST MAIL, {label}: " + "; ".join(self.runs[name]))
            else:
                lines.append(f"{label}: all {messages} messages arrived in each of {repeats} runs")
        return lines


def bench_throughput(
    layer: Any, messages: int, repeats: int, quiet: _timing.OutputTrap
) -> tuple[_timing.Row, list[str]]:
    losses = Losses()
    runs = {"ours": 0, "peer": 0}

    def run(name: str, server: Any) -> float:
        runs[name] += 1
        outbox = server["outbox"]
        outbox.clear()
        with quiet():
            sent, seconds = _timing.timed(lambda: send(server["smtp_port"], messages))
            received = arrived(lambda: len(outbox), messages)
        problem = sent.problem(messages, received)
        if problem is not None:
            losses.runs[name].append(f"run {runs[name]}: {problem}")
        return sent.accepted / seconds

    rates = _timing.rate_medians(
        {"ours": layer, "peer": Peer()},
        run,
        repeats,
        quiet,
        warm_up=lambda server: send(server["smtp_port"], min(100, messages)),
    )
    ours, peer = rates["ours"], rates["peer"]
    ratio = ours / peer if peer else float("inf")
    row = _timing.rate_row(
        f"{messages} messages, one SMTP connection",
        ours,
        peer,
        "msg/s",
        ratio=ratio,
        target=f">= {THROUGHPUT_TARGET_RATIO:g}x {PEER}",
        met=ratio >= THROUGHPUT_TARGET_RATIO and not losses.runs["ours"],
    )
    return row, losses.lines(messages, repeats)


def main(argv: list[str] | None = None) -> int:
    arguments = _timing.options(__doc__, COUNTS, "3 rounds, 2 runs of 100 messages", argv)

    def measure(quiet: _timing.OutputTrap) -> _timing.Findings:
        layer = serverlayer.smtp.Layer(name="BENCH_SMTP", host=HOST)
        setup_row = bench_setup_teardown(layer, arguments.rounds, quiet)
        throughput_row, notes = bench_throughput(layer, arguments.messages, arguments.repeats, quiet)
        return _timing.Findings(_timing.table([setup_row, throughput_row], peer=PEER), notes)

    return _timing.report(
        "SMTP layer: serverlayer vs a bare aiosmtpd Controller (medians, interleaved)",
        {
            "packages": _timing.versions("aiosmtpd"),
            "counts": (
                f"{arguments.rounds} setUp+tearDown rounds per package;"
                f" {arguments.repeats} x {arguments.messages} messages"
            ),
        },
        measure,
        ["ratio: how many times better serverlayer does (shorter time, more messages/s)"],
        printed_by="servers",
        loggers=LOGGERS,
    )


if __name__ == "__main__":
    sys.exit(main())
