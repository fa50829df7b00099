"""gocept.httpserverlayer's documented API, used as its users' tests use it.

A project moving from gocept.httpserverlayer changes its imports and
nothing else: these tests are written against gocept's names, call
signatures and server attributes.
"""

from __future__ import annotations

import functools
import io
import os
import socket
import tempfile
import threading
import unittest
import urllib.error
import urllib.request
from contextlib import redirect_stderr
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from unittest import mock
from wsgiref.simple_server import WSGIRequestHandler

import plone.testing
import requests

from serverlayer import ConfigurationError, custom, static, wsgi
from serverlayer.tests.helpers import ResourceProvider, run_example_modules, set_up_by_hand


def text_app(text: str):
    def app(environ, start_response):
        body = f"{text} {environ['PATH_INFO']}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    app.__name__ = f"app_{text}"
    return app


FIRST = text_app("first")
SECOND = text_app("second")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()  # type: ignore[no-any-return]


def layer_url(layer: plone.testing.Layer, path: str = "") -> str:
    return f"http://{layer['http_address']}/{path}"


class BaseLayer(plone.testing.Layer):
    """A base layer with a resource of its own, as projects stack them."""

    def setUp(self):
        self["from_base"] = "base resource"

    def tearDown(self):
        del self["from_base"]


BASE = BaseLayer(name="BASE")

WSGI_LAYER = wsgi.Layer(FIRST, name="WSGI_LAYER")


class SetAppTests(unittest.TestCase):
    """``layer['httpd'].set_app(app)``: one server, a new application per test."""

    layer = WSGI_LAYER

    def test_set_app_serves_the_new_app_from_the_next_request_on(self):
        httpd = self.layer["httpd"]
        self.assertIs(httpd.get_app(), FIRST)
        self.assertEqual(get(layer_url(self.layer, "a")), b"first /a")
        httpd.set_app(SECOND)
        self.assertIs(httpd.get_app(), SECOND)
        self.assertEqual(get(layer_url(self.layer, "b")), b"second /b")

    def test_requests_to_a_set_app_are_still_recorded(self):
        self.layer["httpd"].set_app(SECOND)
        get(layer_url(self.layer, "recorded?x=1"))
        [request] = self.layer["http_requests"]
        self.assertEqual(request.path, "/recorded")

    def test_server_address_and_port_are_where_clients_connect(self):
        httpd = self.layer["httpd"]
        self.assertEqual(httpd.server_address, (self.layer["http_host"], self.layer["http_port"]))
        self.assertEqual(httpd.server_port, self.layer["http_port"])
        host, port = httpd.server_address
        self.assertEqual(get(f"http://{host}:{port}/x"), b"first /x")

    def test_set_app_refuses_what_is_not_callable(self):
        with self.assertRaises(ConfigurationError) as caught:
            self.layer["httpd"].set_app("not an app")
        self.assertIn("WSGI_LAYER", str(caught.exception))


class SetAppLifetimeTests(unittest.TestCase):
    """What a test sets ends with the test; what a layer sets stays."""

    def test_app_set_in_a_test_is_replaced_by_the_setup_app_at_testTearDown(self):
        layer = wsgi.Layer(FIRST, name="restored_after_test")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        layer.testSetUp()
        layer["httpd"].set_app(SECOND)
        self.assertEqual(get(layer_url(layer)), b"second /")
        layer.testTearDown()
        self.assertIs(layer["httpd"].get_app(), FIRST)
        self.assertEqual(get(layer_url(layer)), b"first /")

    def test_app_set_by_a_layer_above_stays_for_every_test(self):
        http = wsgi.Layer(name="app_from_layer_above")

        class AppLayer(plone.testing.Layer):
            defaultBases = (http,)

            def setUp(self):
                self["httpd"].set_app(SECOND)

        above = AppLayer(name="sets_app")
        http.setUp()
        self.addCleanup(http.tearDown)
        above.setUp()
        for _ in range(2):
            http.testSetUp()
            above.testSetUp()
            self.assertEqual(get(layer_url(above)), b"second /")
            above.testTearDown()
            http.testTearDown()

    def test_tls_server_address_is_the_published_https_address(self):
        layer = set_up_by_hand(self, wsgi.Layer(FIRST, name="tls_address", tls=True))
        self.assertEqual(layer["httpd"].server_address, (layer["http_host"], layer["http_port"]))
        self.assertEqual(layer["httpd"].server_port, layer["http_port"])


