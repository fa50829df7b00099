"""Mutation testing of serverlayer's core modules, with cosmic-ray.

A suite that passes proves little unless it fails when the code is wrong.
This plants one small bug at a time (a mutant: ``<`` for ``<=``, ``not``
added, a number changed) in a module, runs the tests that exercise it, and
counts the mutants the tests catch ("killed") and those they miss
("survived")::

    tox -e mutation                      # every core module: hours
    tox -e mutation -- reporting tls     # some of them

or, in a virtualenv with serverlayer's test extra and cosmic-ray, ``python
mutation/run.py reporting``. Each module is mutated in a copy of the
checkout (cosmic-ray edits files in place), so the checkout stays as it is
even when a run is interrupted.

Mutants that cannot change what the program does are not counted: those
inside annotations (every module has ``from __future__ import
annotations``, so they are never evaluated), those listed with a reason in
``equivalent.txt``, and all but the nearest replacement of an arithmetic or
bitwise operator (``+`` becomes ``-`` but not also ``%``, ``**``, ``<<`` and
eight more: they test the same line again).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

REPOSITORY = Path(__file__).resolve().parent.parent
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.txt"

#: The tests that exercise each core module, run for each of its mutants:
#: test modules, or one class of a module (``test_module.Class``).
MODULES: dict[str, tuple[str, ...]] = {
    "reporting": ("test_reporting",),
    "tls": ("test_tls", "test_tls_front", "test_lifecycle.ServerThreadTests", "test_mutual_tls"),
    "recording": ("test_recording", "test_chunked_uploads", "test_mutual_tls", "test_content_matching"),
    "static": ("test_static", "test_static_symlinks", "test_static_ranges"),
    "ranges": ("test_static_ranges",),
    "server": ("test_lifecycle", "test_addresses", "test_serving", "test_tls_front", "test_mutual_tls", "test_waiting"),
    "layer": (
        "test_lifecycle", "test_unnamed_layers", "test_addresses", "test_gocept_api",
        "test_hardening.LateServerErrorTests", "test_custom.HandlerValidationTests", "test_reporting",
        "test_mutual_tls", "test_content_holding.ContextManagerTests",
    ),
    "smtp": (
        "test_smtp", "test_tls.SMTPTLSTests", "test_hardening.SMTPHardeningTests",
        "test_hardening.MisbehavingSMTPClientTests", "test_integrations.MailSinkTests",
        "test_addresses.EveryAddressTests", "test_smtp_failures",
    ),
    "smtp_failures": ("test_smtp_failures",),
    "content": (
        "test_content", "test_content_protocol", "test_content_streaming", "test_content_websocket",
        "test_content_matching", "test_content_holding",
    ),
    "matching": ("test_content_matching", "test_content_websocket"),
    "websocket_script": ("test_content_websocket",),
    "asgi": ("test_asgi", "test_waiting.BusyTasksWaitTests"),
}

#: For ``ReplaceBinaryOperator_<from>_<to>``: the one replacement kept per operator.
NEAREST = {
    "Add": "Sub", "Sub": "Add", "Mul": "Div", "Div": "Mul", "FloorDiv": "Div", "Mod": "FloorDiv",
    "Pow": "Mul", "LShift": "RShift", "RShift": "LShift", "BitOr": "BitAnd", "BitAnd": "BitOr",
    "BitXor": "BitOr",
}


@dataclass(frozen=True)
class Equivalent:
    """A mutant that cannot change behaviour, as ``equivalent.txt`` lists it."""

    module: str
    line: int
    operator: str
    #: Which of the operator's mutants in the module (cosmic-ray's
    #: ``occurrence``), for a line where only some of them are equivalent.
    occurrence: int | None
    reason: str


def read_equivalents(path: Path = EQUIVALENT) -> list[Equivalent]:
    """``module:line operator[#occurrence]  reason`` lines; a line that
    starts with ``#`` is a comment."""
    equivalents = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            where, operator, reason = text.split(None, 2)
            module, line = where.split(":")
            operator, _, occurrence = operator.partition("#")
            equivalents.append(
                Equivalent(module, int(line), operator, int(occurrence) if occurrence else None, reason)
            )
        except ValueError:
            raise SystemExit(
                f"{path}:{number}: expected 'module:line operator[#occurrence] reason', e.g."
                f" 'reporting:42 core/AddNot the value is never read', got {text!r}"
            ) from None
    return equivalents


def in_annotation(source: str, start: tuple[int, int], end: tuple[int, int]) -> bool:
    """Whether the source between ``start`` and ``end`` lies inside an annotation."""
    spans: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for node in ast.walk(ast.parse(source)):
        annotation = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotation = node.returns
        elif isinstance(node, (ast.arg, ast.AnnAssign)):
            annotation = node.annotation
        if annotation is not None:
            last_line = annotation.end_lineno or annotation.lineno
            spans.append(((annotation.lineno, annotation.col_offset), (last_line, annotation.end_col_offset or 0)))
    return any(low <= start and end <= high for low, high in spans)


def is_keyword_only_marker(source: str, start: tuple[int, int]) -> bool:
    """Whether the ``*`` at ``start`` is a parameter list's bare ``*``, which
    cosmic-ray mutates as if it were a multiplication."""
    line = source.splitlines()[start[0] - 1]
    rest = line[start[1] + 1 :].strip()
    return line[start[1] : start[1] + 1] == "*" and (not rest or rest[0] in ",)")


def why_not_counted(
    module: str, source: str, operator: str, occurrence: int, start: tuple[int, int], end: tuple[int, int],
    equivalents: Iterable[Equivalent],
) -> str | None:
    """Why a mutant is not counted, or None when it is."""
    name = operator.split("/", 1)[-1]
    if name.startswith("ReplaceBinaryOperator_Mul_") and is_keyword_only_marker(source, start):
        return "the * that makes the parameters after it keyword-only, not an operator"
    if name.startswith("ReplaceBinaryOperator_"):
        _, old, new = name.split("_")
        if NEAREST.get(old) != new:
            return f"not the nearest replacement of {old} ({NEAREST.get(old)})"
    if in_annotation(source, start, end):
        return "inside an annotation, which is never evaluated"
    for equivalent in equivalents:
        if (equivalent.module, equivalent.line, equivalent.operator) == (module, start[0], operator) and (
            equivalent.occurrence in (None, occurrence)
        ):
            return equivalent.reason
    return None


def copy_checkout(target: Path) -> None:
    shutil.copytree(
        REPOSITORY, target,
        ignore=shutil.ignore_patterns(".git", ".tox", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                      "parts", "eggs", "bin", "develop-eggs", "mutation-work"),
    )


def test_command(tests: Iterable[str], copy: Path) -> list[str]:
    """A script that runs the tests in a scratch directory made afresh each
    time (a mutant of the static layer can delete the directory it runs in)."""
    scratch = shlex.quote(str(copy.parent / f"{copy.name}-scratch"))
    script = copy.parent / f"{copy.name}-tests.sh"
    script.write_text(f"mkdir -p {scratch} && cd {scratch} && exec {shlex.join(runner_command(tests, copy / 'src'))}\n")
    return ["sh", str(script)]


def runner_command(tests: Iterable[str], source: Path) -> list[str]:
    modules, selected = [], []
    for test in tests:
        module, _, test_class = test.partition(".")
        modules += ["-m", f"^serverlayer\\.tests\\.{module}$"]
        # zope.testrunner matches -t against "test_x (module.Class.test_x)"
        # (Python 3.10: "test_x (module.Class)").
        selected += ["-t", f"\\(serverlayer\\.tests\\.{module}\\.{test_class + '[.)]' if test_class else ''}"]
    # --stop-on-error: the first failure kills the mutant; the rest of the
    # tests would only take time.
    runner = [sys.executable, "-W", "error", "-m", "zope.testrunner", f"--test-path={source}", "--stop-on-error"]
    return [*runner, *modules, *selected]


@dataclass
class Score:
    module: str
    killed: int
    survived: int
    not_counted: int
    survivors: list[str]

    @property
    def percent(self) -> float:
        counted = self.killed + self.survived
        return 100.0 * self.killed / counted if counted else 100.0


def mutate(module: str, work: Path, equivalents: list[Equivalent], *, again: bool = False) -> Score:
    """Run every counted mutant of ``module`` in a copy of the checkout under ``work``.

    With ``again``, reuse the session a run kept there: only the mutants
    that survived it run again, against the checkout's tests as they are now.
    """
    copy = work / module
    session = copy / "session.sqlite"
    kept = copy.parent / f"{module}.session.sqlite"
    if again:
        if not session.exists():
            raise SystemExit(f"{module}: no session in {copy} to run again; run it first with --keep {work}")
        shutil.move(session, kept)
    shutil.rmtree(copy, ignore_errors=True)
    copy_checkout(copy)
    command = test_command(MODULES[module], copy)
    environment = {**os.environ, "PYTHONPATH": str(copy / "src")}
    environment.pop("SERVERLAYER_VERBOSE", None)
    started = time.monotonic()
    baseline = subprocess.run(command, cwd=copy, env=environment, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if baseline.returncode:
        raise SystemExit(f"{module}: the tests fail without any mutant:\n{baseline.stdout}{baseline.stderr}")
    config = copy / "cosmic-ray.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "src/serverlayer/{module}.py"\n'
        # A mutant may make the tests hang (a loop that never ends, a stop
        # that waits for ever): that counts as caught. Four times the
        # unmutated run's time is plenty; every hanging mutant costs it.
        f"timeout = {max(30.0, 4 * seconds):.0f}\n"
        "excluded-modules = []\n"
        f"test-command = {subprocess.list2cmdline(command)!r}\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    cosmic_ray = [sys.executable, "-m", "cosmic_ray.cli"]
    killed: set[str] = set()
    if again:
        shutil.move(kept, session)
        killed = killed_before(session)
        forget_survivors(session)
    else:
        subprocess.run([*cosmic_ray, "init", str(config), str(session)], cwd=copy, env=environment, check=True)
    source = (copy / "src" / "serverlayer" / f"{module}.py").read_text()
    not_counted = 0
    used: set[str] = set()
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in db.work_items:
            [mutation] = item.mutations
            reason = why_not_counted(
                module, source, mutation.operator_name, mutation.occurrence, tuple(mutation.start_pos),
                tuple(mutation.end_pos), equivalents,
            )
            if reason is not None and item.job_id in killed:
                used.add(reason)
                print(f"{EQUIVALENT.name}: {module}:{mutation.start_pos[0]} {mutation.operator_name}"
                      f"#{mutation.occurrence} is listed as equivalent, but the tests killed it: give the"
                      " line the occurrence it means, or remove it", flush=True)
                continue
            if reason is not None:
                used.add(reason)
                not_counted += 1
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=reason))
        for equivalent in equivalents:
            if equivalent.module == module and equivalent.reason not in used:
                print(f"{EQUIVALENT.name}: no mutant of {module}:{equivalent.line} {equivalent.operator}"
                      " any more; remove the line or correct it", flush=True)
        pending = sum(1 for _ in db.pending_work_items)
        print(f"{module}: {pending} mutants to run ({not_counted} not counted,"
              f" {db.num_work_items - not_counted - pending} run before), {seconds:.1f} s of tests each", flush=True)
    subprocess.run([*cosmic_ray, "exec", str(config), str(session)], cwd=copy, env=environment, check=True)
    return score(module, session, not_counted)


