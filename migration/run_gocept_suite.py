#!/usr/bin/env python3
"""Run gocept.httpserverlayer 4.0's own tests against serverlayer.

serverlayer is meant to be a drop-in for gocept.httpserverlayer 4.0: its
users migrate by changing the import. This check proves it with gocept's
own test suite. It takes gocept.httpserverlayer 4.0's files (from the
installed package when that is version 4.0 and ships its tests, else from
the sdist, which it downloads from PyPI with pip), copies them into a
temporary directory, and there replaces each implementation module with a
shim that hands every attribute over to serverlayer's module of the same
name:

    gocept.httpserverlayer.wsgi              -> serverlayer.wsgi
    gocept.httpserverlayer.custom            -> serverlayer.custom
    gocept.httpserverlayer.static            -> serverlayer.static
    gocept.httpserverlayer.plonetestingzope  -> serverlayer.plonetestingzope
    gocept.httpserverlayer.zopeappwsgi       -> serverlayer.zopeappwsgi

gocept's test modules, fixtures and ZCML are used as they are. The tests
run with zope.testrunner in a subprocess (``_gocept_driver.py``), warnings
as errors, and every test's outcome comes back as JSON.

The tests of ``plonetestingzope`` and ``zopeappwsgi`` run only where what
they need is installed (Zope for the one; zope.app.wsgi and grok, which
gocept's fixtures use, for the other); otherwise each of their tests is
listed as not run, with what is missing. A test that is not run never
counts as passing.

Exit status: 0 when every test that ran passed or is in ``ALLOWED_FAILURES``
(a test of a documented difference, with its cause); 1 when a test failed
that is not allowed to, when an allowed test passed (remove it from the
list), or when the run itself went wrong (an import error, a layer that
failed to tear down, tests the runner found that the check did not expect).

    python migration/run_gocept_suite.py            # test ../src
    python migration/run_gocept_suite.py --source sdist --keep
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT_SRC = os.path.join(os.path.dirname(HERE), "src")
VERSION = "4.0"

#: gocept's implementation modules, each replaced by serverlayer's.
SHIMS = ("wsgi", "custom", "static", "plonetestingzope", "zopeappwsgi")

#: The subpackages that need extras: the modules serverlayer's module imports
#: (without them, neither its names nor gocept's tests can be checked)...
MODULE_NEEDS = {
    "plonetestingzope": ("ZPublisher", "plone.testing.zope"),
    "zopeappwsgi": ("zope.app.wsgi", "zope.app.appsetup", "ZODB"),
}
#: ...and, besides those, what gocept's fixtures import or include in their ZCML.
TEST_NEEDS = {
    "plonetestingzope": ("Products.Five",),
    "zopeappwsgi": ("grok",),
}

#: gocept 4.0's positional parameters: each layer's own, then those its
#: ``*args`` hands on to ``plone.testing.Layer(bases, name, module)``.
POSITIONAL = {
    "wsgi.Layer": ["bases", "name", "module"],
    "custom.Layer": ["request_handler", "bases", "name", "module"],
    "static.Layer": ["documentroot", "bases", "name", "module"],
    "plonetestingzope.Layer": ["bases", "name", "module"],
    "zopeappwsgi.Layer": ["bases", "name", "module"],
}

#: Tests that test a documented difference between gocept.httpserverlayer
#: and serverlayer (docs/migration.rst, "Migrating from gocept.httpserverlayer").
DOCUMENTED: dict[str, str] = {
    "gocept.httpserverlayer.static.tests.test_static.TestStaticFiles"
    ".test_documentroot_empty_except_for_favicon_after_testsetup": (
        "documented difference: serverlayer writes no empty favicon.ico into the temporary documentroot"
    ),
    "api: gocept.httpserverlayer.wsgi.Layer.serve": (
        "documented difference: serverlayer runs the server thread itself; wsgi.Layer has no serve()"
    ),
    "api: gocept.httpserverlayer.wsgi.Layer.shutdown": (
        "documented difference: tearDown stops the server; wsgi.Layer has no shutdown()"
    ),
}

ALLOWED_FAILURES: dict[str, str] = DOCUMENTED


def shim_source(module: str) -> str:
    return (
        f'"""gocept.httpserverlayer.{module}, resolved to serverlayer.{module} by the migration check."""\n'
        "\n"
        f"import serverlayer.{module} as _target\n"
        "\n"
        "\n"
        "def __getattr__(name):\n"
        "    return getattr(_target, name)\n"
        "\n"
        "\n"
        "def __dir__():\n"
        "    return dir(_target)\n"
    )


#: Our own ``gocept/__init__.py``: a namespace package, so that the other
#: gocept distributions installed stay importable (gocept's sdist declares it
#: with pkg_resources, which warns).
NAMESPACE_INIT = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"


def installed_package() -> str | None:
    """gocept.httpserverlayer 4.0's installed directory, if it ships its tests."""
    try:
        version = importlib.metadata.version("gocept.httpserverlayer")
    except importlib.metadata.PackageNotFoundError:
        return None
    if version != VERSION:
        return None
    distribution = importlib.metadata.distribution("gocept.httpserverlayer")
    files = [str(file) for file in distribution.files or ()]
    if "gocept/httpserverlayer/wsgi/tests.py" not in files:
        return None
    return str(distribution.locate_file("gocept/httpserverlayer"))


