"""Sphinx configuration of serverlayer's documentation.

Build with ``tox -e docs``, or ``sphinx-build -W --keep-going -b html docs
docs/_build/html`` with the ``docs`` extra installed. The build needs no
network: intersphinx is not used, and the Zope modules are mocked for
autodoc when Zope is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import serverlayer  # noqa: E402

project = "serverlayer"
author = "serverlayer contributors"
copyright = "serverlayer contributors"
release = serverlayer.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "**.part"]
# The pages are reStructuredText; examples are doctest blocks and test
# modules, which src/serverlayer/tests/test_docs.py runs.
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
# Literal blocks (`::`) hold shell commands and output; code is marked python.
highlight_language = "text"
nitpicky = False

# API reference: signatures with their type hints in the description.
autodoc_typehints = "description"
autodoc_typehints_description_target = "all"
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autoclass_content = "class"
autodoc_preserve_defaults = True
# The Zope layers import Zope. Without the zope extras, their modules are
# documented over stand-ins: plone.testing.zope's functional layer as a
# plain layer (plonetestingzope stacks its HTTP_SERVER on it when imported),
# the rest mocked by autodoc.
autodoc_mock_imports: list[str] = []
try:
    import plone.testing.zope  # noqa: F401
except ImportError:
    import types

    import plone.testing

    class FunctionalTesting(plone.testing.Layer):
        """Stands in for plone.testing.zope.FunctionalTesting."""

    stand_in = types.ModuleType("plone.testing.zope")
    stand_in.FunctionalTesting = FunctionalTesting  # type: ignore[attr-defined]
    stand_in.FUNCTIONAL_TESTING = FunctionalTesting(  # type: ignore[attr-defined]
        name="FUNCTIONAL_TESTING", module="plone.testing.zope"
    )
    sys.modules["plone.testing.zope"] = stand_in
    plone.testing.zope = stand_in  # type: ignore[attr-defined]
    autodoc_mock_imports += ["ZPublisher", "App"]
if importlib.util.find_spec("zope.app") is None:
    autodoc_mock_imports += ["zope.app"]

html_theme = "furo"
html_title = f"serverlayer {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