def killed_before(session: Path) -> set[str]:
    """The job ids of the mutants the tests killed in ``session``."""
    with contextlib.closing(sqlite3.connect(session)) as database:
        query = "SELECT job_id FROM work_results WHERE test_outcome = ?"
        return {job_id for (job_id,) in database.execute(query, (TestOutcome.KILLED.name,))}


def forget_survivors(session: Path) -> None:
    """Make the mutants that survived in ``session`` pending again (cosmic-ray
    runs the pending ones), and those that were not counted: they may count now."""
    with contextlib.closing(sqlite3.connect(session)) as database, database:
        database.execute(
            "DELETE FROM work_results WHERE test_outcome = ? OR worker_outcome = ?",
            (TestOutcome.SURVIVED.name, WorkerOutcome.SKIPPED.name),  # stored by name
        )


def score(module: str, session: Path, not_counted: int) -> Score:
    outcomes: Counter[str] = Counter()
    survivors = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            [mutation] = item.mutations
            # A mutant that breaks the import or hangs the tests is caught too.
            caught = result.test_outcome != TestOutcome.SURVIVED
            outcomes["killed" if caught else "survived"] += 1
            if not caught:
                survivors.append(
                    f"{module}.py:{mutation.start_pos[0]} {mutation.operator_name}"
                    f" #{mutation.occurrence}\n{result.diff}"
                )
    return Score(module, outcomes["killed"], outcomes["survived"], not_counted, survivors)