class NoAppTests(unittest.TestCase):
    """gocept's ``wsgi.Layer()`` set up without an application."""

    def test_layer_without_app_sets_up_and_answers_503_saying_how_to_give_one(self):
        layer = set_up_by_hand(self, wsgi.Layer(name="without_app"))
        with self.assertRaises(urllib.error.HTTPError) as caught:
            get(layer_url(layer, "page"))
        self.addCleanup(caught.exception.close)
        self.assertEqual(caught.exception.code, 503)
        body = caught.exception.read().decode()
        self.assertIn("without_app", body)
        self.assertIn(f"Host: {layer['http_address']}", body)
        self.assertIn("set_app", body)
        self.assertIn("wsgi_app", body)
        layer["httpd"].set_app(FIRST)
        self.assertEqual(get(layer_url(layer, "page")), b"first /page")

    def test_503_says_when_a_base_publishes_wsgi_app_too_late(self):
        """A base that publishes wsgi_app in its testSetUp: the layer reads
        the resource in setUp, and its 503 must not tell the test to publish
        what it does publish."""

        class PerTestApp(plone.testing.Layer):
            def testSetUp(self):
                self["wsgi_app"] = FIRST

            def testTearDown(self):
                del self["wsgi_app"]

        base = PerTestApp(name="per_test_app")
        base.setUp()
        self.addCleanup(base.tearDown)
        layer = set_up_by_hand(self, wsgi.Layer(bases=(base,), name="over_per_test_app"))
        base.testSetUp()
        self.addCleanup(base.testTearDown)
        with self.assertRaises(urllib.error.HTTPError) as caught:
            get(layer_url(layer))
        self.addCleanup(caught.exception.close)
        self.assertEqual(caught.exception.code, 503)
        self.assertIn("A base layer publishes a wsgi_app resource now, but had none when this layer set up",
                      caught.exception.read().decode())

    def test_503_of_a_layer_set_up_without_its_bases_says_so(self):
        """``with`` (or setUp() by hand) sets up the layer alone: a base that
        would publish wsgi_app in its setUp never ran. The 503 told the user
        to give the layer "a wsgi_app resource of a base layer", which the
        base does; it must say that the base was not set up."""
        provider = ResourceProvider("wsgi_app", FIRST, name="app_provider_not_set_up")
        with wsgi.Layer(bases=(provider,), name="bases_not_set_up") as layer:
            with self.assertRaises(urllib.error.HTTPError) as caught:
                get(layer_url(layer))
            self.addCleanup(caught.exception.close)
            self.assertEqual(caught.exception.code, 503)
            body = caught.exception.read().decode()
        self.assertIn(f"its base layers ({provider.__module__}.{provider.__name__})", body)
        self.assertIn("set up this layer alone", body)

    def test_set_app_none_goes_back_to_503(self):
        layer = set_up_by_hand(self, wsgi.Layer(FIRST, name="set_app_none"))
        layer["httpd"].set_app(None)
        self.assertIsNone(layer["httpd"].get_app())
        with self.assertRaises(urllib.error.HTTPError) as caught:
            get(layer_url(layer))
        caught.exception.close()
        self.assertEqual(caught.exception.code, 503)

    def test_wsgi_app_attribute_set_after_a_setup_without_app(self):
        layer = set_up_by_hand(self, wsgi.Layer(name="app_attribute_later"))
        with self.assertRaises(urllib.error.HTTPError) as caught:
            get(layer_url(layer))
        caught.exception.close()
        self.assertEqual(caught.exception.code, 503)
        layer.check_server_errors()  # the next setUp forgets what this server raised
        layer.tearDown()
        layer.wsgi_app = FIRST
        set_up_by_hand(self, layer)
        self.assertEqual(get(layer_url(layer)), b"first /")


