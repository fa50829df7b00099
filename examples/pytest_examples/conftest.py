"""Fixtures for the layers that several test modules use.

zope.pytestlayer makes the fixtures of a layer once. Made in a test module
with ``fixture.create``, they belong to that module: a ``layer =
SHARED_LAYER`` class or a function asking for ``shared_layer`` in another
module then fails with "fixture 'shared_layer' not found". Made here, they
belong to every test module of this directory.
"""

from shared_layers import SHARED_LAYER
from zope.pytestlayer import fixture

globals().update(fixture.create(SHARED_LAYER, function_fixture_name="shared_layer"))