def report(scores: Iterable[Score]) -> Iterator[str]:
    yield f"{'module':<12} {'killed':>6} {'survived':>8} {'score':>6} {'not counted':>11}"
    for item in scores:
        yield f"{item.module:<12} {item.killed:>6} {item.survived:>8} {item.percent:>5.1f}% {item.not_counted:>11}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"the modules to mutate, of: {', '.join(MODULES)} (default all)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR and keep it (default: a temporary directory)")
    parser.add_argument("--survivors-again", action="store_true",
                        help="with --keep: run only the mutants that survived the run kept in DIR again,"
                             " against the tests as they are now")
    arguments = parser.parse_args(argv)
    if arguments.survivors_again and not arguments.keep:
        parser.error("--survivors-again needs --keep DIR, the directory of the run to take the survivors from")
    unknown = sorted(set(arguments.modules) - set(MODULES))
    if unknown:
        parser.error(f"no such core module: {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    equivalents = read_equivalents()
    scores = []
    with contextlib.ExitStack() as stack:
        if arguments.keep:
            arguments.keep.mkdir(parents=True, exist_ok=True)
            work = arguments.keep.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serverlayer-mutation-")))
        for module in arguments.modules or MODULES:
            scores.append(mutate(module, work, equivalents, again=arguments.survivors_again))
    for item in scores:
        for survivor in item.survivors:
            print(f"\nSURVIVED {survivor}")
    print()
    for line in report(scores):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