def sdist_package(workdir: str, sdist: str | None) -> str:
    """gocept.httpserverlayer's directory, unpacked from its sdist."""
    if sdist is None:
        download = os.path.join(workdir, "download")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"gocept.httpserverlayer=={VERSION}",
                "-d",
                download,
            ],
            check=True,
        )
        [name] = os.listdir(download)
        sdist = os.path.join(download, name)
    unpacked = os.path.join(workdir, "sdist")
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    [top] = os.listdir(unpacked)
    return os.path.join(unpacked, top, "src", "gocept", "httpserverlayer")


def build_tree(package: str, root: str) -> dict[str, list[list[str]]]:
    """Copy gocept.httpserverlayer to ``root/gocept/httpserverlayer`` and shim it.

    Returns the public names of each module replaced, read from gocept's
    source before it is: ``[name]`` for a module-level name, ``[class,
    attribute]`` for an attribute of a public class.
    """
    target = os.path.join(root, "gocept", "httpserverlayer")
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    names = {module: public_names(os.path.join(target, module, "__init__.py")) for module in SHIMS}
    with open(os.path.join(root, "gocept", "__init__.py"), "w", encoding="utf-8") as init:
        init.write(NAMESPACE_INIT)
    for module in SHIMS:
        with open(os.path.join(target, module, "__init__.py"), "w", encoding="utf-8") as shim:
            shim.write(shim_source(module))
    return names


def public_names(path: str) -> list[list[str]]:
    """The names a module defines (not imports) and its classes' attributes, without ``_`` ones."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    names: list[list[str]] = []

    def assigned(node: ast.stmt) -> list[str]:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            return [node.name]
        if isinstance(node, ast.Assign):
            return [target.id for target in node.targets if isinstance(target, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []

    for node in tree.body:
        for name in assigned(node):
            if name.startswith("_"):
                continue
            names.append([name])
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    names += [[name, attribute] for attribute in assigned(item) if not attribute.startswith("_")]
    return names


def test_modules(root: str) -> Iterator[tuple[str, str]]:
    """(module name, path) of every module zope.testrunner's default patterns find."""
    for directory, _, files in os.walk(os.path.join(root, "gocept")):
        for file in sorted(files):
            in_tests = os.path.basename(directory) == "tests" and file.startswith("test") and file.endswith(".py")
            if file == "tests.py" or in_tests:
                path = os.path.join(directory, file)
                yield os.path.relpath(path, root)[:-3].replace(os.sep, "."), path


