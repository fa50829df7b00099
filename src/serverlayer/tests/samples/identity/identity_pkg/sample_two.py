"""The other of two modules that each create an unnamed layer."""

import unittest
import urllib.request

from serverlayer import wsgi


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"two"]


LAYER = wsgi.Layer(app)


class TwoTests(unittest.TestCase):
    layer = LAYER

    def test_gets_its_own_app(self):
        with urllib.request.urlopen(self.layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"two")
