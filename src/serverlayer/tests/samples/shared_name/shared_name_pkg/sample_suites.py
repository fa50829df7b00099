"""Two suites whose layers share one name, given to the suites rather than
to the test classes (as doctest suites get theirs): the tests carry no
layer of their own, so the mix-up shows when a test asks its layer."""

import unittest
import urllib.request

from .layers import http_layer

ONE = http_layer("one", "SUITE_HTTP")
TWO = http_layer("two", "SUITE_HTTP")


def fetch(layer, expected):
    def test(case):
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            case.assertEqual(response.read(), expected)

    return test


class OneTests(unittest.TestCase):
    test_one = fetch(ONE, b"one")


class TwoTests(unittest.TestCase):
    test_two = fetch(TWO, b"two")


def test_suite():
    one = unittest.defaultTestLoader.loadTestsFromTestCase(OneTests)
    one.layer = ONE
    two = unittest.defaultTestLoader.loadTestsFromTestCase(TwoTests)
    two.layer = TWO
    return unittest.TestSuite([one, two])
