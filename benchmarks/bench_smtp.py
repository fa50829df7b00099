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

import argparse
import contextlib
import importlib.metadata
import logging
import smtplib
import socket
import sys
import time
from collections.abc import Callable, Iterator
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

try:
    from aiosmtpd.controller import Controller

    import serverlayer
    import serverlayer.smtp
except ImportError as exc:
    sys.exit(
        f"bench_smtp: {exc}\n"
        "Install serverlayer with its benchmark extras from the checkout:"
        " pip install -e '.[bench]'"
    )


class StoringHandler:
    """The peer's handler: keeps every envelope, nothing else."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


class LogTrap(logging.Handler):
    """Keeps what the servers log off the terminal, and counts it.

    Without a handler of their own, warnings logged to ``mail.log`` from a
    server thread would reach logging's last resort, which prints to
    stderr at that moment, whether or not an ``OutputTrap`` is set. The
    loggers keep their levels, so the servers do no more logging work than
    they would in a test run.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def installed(self, names: tuple[str, ...]) -> Iterator[None]:
        loggers = [logging.getLogger(name) for name in names]
        propagate = [logger.propagate for logger in loggers]
        for logger in loggers:
            logger.addHandler(self)
            logger.propagate = False
        try:
            yield
        finally:
            for logger, was_propagating in zip(loggers, propagate, strict=True):
                logger.removeHandler(self)
                logger.propagate = was_propagating

    def first_line(self) -> str:
        record = self.records[0]
        return f"{record.name} {record.levelname}: {record.getMessage()}".splitlines()[0]


