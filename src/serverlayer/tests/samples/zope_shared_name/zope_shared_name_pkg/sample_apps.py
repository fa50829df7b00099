"""Two zopeappwsgi layers of tests with one name (needs the zopeappwsgi
extra): the runner would set up one of them and run both classes' tests on it."""

import unittest

import zope.app.appsetup.testlayer

import serverlayer.tests.zope_integration
from serverlayer import zopeappwsgi

ZODB_LAYER = zope.app.appsetup.testlayer.ZODBLayer(serverlayer.tests.zope_integration, "ftesting.zcml", name="ZODB")


def app_layer():
    return zopeappwsgi.Layer(bases=(ZODB_LAYER,), name="APP")


ONE = app_layer()
TWO = app_layer()


class OneTests(unittest.TestCase):
    layer = ONE

    def test_one(self):
        self.assertIn("wsgi_app", self.layer)


class TwoTests(unittest.TestCase):
    layer = TWO

    def test_two(self):
        self.assertIn("wsgi_app", self.layer)
