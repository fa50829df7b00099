"""One of two test modules with an integration.Layer of its own. Its inner
layers have the names of the other's; its test must reach its own server."""

import unittest
import urllib.request

from . import integration


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"one"]


LAYER = integration.Layer(app, name="ONE_LAYER", module=__name__)


class Tests(unittest.TestCase):
    layer = LAYER

    def test_served_by_its_own_inner_layers(self):
        with urllib.request.urlopen(self.layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"one")