def expected_tests(root: str) -> dict[str, list[str]]:
    """Every test method of every test module under ``root``, read from the source.

    A class's tests include those of the mixins it inherits from, wherever
    in the tree they are defined (gocept's isolation tests are one).
    """
    classes: dict[str, tuple[list[str], list[str]]] = {}
    modules: dict[str, list[str]] = {}
    for directory, _, files in os.walk(os.path.join(root, "gocept")):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(directory, file)
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            with open(path, encoding="utf-8") as source:
                tree = ast.parse(source.read())
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    bases = [ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases]
                    methods = [
                        item.name
                        for item in node.body
                        if isinstance(item, ast.FunctionDef) and item.name.startswith("test")
                    ]
                    classes[node.name] = (bases, methods)
                    modules.setdefault(module, []).append(node.name)

    def tests_of(name: str) -> list[str]:
        bases, methods = classes.get(name, ([], []))
        found = list(methods)
        for base in bases:
            found += [method for method in tests_of(base) if method not in found]
        return found

    def is_test_case(name: str) -> bool:
        bases = classes.get(name, ([], []))[0]
        return "TestCase" in bases or any(is_test_case(base) for base in bases)

    expected = {}
    for module, _ in test_modules(root):
        expected[module] = sorted(
            f"{module}.{name}.{method}"
            for name in modules.get(module, [])
            if is_test_case(name)
            for method in tests_of(name)
        )
    return expected


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(module)
    return missing