class PositionalArgumentTests(unittest.TestCase):
    """gocept's layers pass positional arguments on to plone.testing.Layer."""

    def serve(self, layer):
        set_up_by_hand(self, BASE)
        set_up_by_hand(self, layer)
        self.assertEqual(layer["from_base"], "base resource")

    def test_custom_layer_handler_bases_name(self):
        class Handler(custom.RequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"hello")

        layer = custom.Layer(Handler, (BASE,), "CUSTOM_POSITIONAL")
        self.assertEqual((layer.__bases__, layer.__name__), ((BASE,), "CUSTOM_POSITIONAL"))
        self.assertEqual(layer.__module__, __name__)
        self.serve(layer)
        self.assertEqual(get(layer_url(layer)), b"hello")

    def test_static_layer_directory_bases(self):
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "page.txt").write_text("a page")
            layer = static.Layer(directory, (BASE,), "STATIC_POSITIONAL")
            self.assertEqual(layer.__bases__, (BASE,))
            self.serve(layer)
            self.assertEqual(get(layer_url(layer, "page.txt")), b"a page")

    def test_static_layer_temporary(self):
        layer = static.Layer(static.TEMPORARY, (BASE,), "STATIC_TEMPORARY")
        self.serve(layer)
        Path(layer["documentroot"], "new.txt").write_text("new")
        self.assertEqual(get(layer_url(layer, "new.txt")), b"new")

    def test_wsgi_layer_bases_name(self):
        layer = wsgi.Layer((BASE,), "WSGI_POSITIONAL")
        self.assertEqual((layer.__bases__, layer.__name__), ((BASE,), "WSGI_POSITIONAL"))
        with self.assertRaises(TypeError):
            wsgi.Layer((BASE,), "ONE", name="TWO")
        self.assertIsNone(layer.wsgi_app)
        self.serve(layer)
        layer["httpd"].set_app(FIRST)
        self.assertEqual(get(layer_url(layer)), b"first /")

    def test_wsgi_layer_list_of_bases(self):
        layer = wsgi.Layer([BASE], name="WSGI_LIST")
        self.assertEqual(layer.__bases__, (BASE,))

    def test_wsgi_layer_app_bases_name(self):
        layer = wsgi.Layer(FIRST, (BASE,), "WSGI_APP_POSITIONAL")
        self.assertEqual((layer.__bases__, layer.__name__), ((BASE,), "WSGI_APP_POSITIONAL"))
        self.serve(layer)
        self.assertEqual(get(layer_url(layer)), b"first /")



