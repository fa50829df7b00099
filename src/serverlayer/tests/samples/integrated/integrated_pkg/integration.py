"""A layer that bundles its own inner layers, as gocept.selenium's grok
layer does: its ``__init__`` creates them with fixed names, and its
``setUp`` sets them up itself. zope.testrunner only ever sees the outer
layer, so every instance's inner layers may share their names.
"""

import plone.testing

from serverlayer import wsgi


class AppLayer(plone.testing.Layer):
    """Publishes the outer layer's application as ``wsgi_app``."""

    def __init__(self, app, **kwargs):
        super().__init__(**kwargs)
        self.app = app

    def setUp(self):
        self["wsgi_app"] = self.app

    def tearDown(self):
        del self["wsgi_app"]


class Layer(plone.testing.Layer):
    """Serves ``app`` over HTTP through inner layers of fixed names."""

    def __init__(self, app, name, module):
        super().__init__(name=name, module=module)
        self.APP_LAYER = AppLayer(app, name="IntegratedAppLayer", bases=[self])
        self.HTTP_LAYER = wsgi.Layer(name="IntegratedHTTPLayer", bases=[self.APP_LAYER])

    def setUp(self):
        self.APP_LAYER.setUp()
        self.HTTP_LAYER.setUp()
        self["http_url"] = self.HTTP_LAYER["http_url"]

    def tearDown(self):
        del self["http_url"]
        self.HTTP_LAYER.tearDown()
        self.APP_LAYER.tearDown()

    def testSetUp(self):
        self.HTTP_LAYER.testSetUp()

    def testTearDown(self):
        self.HTTP_LAYER.testTearDown()
