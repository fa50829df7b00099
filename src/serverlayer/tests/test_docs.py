"""The documentation is true: every page's doctests pass, its example test
modules pass when zope.testrunner runs them the way a user would, and the
examples in the docstrings the API reference shows pass too.

A page's code is shown in one of three ways, all of them run:

- doctest blocks (``>>>``), run here with one namespace per page;
- ``.. code-block:: python`` blocks that start with ``# test_<name>.py``,
  written out as a test package and run under zope.testrunner here; those
  headed ``# test_<name>.py -- needs serverlayer[<extra>]`` need Zope and
  run in ``zope_integration/test_docs_examples.py`` (``tox -e zope``);
- ``.. literalinclude::`` of a file under ``examples/``, which its own
  runner executes.

Literal blocks (``::``) hold shell commands and output only.
"""

from __future__ import annotations

import doctest
import importlib
import re
import unittest
from pathlib import Path

from serverlayer.tests.helpers import (
    assert_example_modules_pass,
    bounded_socket_waits,
    has_doctests,
    unbounded_socket_waits,
)

DOCS = Path(__file__).resolve().parents[3] / "docs"
CODE_BLOCK = re.compile(r"^\.\. code-block:: (\w+)\n\n((?:   .*\n|\n)+)", re.MULTILINE)
EXAMPLE_MODULE = re.compile(r"# test_\w+\.py")
NEEDS_EXTRA = re.compile(r"# test_\w+\.py -- needs serverlayer\[\w+\].*")
LITERAL_INCLUDE = re.compile(r"^\.\. literalinclude:: (\S+)", re.MULTILINE)

#: The modules whose docstrings the API reference shows, and so runs;
#: the Zope ones need Zope and are left to zope_integration.
DOCUMENTED_MODULES = (
    "serverlayer", "serverlayer.errors", "serverlayer.wsgi", "serverlayer.asgi",
    "serverlayer.custom", "serverlayer.static", "serverlayer.content",
    "serverlayer.websocket_script", "serverlayer.recording", "serverlayer.smtp",
    "serverlayer.smtp_failures", "serverlayer.tls", "serverlayer.layer",
)

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.rst"))


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """Language and dedented code of each ``code-block`` of ``page``."""
    blocks = []
    for language, block in CODE_BLOCK.findall(page.read_text(encoding="utf-8")):
        lines = block.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        blocks.append((language, "\n".join(line[indent:] for line in lines).strip() + "\n"))
    return blocks


def example_modules() -> dict[str, str]:
    """Every page's code blocks that start with ``# test_<name>.py``."""
    modules: dict[str, str] = {}
    for page in pages():
        for language, code in code_blocks(page):
            first_line = code.splitlines()[0]
            if language == "python" and EXAMPLE_MODULE.fullmatch(first_line):
                name = first_line[2:]
                if name in modules:
                    raise AssertionError(f"{page.name}: a second example module {name}; name it apart")
                modules[name] = code
    return modules


class ExampleModuleTests(unittest.TestCase):

    def test_every_code_block_is_run(self):
        """No page shows code that nothing runs."""
        for page in pages():
            for language, code in code_blocks(page):
                first_line = code.splitlines()[0]
                with self.subTest(page=page.name, block=first_line):
                    if language == "python":
                        self.assertTrue(
                            EXAMPLE_MODULE.fullmatch(first_line) or NEEDS_EXTRA.fullmatch(first_line),
                            "a Python code block must be an example module headed # test_<name>.py",
                        )
                    else:
                        # The ZCML that a Zope example module loads.
                        self.assertEqual(language, "xml")
                        self.assertRegex(first_line, r"<!-- \w+\.zcml, next to test_\w+\.py -->")

    def test_directives_stand_apart(self):
        """A directive right under a paragraph's last line would be read as
        text: shown as prose, though this module would still run it."""
        for page in [*pages(), DOCS.parent / "README.rst"]:
            lines = page.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines[1:], 2):
                if line.startswith(".. ") and "::" in line:
                    with self.subTest(page=page.name, line=number):
                        self.assertEqual(lines[number - 2].strip(), "")

    def test_included_examples_exist(self):
        for page in pages():
            for target in LITERAL_INCLUDE.findall(page.read_text(encoding="utf-8")):
                with self.subTest(page=page.name, target=target):
                    path = (DOCS / target).resolve()
                    self.assertTrue(path.is_file())
                    self.assertEqual(path.relative_to(DOCS.parent).parts[0], "examples")

    def test_example_modules_pass_under_zope_testrunner(self):
        modules = example_modules()
        self.assertGreaterEqual(len(modules), 8)
        assert_example_modules_pass(self, modules)


def test_suite() -> unittest.TestSuite:
    if not (DOCS / "index.rst").exists():
        raise FileNotFoundError(f"{DOCS} is missing; run the tests from a checkout.")
    suite = unittest.TestSuite()
    suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(ExampleModuleTests))
    for page in pages():
        if not has_doctests(page):  # its examples, if any, are example modules (above)
            continue
        # Layers made on a page belong to a module named after it: by_hand_rst.
        module_name = page.stem.replace("-", "_") + "_rst"
        suite.addTest(
            doctest.DocFileSuite(
                str(page), module_relative=False, globs={"__name__": module_name},
                optionflags=OPTIONS, encoding="utf-8",
                setUp=bounded_socket_waits, tearDown=unbounded_socket_waits,
            )
        )
    for name in DOCUMENTED_MODULES:
        suite.addTest(
            doctest.DocTestSuite(
                importlib.import_module(name), optionflags=OPTIONS,
                setUp=bounded_socket_waits, tearDown=unbounded_socket_waits,
            )
        )
    return suite
