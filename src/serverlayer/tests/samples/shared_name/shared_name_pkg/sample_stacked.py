"""Two test layers of one name, each on a server layer of one name: the
runner would set up one pair and run both pairs' tests on it."""

import unittest
import urllib.request

import plone.testing

from .layers import http_layer


def stacked(text):
    return plone.testing.Layer(bases=(http_layer(text, "STACKED_HTTP"),), name="STACKED", module=__name__)


ONE = stacked("one")
TWO = stacked("two")


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
