"""README.rst is true: its doctests pass, and its example test modules pass
when zope.testrunner runs them the way a user would. The documentation's
pages are checked the same way in test_docs."""

from __future__ import annotations

import doctest
import re
import unittest
from pathlib import Path

from serverlayer.tests.helpers import (
    assert_example_modules_pass,
    bounded_socket_waits,
    has_doctests,
    unbounded_socket_waits,
)

README = Path(__file__).resolve().parents[3] / "README.rst"
CODE_BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", re.MULTILINE)


def example_modules() -> dict[str, str]:
    """The README's code blocks that start with ``# test_<name>.py``."""
    modules = {}
    for block in CODE_BLOCK.findall(README.read_text()):
        code = "\n".join(line[4:] for line in block.splitlines()).strip() + "\n"
        first_line = code.splitlines()[0]
        if re.fullmatch(r"# test_\w+\.py", first_line):
            modules[first_line[2:]] = code
    return modules


class ExampleModuleTests(unittest.TestCase):

    def test_readme_has_example_modules(self):
        # One per layer kind: wsgi, asgi, static, custom, smtp and content.
        self.assertGreaterEqual(len(example_modules()), 6)

    def test_every_code_block_is_an_example_module(self):
        """The README shows no Python that nothing runs; the rest lives in docs/."""
        blocks = CODE_BLOCK.findall(README.read_text())
        self.assertEqual(len(blocks), len(example_modules()))

    def test_example_modules_pass_under_zope_testrunner(self):
        assert_example_modules_pass(self, example_modules())


class RenderingTests(unittest.TestCase):
    """README.rst and CHANGES.rst become the PyPI page: they must render cleanly."""

    def test_renders_without_warnings(self):
        import docutils.core
        import docutils.utils

        for path in (README, README.parent / "CHANGES.rst"):
            with self.subTest(path=path.name):
                try:
                    docutils.core.publish_string(
                        path.read_text(), writer="null",
                        settings_overrides={"halt_level": 2, "report_level": 2, "warning_stream": False},
                    )
                except docutils.utils.SystemMessage as problem:
                    self.fail(f"{path.name} does not render: {problem}")


def test_suite() -> unittest.TestSuite:
    if not README.exists():
        raise FileNotFoundError(f"{README} is missing; run the tests from a checkout.")
    suite = unittest.TestSuite()
    suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(ExampleModuleTests))
    suite.addTest(unittest.defaultTestLoader.loadTestsFromTestCase(RenderingTests))
    if has_doctests(README):  # its examples are example modules (above); doctests would run too
        suite.addTest(
            doctest.DocFileSuite(
                str(README),
                module_relative=False,
                globs={"__name__": "README_rst"},
                optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                encoding="utf-8",
                setUp=bounded_socket_waits,
                tearDown=unbounded_socket_waits,
            )
        )
    return suite
