"""Server errors under pytest: run by test_pytest, not collected by the suite."""

import unittest
import urllib.error
import urllib.request

from zope.pytestlayer import fixture

from serverlayer import wsgi


def app(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise ZeroDivisionError("boom under pytest")
    start_response("200 OK", [])
    return [b"fine"]


LAYER = wsgi.Layer(app, name="LAYER")
globals().update(fixture.create(LAYER, function_fixture_name="http_layer"))


def get(url):
    try:
        urllib.request.urlopen(url).close()
    except urllib.error.HTTPError:
        pass


class CaseTests(unittest.TestCase):
    layer = LAYER

    def test_a_case_that_makes_the_server_raise(self):
        get(self.layer["http_url"] + "boom")

    def test_b_next_case_is_clean(self):
        get(self.layer["http_url"])


def test_c_function_that_makes_the_server_raise(http_layer):
    get(http_layer["http_url"] + "boom")


def test_d_next_function_is_clean(http_layer):
    get(http_layer["http_url"])
