"""Tests whose requests make the server raise, run by test_reporting."""

import unittest
import urllib.error
import urllib.request

from serverlayer import custom, wsgi


def app(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise ZeroDivisionError("boom from the app")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"fine"]


class Handler(custom.RequestHandler):
    def do_GET(self):
        raise KeyError("boom from the handler")


WSGI_LAYER = wsgi.Layer(app, name="WSGI_LAYER")
CUSTOM_LAYER = custom.Layer(Handler, name="CUSTOM_LAYER")
QUIET_LAYER = wsgi.Layer(app, name="QUIET_LAYER", report_server_errors=False)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


class WSGITests(unittest.TestCase):
    layer = WSGI_LAYER

    def test_1_app_raises(self):
        self.assertEqual(get(self.layer["http_url"] + "boom"), 500)

    def test_2_next_test_is_clean(self):
        self.assertEqual(get(self.layer["http_url"]), 200)

    def test_3_expected_error_is_taken(self):
        self.assertEqual(get(self.layer["http_url"] + "boom"), 500)
        errors = self.layer.server_errors.take()
        self.assertEqual(len(errors), 1)
        self.assertIn("ZeroDivisionError: boom from the app", errors[0])

    def test_4_checked_mid_way(self):
        get(self.layer["http_url"] + "boom")
        self.layer.check_server_errors()


class CustomTests(unittest.TestCase):
    layer = CUSTOM_LAYER

    def test_handler_raises(self):
        self.assertIsNone(get(self.layer["http_url"]))


class QuietTests(unittest.TestCase):
    layer = QUIET_LAYER

    def test_switched_off(self):
        self.assertEqual(get(self.layer["http_url"] + "boom"), 500)


def deeper(base):
    """A subclass of ``base`` whose testSetUp adds a frame, as a mixin would."""

    class Deeper(base):
        def testSetUp(self):
            super().testSetUp()

    return Deeper


DeepLayer: type[wsgi.Layer] = wsgi.Layer
for _ in range(20):
    DeepLayer = deeper(DeepLayer)
DEEP_LAYER = DeepLayer(app, name="DEEP_LAYER")


class DeepTests(unittest.TestCase):
    """The test is found however many frames the layer classes add."""

    layer = DEEP_LAYER

    def test_1_app_raises_under_a_deep_layer(self):
        self.assertEqual(get(self.layer["http_url"] + "boom"), 500)

    def test_2_the_run_goes_on(self):
        self.assertEqual(get(self.layer["http_url"]), 200)
