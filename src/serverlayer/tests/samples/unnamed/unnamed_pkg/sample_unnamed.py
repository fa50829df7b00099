"""Unnamed layers in one module, as gocept.httpserverlayer users write them.

Each test asks its layer's server who it is: a test run on another layer's
server gets another answer, and one whose layer was never set up fails.
"""

import unittest
import urllib.request

from serverlayer import custom, wsgi


def answering(text):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [text.encode()]

    return app


def handler_answering(text):
    class Handler(custom.RequestHandler):
        def do_GET(self):
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


HTTP_LAYER = wsgi.Layer()
HTTP_LAYER.wsgi_app = answering("first wsgi")

OTHER_HTTP_LAYER = wsgi.Layer()
OTHER_HTTP_LAYER.wsgi_app = answering("second wsgi")

HANDLER_LAYER = custom.Layer(handler_answering("custom"))

#: Layers with no variable of their own are told apart by creation order.
LISTED_LAYERS = [custom.Layer(handler_answering(f"listed {number}")) for number in (1, 2)]


class ServerTest(unittest.TestCase):
    expected = ""

    def test_talks_to_its_own_server(self):
        with urllib.request.urlopen(self.layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read().decode(), self.expected)


class HTTPTests(ServerTest):
    layer = HTTP_LAYER
    expected = "first wsgi"


class OtherHTTPTests(ServerTest):
    layer = OTHER_HTTP_LAYER
    expected = "second wsgi"


class HandlerTests(ServerTest):
    layer = HANDLER_LAYER
    expected = "custom"


class FirstListedTests(ServerTest):
    layer = LISTED_LAYERS[0]
    expected = "listed 1"


class SecondListedTests(ServerTest):
    layer = LISTED_LAYERS[1]
    expected = "listed 2"


def test_suite():
    loader = unittest.defaultTestLoader
    return unittest.TestSuite(
        loader.loadTestsFromTestCase(case)
        for case in (HTTPTests, OtherHTTPTests, HandlerTests, FirstListedTests, SecondListedTests)
    )
