"""Timing helpers shared by the benchmark scripts in this directory.

Every benchmark compares serverlayer with a peer package in one process.
To let machine noise hit both alike, the contenders run interleaved: each
round runs every contender once, and the order rotates from round to round.
Results go into ``Row``s, which ``print_table`` lays out with the target
each measure has and whether serverlayer meets it.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
#: Takes one measurement and returns it.
Measurement = Callable[[], float]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(action: Callable[[], T]) -> tuple[T, float]:
    """What ``action`` returns, and the seconds it took by ``time.perf_counter``."""
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def elapsed(action: Callable[[], object]) -> float:
    """Seconds ``action`` takes."""
    return timed(action)[1]


def interleaved(contenders: Mapping[str, Measurement], rounds: int) -> dict[str, list[float]]:
    """Call every contender's measurement once per round, rotating the order.

    Returns each contender's ``rounds`` results, in the order they were taken.
    """
    names = list(contenders)
    results: dict[str, list[float]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
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


class MachineLoad:
    """How busy other processes kept the CPUs since this was created.

    On a shared machine they inflate absolute times; interleaving keeps the
    ratios fair, not the times. Reads ``/proc/stat``, so Linux only.
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
        return sum(ticks) / per_second, (sum(ticks) - idle) / per_second, times.user + times.system

    def others_percent(self) -> float | None:
        """Percent of all CPUs' time that other processes used, if known."""
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        capacity, busy, ours = (now - then for now, then in zip(end, self._start, strict=True))
        return max(0.0, (busy - ours) / capacity * 100)


def print_machine_load(load: MachineLoad) -> None:
    percent = load.others_percent()
    if percent is None:
        return
    print(f"other processes kept the CPUs {percent:.0f}% busy during the run", end="")
    if percent >= 10:
        print(": absolute times are inflated; the interleaved ratios less so")
    else:
        print()


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


def print_table(rows: Sequence[Row], *, peer: str, ours: str = "serverlayer") -> None:
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
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    right_aligned = {1, 2, 3}

    def format_line(line: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    print(format_line(header))
    print("  ".join("-" * width for width in widths))
    for line in lines[1:]:
        print(format_line(line))
