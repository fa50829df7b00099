"""Two test classes whose layers share one name: the runner would set up one
of them and run both classes' tests on it."""

import unittest
import urllib.request

from .layers import http_layer

ONE = http_layer("one", "HTTP")
TWO = http_layer("two", "HTTP")


class OneTests(unittest.TestCase):
    layer = ONE

    def test_one(self):
        with urllib.request.urlopen(self.layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"one")


class TwoTests(unittest.TestCase):
    layer = TWO

    def test_two(self):
        with urllib.request.urlopen(self.layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"two")