def first_line(detail: str) -> str:
    lines = [line for line in detail.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        choices=("auto", "installed", "sdist"),
        default="auto",
        help="where gocept's tests come from (auto: the installed package if it is"
        f" {VERSION} and ships them, else the sdist from PyPI)",
    )
    parser.add_argument("--sdist", help="a gocept.httpserverlayer-4.0.tar.gz to use instead of downloading it")
    parser.add_argument(
        "--serverlayer",
        default=CHECKOUT_SRC,
        help="the directory that holds the serverlayer package to test (default: %(default)s)",
    )
    parser.add_argument("--warnings", default="error", help="python -W for the test run (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the test run may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory, and say where it is")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="serverlayer-gocept-suite-")
    try:
        package = installed_package() if args.source in ("auto", "installed") and not args.sdist else None
        if package is None and args.source == "installed":
            print(f"gocept.httpserverlayer {VERSION} is not installed with its tests", file=sys.stderr)
            return 2
        origin = f"the installed package, {package}" if package else "the sdist"
        if package is None:
            package = sdist_package(workdir, args.sdist)
            origin = f"the sdist ({args.sdist or 'downloaded from PyPI'})"
        root = os.path.join(workdir, "tree")
        names = build_tree(package, root)
        expected = expected_tests(root)
        api_checks = {
            module: [f"api: gocept.httpserverlayer.{module}.{'.'.join(name)}" for name in module_names]
            + [
                f"api: gocept.httpserverlayer.{layer}({', '.join(parameters)})"
                for layer, parameters in POSITIONAL.items()
                if layer.startswith(f"{module}.")
            ]
            for module, module_names in names.items()
        }
        for module, ids in api_checks.items():
            expected[f"api: {module}"] = ids

        not_run: dict[str, str] = {}
        ignore = []  # subpackages whose tests cannot run
        skip_api = []  # modules whose names cannot be checked
        for subpackage, modules in MODULE_NEEDS.items():
            missing_for_module = missing_modules(modules)
            missing = missing_for_module + missing_modules(TEST_NEEDS[subpackage])
            if missing_for_module:
                skip_api.append(subpackage)
                not_run.update(dict.fromkeys(expected[f"api: {subpackage}"], f"not installed: {', '.join(missing)}"))
            if missing:
                ignore.append(subpackage)
                for module, ids in expected.items():
                    if module.startswith(f"gocept.httpserverlayer.{subpackage}."):
                        not_run.update(dict.fromkeys(ids, f"not installed: {', '.join(missing)}"))

        results_file = os.path.join(workdir, "results.json")
        api_file = os.path.join(workdir, "api.json")
        with open(api_file, "w", encoding="utf-8") as api_json:
            json.dump({"names": names, "positional": POSITIONAL, "skip": skip_api}, api_json)
        env = dict(
            os.environ,
            GOCEPT_SUITE_ROOT=root,
            GOCEPT_SUITE_SERVERLAYER=os.path.abspath(args.serverlayer),
            GOCEPT_SUITE_RESULTS=results_file,
            GOCEPT_SUITE_API=api_file,
        )
        command = [
            sys.executable,
            "-W",
            args.warnings,
            # WebOb (under plone.testing.zope's testbrowser) imports cgi; as in tox.ini's zope env.
            "-W",
            "ignore:'cgi' is deprecated:DeprecationWarning:webob.compat",
            os.path.join(HERE, "_gocept_driver.py"),
            f"--test-path={root}",
            "-v",
        ] + [f"--ignore_dir={name}" for name in ignore]
        print(f"== gocept.httpserverlayer {VERSION}'s tests from {origin}, against serverlayer in {args.serverlayer}")
        sys.stdout.flush()
        try:
            completed = subprocess.run(
                command, env=env, cwd=workdir, timeout=args.timeout,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        except subprocess.TimeoutExpired as timeout:
            print(_quoted(timeout.output))
            print(f"FAILED: the test run took longer than {args.timeout} seconds")
            return 1
        # Quoted, so that gocept's allowed failures do not read as this
        # project's in a summary of zope.testrunner's "Total:" lines.
        print(_quoted(completed.stdout))
        if not os.path.exists(results_file):
            print(f"FAILED: the test run ended (status {completed.returncode}) without reporting its results")
            return 1
        with open(results_file, encoding="utf-8") as results_json:
            results = json.load(results_json)
        return report(results, expected, not_run)
    finally:
        if args.keep:
            print(f"(kept {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _quoted(output: str | bytes | None) -> str:
    """The test run's output, each line behind ``| ``."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    return "\n".join(f"  | {line}" for line in (output or "").splitlines())


def report(results: dict[str, Any], expected: dict[str, list[str]], not_run: dict[str, str]) -> int:
    outcomes: dict[str, dict[str, str]] = results["tests"]
    every_test = sorted({test for ids in expected.values() for test in ids} | set(outcomes))
    passed: list[str] = []
    stale: list[str] = []
    allowed: list[tuple[str, dict[str, str]]] = []
    failed: list[tuple[str, dict[str, str]]] = []
    skipped: list[tuple[str, str]] = []
    for test in every_test:
        if test in not_run:
            continue
        outcome = outcomes.get(test, {"outcome": "not-run", "detail": "expected from the source, but not found"})
        if outcome["outcome"] == "passed":
            (stale if test in ALLOWED_FAILURES else passed).append(test)
        elif outcome["outcome"] == "skipped":
            skipped.append((test, outcome["detail"]))
        elif test in ALLOWED_FAILURES:
            allowed.append((test, outcome))
        else:
            failed.append((test, outcome))

    print("\n== gocept.httpserverlayer's tests against serverlayer", results["serverlayer"])
    for test in passed:
        print(f"passed       {test}")
    for test, outcome in allowed:
        print(
            f"allowed {outcome['outcome']:7}{test}\n    cause: {ALLOWED_FAILURES[test]}"
            f"\n    got:   {first_line(outcome['detail'])}"
        )
    for test, reason in sorted(not_run.items()):
        print(f"not run      {test}\n    because {reason}")
    for test, reason in skipped:
        print(f"skipped      {test}\n    because {reason}")
    for test in stale:
        print(f"PASSED, BUT ALLOWED TO FAIL  {test}\n    remove it from ALLOWED_FAILURES ({ALLOWED_FAILURES[test]})")
    for test, outcome in failed:
        print(f"FAILED ({outcome['outcome']}) {test}\n" + indent(outcome["detail"]))
    for problem in results["problems"]:
        if "layer" not in problem:  # a layer's set-up failure shows in each of its tests
            print(f"FAILED {problem['what']}\n" + indent(problem["detail"]))
    bad_problems = [problem for problem in results["problems"] if "layer" not in problem]

    # Not in the "N passed, N failed" form of a test run's closing line:
    # CI's closing line is the summary of serverlayer's own tests.
    print(
        f"\ngocept.httpserverlayer's tests and API checks against serverlayer: {len(passed)} passed;"
        f" {len(allowed)} failed as allowed; {len(failed)} failed; {len(skipped)} skipped;"
        f" {len(not_run)} not run; {len(stale)} allowed to fail but passed; {len(bad_problems)} other problems"
    )
    return 1 if failed or stale or bad_problems or skipped else 0


def indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.rstrip().splitlines())


if __name__ == "__main__":
    sys.exit(main())