def free_port() -> int:
    """A port nothing listens on now: bind port 0, note the port, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Sent:
    """One run of ``send``: what the server accepted, and why it stopped early."""

    accepted: int = 0
    error: str | None = None


def send(port: int, messages: int) -> Sent:
    """Send ``messages`` messages over one SMTP connection, then QUIT.

    A refusal or a broken connection ends the run; it is recorded, not
    raised, so that the report can say how much mail got through.
    """
    sent = Sent()
    try:
        connection = smtplib.SMTP(HOST, port, timeout=10)
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


class Peer:
    """A started Controller with its handler; stopped again by ``close``."""

    def __init__(self) -> None:
        self.handler = StoringHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname=HOST, port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


def check_serves(layer: Any, quiet: _timing.OutputTrap) -> None:
    """Set up, send one message, tear down: a warm-up that proves both receive mail."""
    with quiet():
        layer.setUp()
        try:
            sent = send(layer["smtp_port"], 1)
            received = arrived(lambda: len(layer["outbox"]), 1)
        finally:
            layer.tearDown()
        peer = Peer()
        try:
            peer_sent = send(peer.port, 1)
            peer_received = arrived(lambda: len(peer.handler.envelopes), 1)
        finally:
            peer.close()
    for name, attempt, count in (
        ("serverlayer", sent, received),
        (PEER, peer_sent, peer_received),
    ):
        if attempt.error is not None or count != 1:
            raise RuntimeError(f"{name} does not receive mail: {attempt.error or f'{count} arrived'}")


def bench_setup_teardown(
    layer: Any, rounds: int, quiet: _timing.OutputTrap
) -> _timing.Row:
    def ours() -> float:
        def set_up_and_tear_down() -> None:
            layer.setUp()
            layer.tearDown()

        with quiet():
            return _timing.elapsed(set_up_and_tear_down) * 1000

    def peer() -> float:
        handler = StoringHandler()
        port = free_port()

        def start_and_stop() -> None:
            controller = Controller(handler, hostname=HOST, port=port)
            controller.start()
            controller.stop()

        with quiet():
            return _timing.elapsed(start_and_stop) * 1000

    check_serves(layer, quiet)
    results = _timing.interleaved({"ours": ours, "peer": peer}, rounds)
    ours_ms, peer_ms = _timing.median(results["ours"]), _timing.median(results["peer"])
    return _timing.Row(
        measure="setUp+tearDown",
        ours=f"{ours_ms:.2f} ms",
        peer=f"{peer_ms:.2f} ms",
        ratio=peer_ms / ours_ms,
        target=f"<= {SETUP_TEARDOWN_TARGET_MS:g} ms",
        met=ours_ms <= SETUP_TEARDOWN_TARGET_MS,
    )


@dataclass
class Losses:
    """Throughput runs in which mail went missing, per contender."""

    runs: dict[str, list[str]] = field(default_factory=lambda: {"ours": [], "peer": []})

    def record(self, name: str, run: int, messages: int, sent: Sent, received: int) -> None:
        if sent.accepted == messages == received and sent.error is None:
            return
        problem = f"run {run}: {received} of {messages} arrived"
        if sent.error is not None:
            problem += f", sending stopped after {sent.accepted} ({sent.error})"
        self.runs[name].append(problem)

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

    def throughput(name: str, port: int, count: Callable[[], int], clear: Callable[[], None]) -> _timing.Measurement:
        def measure() -> float:
            runs[name] += 1
            clear()
            with quiet():
                sent, seconds = _timing.timed(lambda: send(port, messages))
                received = arrived(count, messages)
            losses.record(name, runs[name], messages, sent, received)
            return sent.accepted / seconds

        return measure

    with quiet():
        layer.setUp()
        try:
            peer = Peer()
        except BaseException:
            layer.tearDown()
            raise
    try:
        outbox, envelopes = layer["outbox"], peer.handler.envelopes
        with quiet():
            for port in (layer["smtp_port"], peer.port):
                send(port, min(100, messages))  # warm up
        results = _timing.interleaved(
            {
                "ours": throughput("ours", layer["smtp_port"], lambda: len(outbox), outbox.clear),
                "peer": throughput("peer", peer.port, lambda: len(envelopes), envelopes.clear),
            },
            repeats,
        )
    finally:
        with quiet():
            peer.close()
            layer.tearDown()
    ours, peer_rate = _timing.median(results["ours"]), _timing.median(results["peer"])
    ratio = ours / peer_rate if peer_rate else float("inf")
    row = _timing.Row(
        measure=f"{messages} messages, one SMTP connection",
        ours=f"{ours:,.0f} msg/s",
        peer=f"{peer_rate:,.0f} msg/s",
        ratio=ratio,
        target=f">= {THROUGHPUT_TARGET_RATIO:g}x {PEER}",
        met=ratio >= THROUGHPUT_TARGET_RATIO and not losses.runs["ours"],
    )
    return row, losses.lines(messages, repeats)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=50, help="setUp+tearDown rounds per package (default 50)"
    )
    parser.add_argument(
        "--messages", type=int, default=500, help="messages per throughput run (default 500)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="throughput runs per package (default 5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 rounds, 2 runs of 100 messages"
    )
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.rounds, arguments.messages, arguments.repeats = 3, 100, 2
    for option in ("rounds", "messages", "repeats"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option} must be at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    _timing.print_environment(
        "SMTP layer: serverlayer vs a bare aiosmtpd Controller (medians, interleaved)",
        {
            "packages": (
                f"serverlayer {serverlayer.__version__},"
                f" aiosmtpd {importlib.metadata.version('aiosmtpd')}"
            ),
            "counts": (
                f"{arguments.rounds} setUp+tearDown rounds per package;"
                f" {arguments.repeats} x {arguments.messages} messages"
            ),
        },
    )
    quiet = _timing.OutputTrap()
    logged = LogTrap()
    load = _timing.MachineLoad()
    layer = serverlayer.smtp.Layer(name="BENCH_SMTP", host=HOST)
    with logged.installed(LOGGERS):
        rows = [bench_setup_teardown(layer, arguments.rounds, quiet)]
        throughput_row, notes = bench_throughput(layer, arguments.messages, arguments.repeats, quiet)
    rows.append(throughput_row)
    _timing.print_table(rows, peer=PEER)
    print()
    print("ratio: how many times better serverlayer does (shorter time, more messages/s)")
    for note in notes:
        print(note)
    _timing.print_machine_load(load)
    if quiet.text:
        print(f"suppressed {len(quiet.text)} characters the servers printed; first line:")
        print(f"  {quiet.text.splitlines()[0][:200]}")
    if logged.records:
        print(f"suppressed {len(logged.records)} log records of {', '.join(LOGGERS)}; first:")
        print(f"  {logged.first_line()[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
