"""Timing and reporting helpers shared by the benchmark scripts in this directory.

Every benchmark compares serverlayer with a peer package in one process.
To let machine noise hit both alike, the contenders run interleaved: each
round runs every contender once, and the order rotates from round to round.
Results go into ``Row``s, which ``table`` lays out with the target each
measure has and whether serverlayer meets it. ``options`` and ``report``
hold what every script's command line and ``main`` have in common, so that
a script only says what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import io
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

T = TypeVar("T")
#: Takes one measurement and returns it.
Measurement = Callable[[], float]


class Layer(Protocol):
    """What the measures need of a layer (or of a peer dressed as one)."""

    def setUp(self) -> None: ...

    def tearDown(self) -> None: ...


# Measuring.


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def medians(results: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each contender's median, from what ``interleaved`` returned."""
    return {name: median(values) for name, values in results.items()}


def timed(action: Callable[[], T]) -> tuple[T, float]:
    """What ``action`` returns, and the seconds it took by ``time.perf_counter``."""
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def elapsed(action: Callable[[], object]) -> float:
    """Seconds ``action`` takes."""
    return timed(action)[1]


def in_threads(work: Sequence[Callable[[], object]]) -> float:
    """Run every callable on a thread of its own, all released at once;
    the seconds until the last ended. Raises what the first one that failed raised."""
    barrier = threading.Barrier(len(work) + 1)
    errors: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        try:
            barrier.wait(10)
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in work]
    for thread in threads:
        thread.start()
    barrier.wait(10)
    start = time.perf_counter()
    for thread in threads:
        thread.join(60)
    seconds = time.perf_counter() - start
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("a client thread did not finish within 60 s")
    if errors:
        raise errors[0]
    return seconds


