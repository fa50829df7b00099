"""docs/zope.rst's examples pass: the code blocks headed
``# test_<name>.py -- needs serverlayer[...]`` (which the main suite, without
Zope, leaves alone), with the ``<!-- <name>.zcml, next to ... -->`` files
they load, run under zope.testrunner as a user would run them."""

from __future__ import annotations

import re
import unittest
from pathlib import Path

from serverlayer.tests.helpers import run_example_modules

ZOPE_PAGE = Path(__file__).resolve().parents[4] / "docs" / "zope.rst"
CODE_BLOCK = re.compile(r"^\.\. code-block:: (python|xml)\n\n((?:    .*\n|\n)+)", re.MULTILINE)
TEST_MODULE = re.compile(r"# (test_\w+\.py) -- needs serverlayer\[\w+\].*")
ZCML_FILE = re.compile(r"<!-- (\w+\.zcml), next to test_\w+\.py -->")
#: What -W error would trip on in Zope's dependencies (see tox.ini).
WARNING_FILTERS = ("-W", "ignore:'cgi' is deprecated:DeprecationWarning:webob.compat")


def zope_examples(page: str) -> dict[str, str]:
    """File name to content, for every Zope example module and ZCML file."""
    files = {}
    for language, block in CODE_BLOCK.findall(page):
        text = "\n".join(line[4:] for line in block.splitlines()).strip() + "\n"
        header = (TEST_MODULE if language == "python" else ZCML_FILE).fullmatch(text.splitlines()[0])
        if header:
            files[header.group(1)] = text
    return files


class ZopeDocsExampleTests(unittest.TestCase):

    def test_examples_pass_under_zope_testrunner(self):
        files = zope_examples(ZOPE_PAGE.read_text(encoding="utf-8"))
        self.assertEqual(
            sorted(name for name in files if name.endswith(".py")),
            ["test_zope_site.py", "test_ztk_app.py"],
        )
        expected_tests = sum(text.count("\n    def test_") for text in files.values())
        completed = run_example_modules(files, *WARNING_FILTERS)
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 0, output)
        self.assertIn(f"Total: {expected_tests} tests, 0 failures, 0 errors", output)
        self.assertNotIn("left new threads behind", output)


def test_suite() -> unittest.TestSuite:
    """The examples above, and those in the Zope modules' docstrings, which
    the API reference shows."""
    import doctest

    from serverlayer import plonetestingzope, zopeappwsgi

    suite = unittest.defaultTestLoader.loadTestsFromTestCase(ZopeDocsExampleTests)
    for module in (plonetestingzope, zopeappwsgi):
        suite.addTest(doctest.DocTestSuite(module, optionflags=doctest.ELLIPSIS))
    return suite
