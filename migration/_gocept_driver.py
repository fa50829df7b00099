"""Runs gocept.httpserverlayer's tests with its modules resolved to serverlayer's.

Started by ``run_gocept_suite.py`` in a subprocess of its own; not meant to
be run by hand. It reads its settings from the environment (so that
zope.testrunner can start it again for a layer that cannot be torn down):

- ``GOCEPT_SUITE_ROOT``: the directory holding the ``gocept`` tree whose
  implementation modules are shims;
- ``GOCEPT_SUITE_SERVERLAYER``: the ``src`` directory of the serverlayer to
  test (put first on ``sys.path``);
- ``GOCEPT_SUITE_RESULTS``: where to write every test's outcome as JSON;
- ``GOCEPT_SUITE_API``: gocept's public names and positional parameters,
  checked against serverlayer's (as ``api: ...`` results).

Its command-line arguments are zope.testrunner's.
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import traceback
from typing import Any


def _alias_gocept(root: str) -> None:
    """Make ``gocept.httpserverlayer`` the copy under ``root``.

    ``gocept`` is a namespace package: other gocept distributions in the
    environment (gocept.selenium, an installed gocept.httpserverlayer) may
    have created it at start-up, from a ``-nspkg.pth`` file. Ours comes
    first in its path; the others stay importable behind it.
    """
    ours = os.path.join(root, "gocept")
    sys.path.insert(0, root)
    for name in list(sys.modules):
        if name == "gocept.httpserverlayer" or name.startswith("gocept.httpserverlayer."):
            del sys.modules[name]
    namespace = sys.modules.get("gocept")
    if namespace is not None:
        namespace.__path__ = [ours] + [path for path in list(namespace.__path__) if path != ours]
    import importlib

    package = importlib.import_module("gocept.httpserverlayer")
    where = os.path.dirname(os.path.abspath(str(package.__file__)))
    if where != os.path.join(ours, "httpserverlayer"):
        raise SystemExit(f"gocept.httpserverlayer resolves to {where}, not to the copy under {root}")


def _test_ids(suite: Any) -> list[str]:
    ids = []
    stack = [suite]
    while stack:
        item = stack.pop()
        if hasattr(item, "__iter__") and not hasattr(item, "_testMethodName"):
            stack.extend(reversed(list(item)))
        elif item is not None:
            ids.append(item.id())
    return ids


def check_api(api: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Whether serverlayer has each of gocept's public names, and takes its positional arguments."""
    import importlib
    import tempfile

    import plone.testing

    outcomes: dict[str, dict[str, str]] = {}

    def record(test_id: str, problem: str | None) -> None:
        outcomes[test_id] = {"outcome": "failed", "detail": problem} if problem else {"outcome": "passed", "detail": ""}

    modules = {}
    for module, names in api["names"].items():
        if module in api["skip"]:
            continue
        try:
            modules[module] = importlib.import_module(f"gocept.httpserverlayer.{module}")
        except Exception:
            for name in names:
                record(f"api: gocept.httpserverlayer.{module}.{'.'.join(name)}", traceback.format_exc())
            continue
        for name in names:
            target: Any = modules[module]
            missing = None
            for part in name:
                if not hasattr(target, part):
                    missing = f"serverlayer.{module} has no {'.'.join(name)}"
                    break
                target = getattr(target, part)
            record(f"api: gocept.httpserverlayer.{module}.{'.'.join(name)}", missing)

    class Handler(http.server.BaseHTTPRequestHandler):
        pass

    for number, (dotted, parameters) in enumerate(api["positional"].items()):
        module, class_name = dotted.split(".")
        test_id = f"api: gocept.httpserverlayer.{dotted}({', '.join(parameters)})"
        if module not in modules:
            continue
        base = plone.testing.Layer(name=f"GOCEPT_SUITE_BASE_{number}", module="gocept_suite_probe")
        with tempfile.TemporaryDirectory() as directory:
            values = {
                "request_handler": Handler,
                "documentroot": directory,
                "bases": (base,),
                "name": f"GOCEPT_SUITE_{module.upper()}_{number}",
                "module": "gocept_suite_probe",
            }
            try:
                layer = getattr(modules[module], class_name)(*(values[parameter] for parameter in parameters))
            except Exception:
                record(test_id, traceback.format_exc())
                continue
            seen = {
                "bases": layer.__bases__,
                "name": layer.__name__,
                "module": layer.__module__,
                "request_handler": getattr(layer, "request_handler", None),
                "documentroot": getattr(layer, "documentroot", None),
            }
            wrong = [
                f"{parameter}: passed {values[parameter]!r}, the layer has {seen[parameter]!r}"
                for parameter in parameters
                if seen[parameter] != values[parameter]
            ]
            record(test_id, "AssertionError: " + "; ".join(wrong) if wrong else None)
    return outcomes