class HTTPServerTests(unittest.TestCase):
    """gocept's custom and static layers published an ``http.server.HTTPServer``
    as ``httpd``: ``shutdown()``, socketserver's way to stop one, stopped it,
    and tests kept state of their own on it."""

    def test_shutdown_stops_the_serving_loop_and_returns(self):
        class Handler(custom.RequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        layer = set_up_by_hand(self, custom.Layer(Handler, name="shut_down_by_the_test"))
        self.assertEqual(get(layer_url(layer)), b"ok")
        check_shutdown_stops_serving(self, layer)

    def test_attributes_a_test_sets_on_the_server_are_its_own(self):
        # http.server fixtures keep their state on the server, which every
        # handler reaches as self.server: "self.server.requests.append(...)"
        # after "httpd.requests = []" is the commonest.
        class Handler(custom.RequestHandler):
            def do_POST(self):
                self.server.requests.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(204)
                self.end_headers()

        layer = set_up_by_hand(self, custom.Layer(Handler, name="state_on_the_server"))
        layer["httpd"].requests = []
        request = urllib.request.Request(layer_url(layer, "api"), data=b"payload")
        with urllib.request.urlopen(request, timeout=5) as response:
            self.assertEqual(response.status, 204)
        self.assertEqual(layer["httpd"].requests, [b"payload"])
        self.assertEqual([(each.method, each.path, each.body) for each in layer["http_requests"]],
                         [("POST", "/api", b"payload")])

    def test_state_a_test_keeps_under_any_other_name_is_its_own_too(self):
        # Names such as "activity" or "ending" are a test's to use, as on
        # gocept's HTTPServer: the server kept its own state under them, and
        # tearDown failed with a TypeError or the next request hung.
        class Handler(custom.RequestHandler):
            def do_GET(self):
                self.server.activity.append(self.path)
                self.server.ending = "seen"
                self.send_response(204)
                self.end_headers()

        layer = set_up_by_hand(self, custom.Layer(Handler, name="more_state_on_the_server"))
        layer["httpd"].activity = []
        for path in ("/a", "/b"):
            with urllib.request.urlopen(layer_url(layer, path[1:]), timeout=5) as response:
                self.assertEqual(response.status, 204)
        self.assertEqual(layer["httpd"].activity, ["/a", "/b"])
        self.assertEqual(layer["httpd"].ending, "seen")
        layer.testSetUp()
        layer.testTearDown()

    def test_a_name_the_server_calls_itself_is_refused_where_a_test_sets_it(self):
        layer = set_up_by_hand(self, custom.Layer(custom.RequestHandler, name="method_names_on_the_server"))
        with self.assertRaises(ConfigurationError) as refused:
            layer["httpd"].release = threading.Event()
        message = str(refused.exception)
        self.assertIn("method_names_on_the_server", message)
        self.assertIn("httpd.release belongs to the server itself", message)
        self.assertIn("under another name", message)
        self.assertIsNone(layer["httpd"].__dict__.get("release"))
        layer["httpd"].shutdown = lambda: None  # socketserver's: a test may replace it, as under gocept

    def test_a_handler_class_the_test_sets_on_the_server_serves_the_next_requests(self):
        # socketserver makes each connection's handler from the server's
        # RequestHandlerClass, so gocept's tests could swap it; serverlayer
        # went on serving the layer's handler, without a word.
        class Answer(custom.RequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "6")
                self.end_headers()
                self.wfile.write(b"answer")

        class Other(custom.RequestHandler):
            def handle(self):  # a handle() of its own: served on a thread of its own
                super().handle()

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"other")

        layer = set_up_by_hand(self, custom.Layer(Answer, name="handler_class_set_on_the_server"))
        self.assertEqual(get(layer_url(layer)), b"answer")
        layer["httpd"].RequestHandlerClass = Other
        self.assertIs(layer["httpd"].RequestHandlerClass, Other)
        self.assertEqual(get(layer_url(layer)), b"other")
        layer["httpd"].RequestHandlerClass = Answer
        self.assertEqual(get(layer_url(layer)), b"answer")
        with self.assertRaises(ConfigurationError) as refused:
            layer["httpd"].RequestHandlerClass = object
        self.assertIn("must be a subclass of http.server.BaseHTTPRequestHandler", str(refused.exception))

    def test_server_close_after_shutdown_refuses_new_clients(self):
        layer = set_up_by_hand(self, custom.Layer(custom.RequestHandler, name="closed_by_the_test"))
        layer["httpd"].shutdown()
        layer["httpd"].server_close()
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection((layer["http_host"], layer["http_port"]), timeout=30).close()

class WSGIServerTests(unittest.TestCase):
    """gocept's wsgi layer published wsgiref's ``WSGIServer`` as ``httpd``,
    with socketserver's ``shutdown()`` and ``server_close()``."""

    def test_shutdown_stops_the_serving_loop_and_server_close_refuses_new_clients(self):
        layer = set_up_by_hand(self, wsgi.Layer(FIRST, name="wsgi_shut_down_by_the_test"))
        self.assertEqual(get(layer_url(layer)), b"first /")
        check_shutdown_stops_serving(self, layer)
        layer["httpd"].server_close()
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection((layer["http_host"], layer["http_port"]), timeout=30).close()


def check_shutdown_stops_serving(test: unittest.TestCase, layer: plone.testing.Layer) -> None:
    """``httpd.shutdown()`` returns once the serving loop has ended, and again when called twice."""
    stopping = threading.Thread(target=layer["httpd"].shutdown, daemon=True)
    stopping.start()
    stopping.join(30)  # a bound for a hang, not a wait for readiness: it returns at once
    test.assertFalse(stopping.is_alive(), "httpd.shutdown() did not return")
    test.assertFalse(layer["httpd_thread"].is_alive())
    layer["httpd"].shutdown()  # again: returns, as socketserver's does