def spread(rounds: int, taken: int) -> set[int]:
    """``taken`` of ``rounds`` round numbers, evenly spread, the first included."""
    taken = min(taken, rounds)
    return {number * rounds // taken for number in range(taken)}


def interleaved(
    contenders: Mapping[str, Measurement], rounds: int, fewer: Mapping[str, int] | None = None
) -> dict[str, list[float]]:
    """Call every contender's measurement once per round, rotating the order.

    A contender named in ``fewer`` takes part in only that many of the
    rounds, spread evenly: one that is slow to measure then does not make
    the whole run slow. Returns each contender's results, in the order they
    were taken.
    """
    names = list(contenders)
    taking = {name: spread(rounds, (fewer or {}).get(name, rounds)) for name in names}
    results: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        present = [name for name in names if number in taking[name]]
        shift = number % len(present)
        for name in present[shift:] + present[:shift]:
            results[name].append(contenders[name]())
    return results


class OutputTrap:
    """Swallows what the code under measurement prints, and counts it.

    ``sys.stdout`` and ``sys.stderr`` are process-wide, so this also catches
    what server threads print while the trap is set.
    """

    def __init__(self) -> None:
        self._captured = io.StringIO()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with contextlib.redirect_stdout(self._captured), contextlib.redirect_stderr(self._captured):
            yield

    @property
    def text(self) -> str:
        return self._captured.getvalue()


def lifecycle(layer: Layer, quiet: OutputTrap) -> Measurement:
    """A measurement of one ``setUp`` + ``tearDown`` of ``layer``, in milliseconds."""

    def measure() -> float:
        def set_up_and_tear_down() -> None:
            layer.setUp()
            layer.tearDown()

        with quiet():
            return elapsed(set_up_and_tear_down) * 1000

    return measure


def lifecycle_medians(layers: Mapping[str, Layer], rounds: int, quiet: OutputTrap) -> dict[str, float]:
    """Median milliseconds of ``rounds`` interleaved ``setUp`` + ``tearDown`` of each layer."""
    return medians(interleaved({name: lifecycle(layer, quiet) for name, layer in layers.items()}, rounds))


@contextlib.contextmanager
def all_set_up(quiet: OutputTrap, layers: Sequence[Layer]) -> Iterator[None]:
    """Set up every layer in turn, then tear down in reverse order, also
    when a later ``setUp`` or the work in between fails: a layer left set up
    would keep its server running after the script ends."""
    with contextlib.ExitStack() as stack:
        for layer in layers:
            with quiet():
                layer.setUp()
            stack.callback(_quietly, quiet, layer.tearDown)
        yield


def _quietly(quiet: OutputTrap, action: Callable[[], object]) -> None:
    with quiet():
        action()


def rate_medians(
    layers: Mapping[str, Layer],
    run: Callable[[str, Any], float],
    repeats: int,
    quiet: OutputTrap,
    warm_up: Callable[[Any], object],
) -> dict[str, float]:
    """Set up every layer, warm each up once, then take ``repeats`` interleaved
    ``run(name, layer)`` of each; the medians of what the runs returned.

    The layers stay set up for all the runs, so that set-up is not part of
    a rate; the warm-up keeps first-use costs out of the first run.
    """
    with all_set_up(quiet, list(layers.values())):
        with quiet():
            for layer in layers.values():
                warm_up(layer)
        results = interleaved({name: functools.partial(run, name, layer) for name, layer in layers.items()}, repeats)
    return medians(results)


class MachineLoad:
    """How busy other processes kept the CPUs since this was created.

    On a shared machine they inflate absolute times; interleaving keeps the
    ratios fair, not the times. Reads ``/proc/stat``, so Linux only. The CPU
    time of the child processes a script waited for (``bench_peers``' memory
    processes) counts as its own, not as other processes'.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """CPU seconds so far: all CPUs' capacity, their busy time, ours."""
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                ticks = [int(field) for field in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        per_second = os.sysconf("SC_CLK_TCK")
        idle = ticks[3] + ticks[4]  # idle, iowait
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        return sum(ticks) / per_second, (sum(ticks) - idle) / per_second, ours

    def others_percent(self) -> float | None:
        """Percent of all CPUs' time that other processes used, if known."""
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        capacity, busy, ours = (now - then for now, then in zip(end, self._start, strict=True))
        return max(0.0, (busy - ours) / capacity * 100)


class LogTrap(logging.Handler):
    """Keeps what the servers log off the terminal, and counts it.

    Without a handler of their own, warnings logged from a server thread
    would reach logging's last resort, which prints to stderr at that
    moment, whether or not an ``OutputTrap`` is set. The loggers keep their
    levels, so the servers do no more logging work than they would in a
    test run. Only the first record is kept: werkzeug logs every request.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.first: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = record

    @contextlib.contextmanager
    def installed(self, names: Sequence[str]) -> Iterator[None]:
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
        record = self.first
        if record is None:
            return ""
        return f"{record.name} {record.levelname}: {record.getMessage()}".splitlines()[0]


# The command line.


@dataclass(frozen=True)
class Count:
    """A whole-number option: ``--name``, its default and its ``--quick`` value."""

    name: str
    default: int
    quick: int
    #: What it counts; the default is added.
    help: str


def options(
    doc: str,
    counts: Sequence[Count],
    quick: str,
    argv: list[str] | None,
    more: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """Parse the ``counts`` options and ``--quick`` (described by ``quick``),
    each count at least 1, and whatever options ``more`` adds to the parser.
    The script's docstring's first paragraph is the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for count in counts:
        parser.add_argument(
            f"--{count.name}", type=int, default=count.default, help=f"{count.help} (default {count.default})"
        )
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    if more is not None:
        more(parser)
    arguments = parser.parse_args(argv)
    for count in counts:
        dest = count.name.replace("-", "_")
        if arguments.quick:
            setattr(arguments, dest, count.quick)
        if getattr(arguments, dest) < 1:
            parser.error(f"--{count.name} must be at least 1")
    return arguments


def missing_extras(script: str, error: ImportError) -> NoReturn:
    """End ``script`` saying how to install what it needs: the peers are no
    dependency of serverlayer itself."""
    sys.exit(
        f"{script}: {error}\n"
        "Install serverlayer with its benchmark extras from the checkout:"
        " pip install -e '.[bench]'"
    )


# The report.


@dataclass(frozen=True)
class Row:
    """One measure: serverlayer's and the peer's medians, and the target.

    A measure without a peer or without a target has ``ratio`` or ``met``
    None; the table shows ``-`` for them.
    """

    measure: str
    ours: str
    peer: str
    #: How many times better serverlayer does than the peer (> 1 is better).
    ratio: float | None
    target: str
    met: bool | None


def lifecycle_row(measure: str, ours: float, peer: float, *, ratio: float, target_ms: float) -> Row:
    """A row of milliseconds with an absolute target for ``ours``."""
    return Row(measure, f"{ours:.2f} ms", f"{peer:.2f} ms", ratio, f"<= {target_ms:g} ms", ours <= target_ms)


def rate_row(
    measure: str, ours: float, peer: float, unit: str, *, ratio: float, target: str = "-", met: bool | None = None
) -> Row:
    """A row of things per second (``unit``, such as ``req/s``)."""
    return Row(measure, f"{ours:,.0f} {unit}", f"{peer:,.0f} {unit}", ratio, target, met)


def versions(*names: str) -> str:
    """serverlayer's version, then those of the installed distributions ``names``."""
    import serverlayer  # here: each script reports a missing serverlayer itself

    found = [f"{name} {importlib.metadata.version(name)}" for name in names]
    return ", ".join([f"serverlayer {serverlayer.__version__}", *found])


def print_environment(title: str, details: Mapping[str, str]) -> None:
    """Print what a reader needs to judge the numbers: when, where, what."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 0
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(title)
    print(f"  date:     {now}")
    python = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"  python:   {python} ({sys.executable})")
    print(f"  machine:  nproc={cpus}, {platform.machine()}, {platform.platform()}")
    for key, value in details.items():
        print(f"  {key + ':':<9} {value}")
    print()


def columns(lines: Sequence[Sequence[str]], right_aligned: set[int]) -> list[str]:
    """Lay out a header and its lines in columns, a rule below the header."""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]

    def format_line(line: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [format_line(lines[0]), "  ".join("-" * width for width in widths), *map(format_line, lines[1:])]


def table(rows: Sequence[Row], *, peer: str, ours: str = "serverlayer") -> list[str]:
    """Lay ``rows`` out; ``ours`` and ``peer`` head the two columns of medians."""
    header = ("measure", ours, peer, "ratio", "target", "met")
    lines = [header] + [
        (
            row.measure,
            row.ours,
            row.peer,
            # Two decimals, so that a ratio just below its target does not
            # print as the target itself.
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            row.target,
            "-" if row.met is None else "yes" if row.met else "NO",
        )
        for row in rows
    ]
    return columns(lines, right_aligned={1, 2, 3})


@dataclass
class Findings:
    """What a run found: the table's lines, and the notes that go below it."""

    table: list[str]
    notes: list[str]


def report(
    title: str,
    details: Mapping[str, str],
    measure: Callable[[OutputTrap], Findings],
    legend: Sequence[str],
    *,
    printed_by: str = "layers",
    loggers: Sequence[str] = (),
) -> int:
    """What every script's ``main`` does around its measures: print the
    header, run ``measure`` with what the servers print and log to
    ``loggers`` trapped, then print the table, the ``legend``, the notes,
    the machine's load and how much was trapped.

    Returns the exit status: 0, met targets or not, since this is a report
    and not a test.
    """
    print_environment(title, details)
    quiet, logged, load = OutputTrap(), LogTrap(), MachineLoad()
    with logged.installed(loggers):
        findings = measure(quiet)
    for line in findings.table:
        print(line)
    print()
    for line in [*legend, *findings.notes]:
        print(line)
    percent = load.others_percent()
    if percent is not None:
        print(f"other processes kept the CPUs {percent:.0f}% busy during the run", end="")
        print(": absolute times are inflated; the interleaved ratios less so" if percent >= 10 else "")
    if quiet.text:
        print(f"suppressed {len(quiet.text)} characters the {printed_by} printed; first line:")
        print(f"  {quiet.text.splitlines()[0][:200]}")
    if logged.count:
        print(f"suppressed {logged.count} log records of {', '.join(loggers)}; first:")
        print(f"  {logged.first_line()[:200]}")
    return 0