def main() -> int:
    root = os.environ["GOCEPT_SUITE_ROOT"]
    sys.path.insert(0, os.environ["GOCEPT_SUITE_SERVERLAYER"])
    _alias_gocept(root)

    import zope.testrunner.runner
    from zope.testrunner.find import StartUpFailure
    from zope.testrunner.runner import SetUpLayerFailure, TearDownLayerFailure

    import serverlayer

    started: set[str] = set()
    original_start = zope.testrunner.runner.TestResult.startTest

    def start_test(self: Any, test: Any) -> None:
        started.add(test.id())
        original_start(self, test)

    zope.testrunner.runner.TestResult.startTest = start_test

    collected: dict[str, list[str]] = {}

    class Runner(zope.testrunner.runner.Runner):  # type: ignore[misc]
        def run_tests(self) -> None:
            # unittest drops each test from its suite once it ran: note them first.
            for layer_name, suite in self.tests_by_layer_name.items():
                collected[layer_name] = _test_ids(suite)
            super().run_tests()

    with open(os.environ["GOCEPT_SUITE_API"], encoding="utf-8") as api_json:
        api_outcomes = check_api(json.load(api_json))

    runner = Runner(args=sys.argv, script_parts=[os.path.abspath(__file__)])
    runner.run()
    if runner.options.resume_layer is not None:
        # A layer run in a subprocess of zope.testrunner's: the parent reports.
        return 1 if runner.failed else 0

    outcomes: dict[str, dict[str, str]] = dict(api_outcomes)
    problems: list[dict[str, str]] = []
    for kind, entries in (("failed", runner.failures), ("error", runner.errors)):
        for test, detail in entries:
            text = (
                detail
                if isinstance(detail, str)
                else ("".join(traceback.format_exception(*detail)) if detail else "unexpected success")
            )
            if isinstance(test, StartUpFailure):
                problems.append({"what": f"{test.module} (import)", "detail": text})
            elif isinstance(test, SetUpLayerFailure):
                layer = zope.testrunner.runner.name_from_layer(test.layer)
                problems.append({"what": f"layer {layer}.setUp", "detail": text, "layer": layer})
            elif isinstance(test, TearDownLayerFailure):
                layer = zope.testrunner.runner.name_from_layer(test.layer)
                problems.append({"what": f"layer {layer}.tearDown", "detail": text})
            elif hasattr(test, "id"):
                outcomes[test.id()] = {"outcome": kind, "detail": text}
            else:
                problems.append({"what": str(test), "detail": text})
    for test, reason in runner.skipped:
        outcomes.setdefault(test.id(), {"outcome": "skipped", "detail": str(reason)})

    failed_layers = {problem["layer"]: problem["detail"] for problem in problems if "layer" in problem}
    for layer_name, ids in collected.items():
        for test_id in ids:
            if test_id in outcomes:
                continue
            if test_id in started:
                outcomes[test_id] = {"outcome": "passed", "detail": ""}
            elif layer_name in failed_layers:
                outcomes[test_id] = {
                    "outcome": "not-run",
                    "detail": f"its layer {layer_name} failed to set up:\n{failed_layers[layer_name]}",
                }
            else:
                outcomes[test_id] = {"outcome": "not-run", "detail": "the runner never started it"}

    with open(os.environ["GOCEPT_SUITE_RESULTS"], "w", encoding="utf-8") as results:
        json.dump(
            {"serverlayer": os.path.dirname(serverlayer.__file__), "tests": outcomes, "problems": problems},
            results,
            indent=1,
        )
    return 1 if runner.failed or any(o["outcome"] != "passed" for o in api_outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
