"""``$GOCEPT_HTTP_APP_HOST`` moves the wsgi layers only, as in gocept.httpserverlayer;
``$SERVERLAYER_HTTP_HOST`` moves every HTTP layer.

127.0.0.2 is a loopback address Linux answers on without any set-up, and
not the default 127.0.0.1, so where a layer listens shows which variable
it read.
"""

from __future__ import annotations

import os
import smtplib
import unittest
import urllib.request

from serverlayer import content, custom, smtp, static, wsgi
from serverlayer.tests.helpers import set_up_by_hand, without_host_variables

ALIAS = "127.0.0.2"
DEFAULT = "127.0.0.1"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"wsgi"]


class Handler(custom.RequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"custom")


class MyWSGILayer(wsgi.Layer):
    """A gocept user's subclass of the wsgi layer."""


class HostVariableTests(unittest.TestCase):

    def setUp(self):
        without_host_variables(self)

    def http_layers(self):
        return {
            "wsgi": wsgi.Layer(app, name="host_wsgi"),
            "wsgi tls": wsgi.Layer(app, name="host_wsgi_tls", tls=True),
            "wsgi subclass": MyWSGILayer(app, name="host_wsgi_subclass"),
            "custom": custom.Layer(Handler, name="host_custom"),
            "custom tls": custom.Layer(Handler, name="host_custom_tls", tls=True),
            "static": static.Layer(name="host_static"),
            "content": content.Layer(name="host_content"),
        }

    def assert_listens_on(self, layer, host):
        """``layer`` publishes ``host``, listens there, and answers there;
        it runs to the end of the test, which what its server raises fails."""
        set_up_by_hand(self, layer)
        prefix = layer.resource_prefix
        port = layer[f"{prefix}_port"]
        self.assertEqual(layer[f"{prefix}_host"], host)
        self.assertEqual(layer._running.server.socket.getsockname(), (host, port))
        if prefix == "smtp":
            with smtplib.SMTP(host, port, timeout=5) as client:
                self.assertEqual(client.noop()[0], 250)
            return
        self.assertEqual(layer["http_url"].split("/")[2], f"{host}:{port}")
        if isinstance(layer, static.Layer):
            with open(os.path.join(layer["documentroot"], "file.txt"), "wb") as file:
                file.write(b"static")
        if isinstance(layer, content.Layer):
            layer["http_content"].serve_content(b"content")
        context = layer["ssl_context"] if getattr(layer, "tls", False) else None
        with urllib.request.urlopen(layer["http_url"] + "file.txt", timeout=5, context=context) as response:
            self.assertEqual(response.status, 200)

    def test_gocept_variable_moves_the_wsgi_layers_only(self):
        os.environ["GOCEPT_HTTP_APP_HOST"] = ALIAS
        expected = {"wsgi": ALIAS, "wsgi tls": ALIAS, "wsgi subclass": ALIAS}
        for kind, layer in self.http_layers().items():
            with self.subTest(kind=kind):
                self.assert_listens_on(layer, expected.get(kind, DEFAULT))
        with self.subTest(kind="smtp"):
            self.assert_listens_on(smtp.Layer(name="host_smtp"), DEFAULT)

    def test_serverlayer_variable_moves_every_http_layer(self):
        os.environ["SERVERLAYER_HTTP_HOST"] = ALIAS
        for kind, layer in self.http_layers().items():
            with self.subTest(kind=kind):
                self.assert_listens_on(layer, ALIAS)
        with self.subTest(kind="smtp"):
            self.assert_listens_on(smtp.Layer(name="host_smtp"), DEFAULT)

    def test_serverlayer_variable_wins_over_gocept_variable(self):
        os.environ["SERVERLAYER_HTTP_HOST"] = ALIAS
        os.environ["GOCEPT_HTTP_APP_HOST"] = "localhost"
        self.assert_listens_on(wsgi.Layer(app, name="host_both"), ALIAS)

    def test_a_keyword_wins_over_the_gocept_variable(self):
        os.environ["GOCEPT_HTTP_APP_HOST"] = ALIAS
        self.assert_listens_on(wsgi.Layer(app, name="host_keyword", host=DEFAULT), DEFAULT)
