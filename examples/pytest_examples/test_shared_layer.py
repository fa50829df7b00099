"""Tests on a layer whose fixtures conftest.py made: a class and a function."""

import unittest
import urllib.request

from shared_layers import SHARED_LAYER


class SharedLayerTests(unittest.TestCase):
    layer = SHARED_LAYER

    def setUp(self):
        # In setUp, not setUpClass: pytest calls setUpClass before the layer is set up.
        self.url = self.layer["http_url"]

    def test_a_class_uses_the_layer(self):
        with urllib.request.urlopen(self.url) as response:
            self.assertEqual(response.read(), b"one server for several modules")


def test_a_function_uses_the_layer(shared_layer):
    with urllib.request.urlopen(shared_layer["http_url"]) as response:
        assert response.read() == b"one server for several modules"