class StaticFileRequestHandlerTests(unittest.TestCase):
    """gocept's users subclass it and set ``documentroot`` on the class."""

    def test_subclass_with_documentroot_serves_it_from_a_custom_layer(self):
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        Path(directory.name, "index.txt").write_text("from the class")

        class Handler(static.StaticFileRequestHandler):
            documentroot = directory.name

        layer = set_up_by_hand(self, custom.Layer(Handler, name="documentroot_on_class"))
        self.assertEqual(get(layer_url(layer, "index.txt")), b"from the class")

    def test_handler_of_static_layer_knows_its_documentroot(self):
        seen = []

        class Handler(static.StaticFileRequestHandler):
            def do_GET(self):
                seen.append(self.documentroot)
                super().do_GET()

        layer = static.Layer(name="documentroot_on_handler")
        layer.request_handler = Handler
        set_up_by_hand(self, layer)
        with self.assertRaises(urllib.error.HTTPError) as caught:
            get(layer_url(layer, "missing"))
        caught.exception.close()
        self.assertEqual(seen, [layer["documentroot"]])

    def test_documentroot_a_test_sets_on_the_handler_class_serves_from_the_next_request(self):
        # gocept's handler read its class's documentroot for every request,
        # so a test could point a static layer elsewhere for a while; the
        # directory given when the layer was set up went on being served.
        other = tempfile.TemporaryDirectory()
        self.addCleanup(other.cleanup)
        Path(other.name, "file.txt").write_text("other")
        layer = set_up_by_hand(self, static.Layer(name="documentroot_set_by_a_test"))
        Path(layer["documentroot"], "file.txt").write_text("layer's")
        handler = layer["request_handler"]
        with requests.Session() as session:  # one keep-alive connection for all
            self.assertEqual(session.get(layer_url(layer, "file.txt"), timeout=5).text, "layer's")
            handler.documentroot = other.name
            self.assertEqual(session.get(layer_url(layer, "file.txt"), timeout=5).text, "other")
            handler.documentroot = layer["documentroot"]
            self.assertEqual(session.get(layer_url(layer, "file.txt"), timeout=5).text, "layer's")

    def test_a_subclass_that_translates_paths_itself_serves_what_it_names(self):
        # gocept's handler, like http.server's, serves the file its
        # translate_path names: a subclass may mount another directory.
        root, extra = tempfile.TemporaryDirectory(), tempfile.TemporaryDirectory()
        self.addCleanup(root.cleanup)
        self.addCleanup(extra.cleanup)
        Path(root.name, "page.txt").write_text("from the root")
        Path(extra.name, "fixture.txt").write_text("from the mounted directory")

        class Handler(static.StaticFileRequestHandler):
            documentroot = root.name

            def translate_path(self, path):
                if path.startswith("/extra/"):
                    return os.path.join(extra.name, path[len("/extra/"):])
                return super().translate_path(path)

        layer = set_up_by_hand(self, custom.Layer(Handler, name="translating_handler"))
        self.assertEqual(get(layer_url(layer, "page.txt")), b"from the root")
        self.assertEqual(get(layer_url(layer, "extra/fixture.txt")), b"from the mounted directory")
        for escape in ("../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "a%00b"):
            with self.subTest(escape=escape), self.assertRaises(urllib.error.HTTPError) as caught:
                get(layer_url(layer, escape))
            caught.exception.close()
            self.assertEqual(caught.exception.code, 404)

    def test_a_subclass_reads_what_send_head_returns_as_a_file(self):
        # http.server's send_head returns the open file, which subclasses
        # read: a copyfile of their own (a slow link), or a do_GET that
        # changes what it sends.
        class SlowLink(static.StaticFileRequestHandler):
            def copyfile(self, source, outputfile):
                while chunk := source.read(1000):
                    outputfile.write(chunk)

        class Shouting(static.StaticFileRequestHandler):
            def do_GET(self):
                file = self.send_head()
                if file:
                    try:
                        self.wfile.write(file.read().upper())
                    finally:
                        file.close()

        text = "".join(f"line {number}\n" for number in range(2000))
        for handler, expected in ((SlowLink, text.encode()), (Shouting, text.upper().encode())):
            with self.subTest(handler=handler.__name__):
                layer = static.Layer(name=f"reading_{handler.__name__}")
                layer.request_handler = type(handler.__name__, (handler,), {})
                set_up_by_hand(self, layer)
                Path(layer["documentroot"], "page.txt").write_text(text)
                self.assertEqual(get(layer_url(layer, "page.txt")), expected)
                request = urllib.request.Request(layer_url(layer, "page.txt"), headers={"Range": "bytes=5-14"})
                self.assertEqual(get(request), expected[5:15])
                request.add_header("Range", "bytes=0-3,10-12")
                with urllib.request.urlopen(request, timeout=5) as response:
                    parts = response.read()
                self.assertIn(b"content-range: bytes 0-3/", parts.lower())  # Shouting's are upper case
                self.assertIn(b"\r\n\r\n" + expected[0:4] + b"\r\n", parts)
                self.assertIn(b"\r\n\r\n" + expected[10:13] + b"\r\n", parts)

    def test_a_partial_of_a_handler_class_serves_as_under_http_server(self):
        # Python's documentation makes a SimpleHTTPRequestHandler serve a
        # directory with functools.partial(..., directory=...); gocept's
        # layer calls whatever it is given, as HTTPServer does.
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        Path(directory.name, "page.txt").write_text("from the partial")

        class Quiet(custom.RequestHandler, SimpleHTTPRequestHandler):
            pass

        handler = functools.partial(Quiet, directory=directory.name)
        layer = set_up_by_hand(self, custom.Layer(handler, name="partial_handler"))
        self.assertIs(layer["request_handler"], handler)
        self.assertEqual(get(layer_url(layer, "page.txt")), b"from the partial")
        self.assertEqual(get(layer_url(layer, "page.txt")), b"from the partial")
        self.assertEqual([str(request) for request in layer["http_requests"]], ["GET /page.txt"] * 2)

    def test_a_partial_with_positional_arguments_is_refused_saying_why(self):
        handler = functools.partial(custom.RequestHandler, "extra")
        with self.assertRaises(ConfigurationError) as caught:
            custom.Layer(handler, name="partial_positional")
        self.assertIn("keyword arguments", str(caught.exception))

    def test_without_documentroot_the_request_fails_the_test_with_the_fix(self):
        layer = set_up_by_hand(self, custom.Layer(static.StaticFileRequestHandler, name="no_documentroot"))
        with self.assertRaises((urllib.error.URLError, ConnectionError)):
            get(layer_url(layer, "x"))
        [error] = layer.server_errors.take()
        self.assertIn("has no directory to serve", error)
        self.assertIn("documentroot", error)


class GoceptSeleniumHandler(WSGIRequestHandler):
    """What gocept.selenium 7.1's ``wsgi.LogWSGIRequestHandler`` does (it is
    only installed with the browser extra, so it is restated here)."""

    def log_request(self, *args):
        if "GOCEPT_SELENIUM_VERBOSE_LOGGING" in os.environ:
            WSGIRequestHandler.log_request(self, *args)


class RequestHandlerClassTests(unittest.TestCase):
    """``request_handler_class`` decides about request logging, as it did."""

    def exercise(self, layer, environment):
        stderr = io.StringIO()
        with mock.patch.dict(os.environ, environment), redirect_stderr(stderr):
            for name in ("SERVERLAYER_VERBOSE", "GOCEPT_HTTP_VERBOSE_LOGGING", "GOCEPT_SELENIUM_VERBOSE_LOGGING"):
                if name not in environment:
                    os.environ.pop(name, None)
            set_up_by_hand(self, layer)
            get(layer_url(layer, "logged?q=1"))
            layer.check_server_errors()  # a test may set the layer up again, which forgets them
            layer.tearDown()  # and what stopping prints, if anything
        return stderr.getvalue()

    def test_gocept_selenium_handler_logs_under_its_variable_only(self):
        class SeleniumLayer(wsgi.Layer):
            request_handler_class = GoceptSeleniumHandler

        layer = SeleniumLayer(FIRST, name="selenium_logging")
        self.assertEqual(self.exercise(layer, {}), "")
        output = self.exercise(layer, {"GOCEPT_SELENIUM_VERBOSE_LOGGING": "1"})
        self.assertRegex(output, r'^127\.0\.0\.1 - - \[.+\] "GET /logged\?q=1 HTTP/1\.1" 200 13\n$')

    def test_default_handler_logs_under_gocept_variable(self):
        self.assertIs(wsgi.Layer.request_handler_class, wsgi.LogWSGIRequestHandler)
        output = self.exercise(wsgi.Layer(FIRST, name="gocept_logging"), {"GOCEPT_HTTP_VERBOSE_LOGGING": "1"})
        self.assertIn('"GET /logged?q=1 HTTP/1.1" 200 13', output)

    def test_gocept_httpserverlayers_own_handler_class_logs(self):
        import gocept.httpserverlayer.wsgi

        layer = wsgi.Layer(FIRST, name="gocept_handler_class")
        layer.request_handler_class = gocept.httpserverlayer.wsgi.LogWSGIRequestHandler
        output = self.exercise(layer, {"GOCEPT_HTTP_VERBOSE_LOGGING": "1"})
        self.assertIn('"GET /logged?q=1 HTTP/1.1" 200 13', output)

    def test_subclass_with_logging_turned_on(self):
        class AlwaysLog(wsgi.LogWSGIRequestHandler):
            def log_request(self, code="-", size="-"):
                WSGIRequestHandler.log_request(self, code, size)

        layer = wsgi.Layer(FIRST, name="always_log")
        layer.request_handler_class = AlwaysLog
        output = self.exercise(layer, {})
        self.assertIn('"GET /logged?q=1 HTTP/1.1" 200 13', output)

    def test_the_logged_size_is_the_body_sent_streamed_or_from_a_file_too(self):
        logged = []

        class Sizes(wsgi.LogWSGIRequestHandler):
            def log_request(self, code="-", size="-"):
                logged.append((self.path, size))

        def app(environ, start_response):
            start_response("200 OK", [])
            if environ["PATH_INFO"] == "/file":
                return environ["wsgi.file_wrapper"](io.BytesIO(b"f" * 1000))
            return (b"g" * 100 for _ in range(10))  # no length: chunked

        layer = wsgi.Layer(app, name="logged_sizes")
        layer.request_handler_class = Sizes
        set_up_by_hand(self, layer)
        for path in ("/stream", "/file"):
            with urllib.request.urlopen(layer["http_url"] + path.lstrip("/"), timeout=5) as response:
                self.assertEqual(len(response.read()), 1000)
        layer.check_server_errors()  # the log is written as each request ends
        # In either order: the client may have the whole first response, and
        # the second request be answered by another thread, before the
        # first request's worker writes its log line.
        self.assertEqual(sorted(logged), [("/file", 1000), ("/stream", 1000)])

    def test_handler_overriding_more_than_logging_is_refused_at_setup(self):
        class Environ(wsgi.LogWSGIRequestHandler):
            def get_environ(self):
                return {}

        layer = wsgi.Layer(FIRST, name="overrides_get_environ")
        layer.request_handler_class = Environ
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn("overrides_get_environ", message)
        self.assertIn("get_environ", message)
        self.assertIn("middleware", message)
        self.assertNotIn("httpd", layer._resources)

    def test_handler_class_must_be_a_wsgi_request_handler(self):
        layer = wsgi.Layer(FIRST, name="not_a_wsgi_handler")
        layer.request_handler_class = custom.RequestHandler
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("LogWSGIRequestHandler", str(caught.exception))


class AsAUserRunsItTests(unittest.TestCase):
    """A gocept-style test module, run by zope.testrunner in its own process."""

    def test_one_server_for_the_run_and_an_app_per_test(self):
        result = run_example_modules({"test_swap.py": SWAP_MODULE})
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("Ran 3 tests with 0 failures, 0 errors and 0 skipped", result.stdout)


SWAP_MODULE = '''
import unittest
import urllib.error
import urllib.request

from serverlayer import wsgi

HTTP_LAYER = wsgi.Layer()


def app(text):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [text.encode()]
    return app


def get(layer):
    with urllib.request.urlopen("http://%s/" % layer["http_address"], timeout=5) as response:
        return response.read()


class Tests(unittest.TestCase):
    layer = HTTP_LAYER

    def test_1_sets_an_app(self):
        self.layer["httpd"].set_app(app("one"))
        self.assertEqual(get(self.layer), b"one")

    def test_2_has_none_again(self):
        with self.assertRaises(urllib.error.HTTPError) as caught:
            get(self.layer)
        caught.exception.close()
        self.assertEqual(caught.exception.code, 503)

    def test_3_sets_another(self):
        self.layer["httpd"].set_app(app("three"))
        self.assertEqual(get(self.layer), b"three")
'''
