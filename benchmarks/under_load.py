"""Run the whole test suite several times while busy processes hog the CPUs.

A test that passes on an idle machine can still measure the machine rather
than the code: a duration bound too tight for a loaded CPU, or a thread
snapshot taken before a thread an earlier test abandoned has had the CPU
to finish. Such tests fail on a busy CI runner and teach people to rerun
failures. This script makes the machine busy on purpose (``--busy``
pure-Python loops in subprocesses, more than there are cores) and runs the
suite ``--runs`` times in a row, so that those tests show themselves here
first. One line per run, then a summary; exit status 0 only if every run
passed::

    PYTHONPATH=src python benchmarks/under_load.py
    PYTHONPATH=src python benchmarks/under_load.py --busy 4 --runs 2 -- -t test_custom

A run counts as failed if the test runner exits non-zero or reports that a
test left new threads behind (the suite is meant to run clean).

The busy loops stop themselves after ``--busy-seconds`` and when this
script's process goes away, and are killed in a ``finally`` block, so none
outlives the script, whether it ends normally, by an exception or by Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Spins until its deadline, or until its parent (this script) is gone, so
#: that even a SIGKILLed script leaves no loop behind for long.
BUSY_LOOP = """\
import os, sys, time
parent = os.getppid()
deadline = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < deadline:
    n += 1
    if n % 100000 == 0 and os.getppid() != parent:
        break
"""

TOTAL = re.compile(r"^Total: (\d+) tests, (\d+) failures, (\d+) errors")
RAN = re.compile(r"^\s*Ran (\d+) tests with (\d+) failures, (\d+) errors")
FAILED_TEST = re.compile(r"^(?:Failure|Error) in test (.+?)\s*$")
SECTION = re.compile(r"^Tests with (?:errors|failures):\s*$")
LEFT_THREADS = "The following test left new threads behind:"


@dataclass
class Run:
    """What one run of the suite came to."""

    returncode: int
    seconds: float
    tests: int | None
    failing: list[str] = field(default_factory=list)
    left_threads: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.failing and not self.left_threads

    def line(self, number: int) -> str:
        tests = "?" if self.tests is None else str(self.tests)
        text = (
            f"run {number}: {'passed' if self.passed else 'FAILED'}, "
            f"{tests} tests, {self.seconds:.1f} s"
        )
        if self.returncode == -1:
            text += ", killed: took too long"
        elif self.returncode and not self.failing:
            text += f", exit status {self.returncode}"
        if self.failing:
            text += ", failing: " + ", ".join(self.failing)
        if self.left_threads:
            text += ", left threads behind: " + ", ".join(self.left_threads)
        return text


def parse(output: str, returncode: int, seconds: float) -> Run:
    """Read the test count and the failing tests from the runner's output."""
    run = Run(returncode, seconds, None)
    failing: dict[str, None] = {}
    ran = 0
    in_section = False
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if total := TOTAL.match(line):
            run.tests = int(total.group(1))
        elif ran_match := RAN.match(line):
            ran += int(ran_match.group(1))
        if found := FAILED_TEST.match(line):
            failing[found.group(1)] = None
        if SECTION.match(line):
            in_section = True
        elif in_section and line.startswith("   "):
            failing[line.strip()] = None
        else:
            in_section = False
        if line.strip() == LEFT_THREADS and index + 1 < len(lines):
            run.left_threads.append(lines[index + 1].strip())
    if run.tests is None and ran:
        run.tests = ran
    run.failing = list(failing)
    return run


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill a process started in its own session, and everything it started."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@contextmanager
def busy(count: int, seconds: float) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Keep ``count`` CPU-bound processes running for the duration."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", BUSY_LOOP, str(seconds)],
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        yield processes
    finally:
        for process in processes:
            stop(process)


def run_suite(extra: Sequence[str], timeout: float, log: Path | None) -> Run:
    """Run the whole suite once, as the project's full run does.

    The runner writes to a file rather than a pipe, so that a run killed
    for taking too long still tells which tests failed before, and so that
    ``log`` can be followed while the run goes on.
    """
    command = [
        sys.executable, "-W", "error", "-m", "zope.testrunner",
        f"--test-path={REPO / 'src'}", "-j2", *extra,
    ]
    started = time.monotonic()
    with (open(log, "w+b") if log else tempfile.TemporaryFile()) as output:
        # Its own session, so that a timeout or Ctrl-C can kill the
        # runner's worker subprocesses too.
        process = subprocess.Popen(
            command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = -1
            output.write(f"\n(under_load.py: killed after {timeout:.0f} s)\n".encode())
        finally:
            stop(process)
        output.seek(0)
        text = output.read().decode(errors="replace")
    return parse(text, returncode, time.monotonic() - started)


def arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        epilog="Arguments after -- go to zope.testrunner.",
    )
    parser.add_argument("--busy", type=int, default=8, metavar="N",
                        help="busy-loop processes (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5, metavar="R",
                        help="runs of the suite (default: %(default)s)")
    parser.add_argument("--stop-on-failure", action="store_true",
                        help="stop after the first failing run")
    parser.add_argument("--run-timeout", type=float, default=2400.0, metavar="S",
                        help="kill a run after S seconds (default: %(default)s)")
    parser.add_argument("--save-output", type=Path, metavar="DIR",
                        help="write each run's output to DIR/run-N.txt as it goes")
    own, extra = list(argv), []
    if "--" in own:
        at = own.index("--")
        own, extra = own[:at], own[at + 1:]
    options = parser.parse_args(own)
    options.extra = extra
    return options


def interrupted(signum: int, frame: object) -> None:
    """Turn SIGTERM and SIGHUP into an exception, so the ``finally`` blocks run."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str]) -> int:
    options = arguments(argv)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    # Long enough for every run to time out, and no longer.
    busy_seconds = options.runs * options.run_timeout + 60
    runs: list[Run] = []
    print(
        f"{options.busy} busy processes on {os.cpu_count()} CPUs, "
        f"{options.runs} runs of {sys.executable} -m zope.testrunner in {REPO}",
        flush=True,
    )
    started = time.monotonic()
    with busy(options.busy, busy_seconds):
        for number in range(1, options.runs + 1):
            log = None
            if options.save_output:
                options.save_output.mkdir(parents=True, exist_ok=True)
                log = options.save_output / f"run-{number}.txt"
            run = run_suite(options.extra, options.run_timeout, log)
            runs.append(run)
            print(run.line(number), flush=True)
            if not run.passed and options.stop_on_failure:
                break
    failed = [n for n, run in enumerate(runs, 1) if not run.passed]
    print(
        f"summary: {len(runs) - len(failed)} of {len(runs)} runs passed"
        + (f" (failed: {', '.join(map(str, failed))})" if failed else "")
        + f", {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as interruption:
        print(f"interrupted {interruption}; busy processes and runner stopped", file=sys.stderr)
        sys.exit(130)
