"""The wsgi layer: real HTTP/1.1 from waitress, used as a test would."""

from __future__ import annotations

import functools
import gc
import http.client
import io
import os
import select
import socket
import struct
import threading
import time
import unittest
import urllib.error
import urllib.request
import warnings
import wsgiref.util
from collections.abc import Callable
from contextlib import redirect_stderr
from typing import Any
from unittest import mock

from serverlayer import ConfigurationError, wsgi
from serverlayer.tests.helpers import (
    AcceptorChecks,
    ResourceProvider,
    Watched,
    client_connections,
    failures_in_threads,
    get_closing,
    reader_that_stops,
    set_up_by_hand,
    until,
)
from serverlayer.tests.test_hardening import read_until_closed
from serverlayer.tests.test_tls_front import ipv6_loopback


def echo_app(environ, start_response):
    """Answers with what the server told the app about the request."""
    if environ["PATH_INFO"] == "/chunked":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (part for part in (b"first ", b"second ", b"third"))
    if environ["PATH_INFO"] in ("/204", "/304"):
        start_response(f"{environ['PATH_INFO'][1:]} Nothing", [])
        return []
    body = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} from port {environ['REMOTE_PORT']}"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


HTTP_LAYER = wsgi.Layer(echo_app, name="HTTP_LAYER")


class ServerNameTests(unittest.TestCase):
    def test_an_application_without_a_host_header_sees_the_layers_host(self):
        """As under gocept's wsgiref server; waitress says waitress.invalid."""
        def application_uri(environ, start_response):
            body = wsgiref.util.application_uri(environ).encode()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]

        hosts = ["127.0.0.1", "::1"] if ipv6_loopback() else ["127.0.0.1"]
        for host in hosts:
            layer = set_up_by_hand(self, wsgi.Layer(application_uri, name=f"wsgi_server_name_{len(host)}", host=host))
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no Host header
                answer = read_until_closed(sock)
            self.assertTrue(answer.endswith(layer["http_url"].encode()), answer)


class KeepAliveAndChunkingTests(unittest.TestCase):
    layer = HTTP_LAYER

    def test_many_requests_reuse_one_connection(self):
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        client_ports = set()
        for number in range(20):
            connection.request("GET", f"/{number}")
            response = connection.getresponse()
            body = response.read().decode()
            self.assertEqual(response.status, 200)
            self.assertTrue(body.startswith(f"GET /{number} from port "), body)
            client_ports.add(body.rsplit(" ", 1)[1])
            self.assertFalse(response.will_close)
        self.assertEqual(len(client_ports), 1, "every request should arrive on the same connection")

    def test_response_without_length_is_chunked(self):
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/chunked")
        response = connection.getresponse()
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(response.read(), b"first second third")
        connection.request("GET", "/after-chunked")  # the connection is still usable
        self.assertTrue(connection.getresponse().read().startswith(b"GET /after-chunked"))

    def test_responses_whose_end_the_client_knows_keep_the_connection(self):
        # waitress closed it after each response without a Content-Length.
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.connect()
        connection.auto_open = 0  # a second connection would raise NotConnected

        def port() -> str:
            connection.request("GET", "/port")
            return connection.getresponse().read().decode().rsplit(" ", 1)[1]

        first = port()
        for path, status, body in (("/chunked", 200, b"first second third"), ("/204", 204, b""), ("/304", 304, b"")):
            with self.subTest(path=path):
                connection.request("GET", path)
                response = connection.getresponse()
                self.assertEqual((response.status, response.read()), (status, body))
                self.assertFalse(response.will_close)
                self.assertIsNone(response.getheader("Connection"))
                self.assertEqual(port(), first)
        for options in ("close", "keep-alive, close"):  # unless the client says so
            with self.subTest(options=options):
                connection.request("GET", "/chunked", headers={"Connection": options})
                response = connection.getresponse()
                self.assertTrue(response.will_close)
                self.assertEqual(response.read(), b"first second third")
                connection.close()
                connection.connect()

    def test_a_request_with_both_transfer_encoding_and_content_length_ends_its_connection(self):
        # RFC 9112 section 6.1: it may be an attempt at request smuggling.
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"POST /both HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
                         b"\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
            received = read_until_closed(sock)
        self.assertIn(b"\r\nConnection: close\r\n", received)
        self.assertIn(b"POST /both", received)
        self.assertNotIn(b"/smuggled", received)

    def test_an_http_10_request_with_transfer_encoding_is_refused(self):
        # RFC 9112 section 6.1: its framing is faulty. waitress read the body
        # by Content-Length alone, and the chunks as the next request.
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"POST /ten HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
                         b"\r\n3\r\nabc\r\n0\r\n\r\n")
            received = read_until_closed(sock)
        self.assertTrue(received.startswith(b"HTTP/1.0 400 Bad Request\r\n"), received)
        self.assertIn(b"\r\nConnection: close\r\n", received)
        self.assertNotIn(b"Keep-Alive", received)  # waitress said both
        self.assertIn(b"HTTP/1.0 request has no Transfer-Encoding", received)
        self.assertEqual(received.count(b"(generated by waitress)"), 1, received)  # no answer to the chunks
        self.assertEqual(len(self.layer["http_requests"]), 0)  # the application never saw it

    def test_a_file_wrapper_sends_no_body_with_head_204_or_304(self):
        # waitress hands a wsgi.file_wrapper to its channel whole, past what
        # leaves out such bodies: the client read the file as the next answer.
        def app(environ, start_response):
            status = {"/204": "204 No Content", "/304": "304 Not Modified"}.get(environ["PATH_INFO"], "200 OK")
            start_response(status, [("Content-Type", "text/plain")])
            return environ["wsgi.file_wrapper"](io.BytesIO(b"the file's bytes"))

        layer = set_up_by_hand(self, wsgi.Layer(app, name="file_wrapper_bodiless"))
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            # Pipelined: http.client happens to drop bytes that follow a
            # bodiless answer in its buffer, a raw reader sees them.
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /304 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = read_until_closed(sock)
        self.assertEqual(received.count(b"the file's bytes"), 1, received)  # the last GET's body alone
        self.assertTrue(received.endswith(b"\r\n\r\nthe file's bytes"), received)
        self.assertEqual(received.count(b"HTTP/1.1 "), 4, received)

    def test_head_gets_no_body_and_the_connection_stays_in_step(self):
        # waitress sends the application's body in answer to HEAD too, and
        # the client takes it for the start of the next response.
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /then-get HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = read_until_closed(sock)
        head, _, rest = received.partition(b"\r\n\r\n")
        self.assertTrue(rest.startswith(b"HTTP/1.1 200 OK\r\n"), received)  # nothing between the two
        body = rest.partition(b"\r\n\r\n")[2]
        self.assertTrue(body.startswith(b"GET /then-get from port "), body)
        # The head tells the length a GET of /head gets.
        self.assertIn(b"\r\nContent-Length: %d\r\n" % (len(body) - len(b"GET /then-get") + len(b"HEAD /head")), head)

    def test_head_of_a_response_without_length_has_no_body(self):
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"HEAD /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = read_until_closed(sock)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
        self.assertIn(b"\r\nTransfer-Encoding: chunked\r\n", received)  # as a GET's
        self.assertEqual(received.partition(b"\r\n\r\n")[1:], (b"\r\n\r\n", b""))  # nothing after the head

    def test_serves_http_1_1(self):
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("HEAD", "/")
        response = connection.getresponse()
        self.assertEqual(response.version, 11)
        self.assertEqual(response.read(), b"")


class ConcurrencyTests(unittest.TestCase):

    def test_requests_run_at_the_same_time(self):
        arrived = threading.Barrier(4, timeout=5)

        def waits_for_three_others(environ, start_response):
            arrived.wait()  # only returns once four requests are inside the app at once
            start_response("200 OK", [])
            return [b"together"]

        layer = set_up_by_hand(self, wsgi.Layer(waits_for_three_others, name="concurrent"))
        results = []

        def fetch():
            with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
                results.append(response.read())

        clients = [threading.Thread(target=fetch) for _ in range(4)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(10)
        self.assertEqual(results, [b"together"] * 4)

    def test_app_calling_its_own_server_does_not_deadlock(self):
        layer: wsgi.Layer

        def calls_itself(environ, start_response):
            depth = int(environ["PATH_INFO"].strip("/") or 0)
            if depth < 3:
                with urllib.request.urlopen(f"{layer['http_url']}{depth + 1}", timeout=5) as response:
                    inner = response.read()
            else:
                inner = b"bottom"
            start_response("200 OK", [])
            return [b"%d>" % depth + inner]

        layer = set_up_by_hand(self, wsgi.Layer(calls_itself, name="calls_itself"))
        with urllib.request.urlopen(layer["http_url"], timeout=10) as response:
            self.assertEqual(response.read(), b"0>1>2>3>bottom")


class AppSourceTests(unittest.TestCase):

    def test_uncallable_app(self):
        layer = wsgi.Layer("not an app", name="uncallable_app")
        with self.assertRaises(ConfigurationError):
            layer.setUp()

    def test_an_asgi_application_is_refused_with_a_pointer_to_the_asgi_layer(self):
        # It was served: setUp passed, and every request got a 500 and
        # "app() missing 1 required positional argument: 'send'" (a
        # coroutine function), or a coroutine never awaited (an object).
        async def asgi_app(scope, receive, send):
            pass

        class ASGIObject:
            async def __call__(self, scope, receive, send):
                pass

        for app in (asgi_app, ASGIObject()):
            layer = wsgi.Layer(app, name="given_asgi")
            with self.assertRaises(ConfigurationError) as refused:
                layer.setUp()
            self.assertIn("is an ASGI application, which a WSGI server cannot call."
                          " Serve it with serverlayer.asgi.Layer", str(refused.exception))
            self.assertNotIn("http_port", layer)
        layer = set_up_by_hand(self, wsgi.Layer(echo_app, name="given_asgi_later"))
        with self.assertRaises(ConfigurationError) as refused:
            layer["httpd"].set_app(asgi_app)
        self.assertIn("Serve it with serverlayer.asgi.Layer", str(refused.exception))

    def test_app_from_class_attribute(self):
        class AppLayer(wsgi.Layer):
            wsgi_app = staticmethod(echo_app)

        layer = set_up_by_hand(self, AppLayer(name="app_attribute"))
        with urllib.request.urlopen(layer["http_url"] + "attr", timeout=5) as response:
            self.assertTrue(response.read().startswith(b"GET /attr"))

    def test_a_function_as_class_attribute_without_staticmethod_is_refused_at_set_up(self):
        class Forgetful(wsgi.Layer):
            wsgi_app = echo_app  # bound to the layer: called with it as the environ

        with self.assertRaises(ConfigurationError) as refused:
            Forgetful(name="forgot_staticmethod").setUp()
        self.assertIn("Write wsgi_app = staticmethod(echo_app) in the class", str(refused.exception))

        class Publisher(wsgi.Layer):  # a method of the layer's own is fine
            def wsgi_app(self, environ, start_response):
                return echo_app(environ, start_response)

        layer = set_up_by_hand(self, Publisher(name="app_method"))
        with urllib.request.urlopen(layer["http_url"] + "method", timeout=5) as response:
            self.assertTrue(response.read().startswith(b"GET /method"))

        class Wrapped(wsgi.Layer):  # a method dressed as the application it calls
            @functools.wraps(echo_app)
            def wsgi_app(self, environ, start_response):
                return echo_app(environ, start_response)

        set_up_by_hand(self, Wrapped(name="app_method_wrapped"))

    def test_wsgi_app_resource_of_a_base_layer_wins(self):
        def resource_app(environ, start_response):
            start_response("200 OK", [])
            return [b"from the resource"]

        provider = ResourceProvider("wsgi_app", resource_app, name="app_provider")
        layer = wsgi.Layer(echo_app, bases=(provider,), name="resource_wins")
        set_up_by_hand(self, provider)
        set_up_by_hand(self, layer)
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"from the resource")


class BodyMismatchTests(unittest.TestCase):
    """An application whose body does not fit its response: waitress sends
    other bytes than it meant and only warns, so the layer reports it."""

    def serve(self, status: str, headers: list, body: list):
        def app(environ, start_response):
            start_response(status, headers)
            return body

        return set_up_by_hand(self, wsgi.Layer(app, name=f"mismatch_{self._testMethodName}"))

    def test_a_body_longer_than_its_content_length_is_an_error(self):
        layer = self.serve("200 OK", [("Content-Length", "3")], [b"abcdefgh"])
        with urllib.request.urlopen(layer["http_url"] + "long", timeout=5) as response:
            self.assertEqual(response.read(), b"abc")  # what the client got
        [error] = layer.server_errors.take()
        self.assertIn("GET /long: the application sent more than the 3 bytes its Content-Length header announced",
                      error)

    def test_a_body_shorter_than_its_content_length_is_an_error(self):
        layer = self.serve("200 OK", [("Content-Length", "10")], [b"abc"])
        with self.assertRaises(http.client.IncompleteRead):
            with urllib.request.urlopen(layer["http_url"] + "short", timeout=5) as response:
                response.read()
        [error] = layer.server_errors.take()
        self.assertIn("GET /short: the application's body ended after 3 of the 10 bytes", error)

    def test_a_body_with_204_is_an_error(self):
        layer = self.serve("204 No Content", [], [b"oops"])
        with urllib.request.urlopen(layer["http_url"] + "none", timeout=5) as response:
            self.assertEqual(response.read(), b"")
        [error] = layer.server_errors.take()
        self.assertIn("GET /none: the application sent a body with 204 No Content, which has none", error)

    def test_a_status_that_is_no_http_status_is_an_error(self):
        """waitress sends any status it is given: "2000 OK" made the status
        line "HTTP/1.1 2000 OK", which clients cannot read (wsgiref, under
        gocept's layer, refused it)."""
        for status in ("2000 OK", "OK", "20x Fine"):
            layer = self.serve(status, [("Content-Length", "2")], [b"ok"])
            with self.assertRaises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(layer["http_url"] + "status", timeout=5)
            answer.exception.close()
            self.assertEqual(answer.exception.code, 500, status)
            [error] = layer.server_errors.take()
            self.assertIn(f"the application's status {status!r} is no HTTP status", error)

    def test_a_body_returned_as_bytes_or_str_is_an_error_that_says_so(self):
        """``return body`` instead of ``return [body]``: waitress iterated
        the bytes and failed with "object of type 'int' has no len()"."""
        for body in (b"abc", "abc"):
            layer = self.serve("200 OK", [("Content-Type", "text/plain")], body)  # type: ignore[arg-type]
            with self.assertRaises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(layer["http_url"], timeout=5)
            answer.exception.close()
            self.assertEqual(answer.exception.code, 500)
            [error] = layer.server_errors.take()
            self.assertIn(f"returned a {type(body).__name__} as its body, where PEP 3333 wants an iterable of"
                          " bytes", error)

    def test_a_body_part_that_is_no_bytes_is_an_error_that_says_so(self):
        """waitress failed with "can't concat str to bytes" (or "can only
        concatenate str (not "bytes") to str", or of a memoryview), about
        its own code rather than the application's body."""
        for headers, body in (
            ([("Content-Length", "5")], iter(["hello"])),
            ([], iter(["hello"])),
            ([], [b"ok", memoryview(b"view")]),
        ):
            layer = self.serve("200 OK", headers, body)
            with self.assertRaises((urllib.error.HTTPError, http.client.HTTPException)) as answer:
                with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
                    response.read()
            if isinstance(answer.exception, urllib.error.HTTPError):
                answer.exception.close()
            [error] = layer.server_errors.take()
            kind = "str" if headers or isinstance(body, type(iter([]))) else "memoryview"
            self.assertIn(f"the application's body gave a {kind} (", error)
            self.assertIn("where PEP 3333 wants bytes", error)

    def test_a_header_or_status_outside_latin_1_is_an_error_that_names_it(self):
        """waitress failed with "'latin-1' codec can't encode characters in
        position 99-100" of the whole head, which names no header."""
        for status, headers, named in (
            ("200 OK", [("X-Name", "\u65e5\u672c"), ("Content-Length", "2")], "header X-Name: '\u65e5\u672c'"),
            ("200 \u2713", [("Content-Length", "2")], "status '200 \u2713'"),
        ):
            layer = self.serve(status, headers, [b"ok"])
            with self.assertRaises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(layer["http_url"], timeout=5)
            answer.exception.close()
            self.assertEqual(answer.exception.code, 500)
            [error] = layer.server_errors.take()
            self.assertIn(f"the application's {named} is not latin-1", error)

    def test_a_status_without_a_reason_is_no_error(self):
        layer = self.serve("200", [("Content-Length", "2")], [b"ok"])
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual((response.status, response.read()), (200, b"ok"))
        self.assertEqual(layer.server_errors.take(), [])

    def test_a_304_announcing_the_length_of_the_200_is_no_error(self):
        # RFC 9110 section 8.6: a 304 may carry the Content-Length a 200 would.
        layer = self.serve("304 Not Modified", [("Content-Length", "1234"), ("ETag", '"v1"')], [])
        with self.assertRaises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(layer["http_url"], timeout=5)
        self.assertEqual(answer.exception.code, 304)
        answer.exception.close()
        self.assertEqual(layer.server_errors.take(), [])

    def test_a_body_stopped_because_its_client_left_is_no_error(self):
        left = threading.Event()

        def app(environ, start_response):
            gone = environ["waitress.client_disconnected"]
            start_response("200 OK", [("Content-Length", str(1000 * 65536))])

            def body():
                yield b"z" * 65536
                deadline = time.monotonic() + 5
                while not gone() and time.monotonic() < deadline:
                    time.sleep(0.001)  # the next chunk takes long to make
                left.set()  # waitress's way: stop making what no client reads

            return body()

        layer = set_up_by_hand(self, wsgi.Layer(app, name="stops_for_a_client_gone"))
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as client:
            client.sendall(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(client.recv(65536).startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(left.wait(5))
        self.assertEqual(layer.server_errors.take(), [])

    def test_a_client_that_ended_its_side_then_reset_is_gone_for_the_application(self):
        """The client's end of the stream (a half-close, as ``nc -N`` sends)
        leaves the connection open for the answer; its reset afterwards (it
        closed with the answer unread) is the client gone."""
        left = threading.Event()
        first_chunk_sent = threading.Event()

        def app(environ, start_response):
            gone = environ["waitress.client_disconnected"]
            start_response("200 OK", [("Content-Length", str(1000 * 65536))])

            def body():
                yield b"z" * 65536
                first_chunk_sent.set()
                deadline = time.monotonic() + 5
                while not gone() and time.monotonic() < deadline:
                    time.sleep(0.001)  # the next chunk takes long to make
                if gone():
                    left.set()

            return body()

        layer = set_up_by_hand(self, wsgi.Layer(app, name="gone_after_its_end"))
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        with client:
            client.sendall(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(client.recv(100).startswith(b"HTTP/1.1 200 OK"))
            self.assertTrue(first_chunk_sent.wait(5))
            client.shutdown(socket.SHUT_WR)
            channels = [each for each in layer["httpd"]._map.values() if hasattr(each, "client_done")]
            deadline = time.monotonic() + 5  # bounded: until the server has read the end
            while not all(channel.client_done for channel in channels) and time.monotonic() < deadline:
                time.sleep(0.001)
            self.assertTrue(all(channel.client_done for channel in channels))
        # Closed with the answer unread: a reset.
        self.assertTrue(left.wait(5))
        self.assertEqual(layer.server_errors.take(), [])

    def test_a_body_begun_with_the_write_callable_then_returned_in_a_list_is_no_error(self):
        """PEP 3333's ``write`` callable, then the rest as a list of one item:
        waitress took that item's length for a Content-Length the head,
        already sent without one, never announced; the layer reported an
        application sending too few bytes, and closed the connection."""

        def app(environ, start_response):
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"written ")
            return [b"returned"]

        layer = set_up_by_hand(self, wsgi.Layer(app, name="write_then_list"))
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for _ in range(2):  # the connection stays open for the next request
            connection.request("GET", "/")
            with connection.getresponse() as response:
                self.assertEqual(response.read(), b"written returned")
                self.assertFalse(response.will_close)
        self.assertEqual(layer.server_errors.take(), [])

    def test_a_file_wrapper_after_the_write_callable_is_sent_as_a_chunk(self):
        """The head went out chunked (``write``, no Content-Length); waitress
        then sent the file wrapper's bytes raw, without a chunk's framing,
        and the client could not read the answer."""

        def app(environ, start_response):
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"written ")
            return environ["wsgi.file_wrapper"](io.BytesIO(b"from a file"))

        layer = set_up_by_hand(self, wsgi.Layer(app, name="write_then_file"))
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for _ in range(2):
            connection.request("GET", "/")
            with connection.getresponse() as response:
                self.assertEqual(response.read(), b"written from a file")
        self.assertEqual(layer.server_errors.take(), [])

    def test_a_head_request_and_a_fitting_body_are_no_error(self):
        layer = self.serve("200 OK", [("Content-Length", "3")], [b"a", b"bc"])
        for method in ("GET", "HEAD"):
            request = urllib.request.Request(layer["http_url"], method=method)
            with urllib.request.urlopen(request, timeout=5) as response:
                self.assertEqual(response.read(), b"abc" if method == "GET" else b"")
        self.assertEqual(layer.server_errors.take(), [])


class UploadLeftTests(unittest.TestCase):
    """A client that leaves in the middle of a large upload."""

    def test_the_part_of_the_body_that_came_is_closed(self):
        """waitress keeps a large body in a temporary file as it arrives,
        and closed it only with a whole request: one whose client left
        halfway was left to the garbage collector, a ResourceWarning
        (an error under ``python -W error``) at some later test."""
        layer = wsgi.Layer(echo_app, name="upload_left")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            layer.setUp()
            try:
                for framing in (b"Content-Length: 50000000", b"Transfer-Encoding: chunked"):
                    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as client:
                        client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
                        part = b"x" * 1_000_000  # far above what waitress keeps in memory
                        client.sendall(b"F4240\r\n" + part + b"\r\n" if b"chunked" in framing else part)
                # The server's answer to a whole request on a new connection:
                # it has read the others' ends by then (one loop, in order).
                with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
                    response.read()
            finally:
                layer.tearDown()
            gc.collect()
        self.assertEqual([str(each.message) for each in caught if each.category is ResourceWarning], [])


    @unittest.skipUnless(hasattr(select, "EPOLLEXCLUSIVE"), "the acceptor needs epoll's EPOLLEXCLUSIVE (Linux)")
    def test_the_part_that_came_of_a_request_the_acceptor_waits_for_is_closed_by_the_stop(self):
        layer = wsgi.Layer(echo_app, name="upload_waited_for")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            layer.setUp()
            try:
                server = layer["httpd"]
                with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as client:
                    client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
                    client.sendall(b"x" * 1_000_000)
                    # The acceptor read it all (far above what waitress keeps
                    # in memory), and waits for the rest (no other connection
                    # comes, which would send this one to the loop).
                    def read_all() -> bool:
                        request = getattr(server.pending, "request", None)
                        return getattr(getattr(request, "body_rcv", None), "remain", None) == 49_000_000

                    self.assertTrue(until(read_all))
                    layer.tearDown()
            finally:
                if "httpd" in layer:
                    layer.tearDown()
            gc.collect()
        self.assertEqual([str(each.message) for each in caught if each.category is ResourceWarning], [])


class FixupMiddlewareTests(unittest.TestCase):

    def serve(self, app):
        return set_up_by_hand(self, wsgi.Layer(app, name=f"fixup_{self._testMethodName}"))

    def test_hop_by_hop_headers_fail_without_it(self):
        def sends_connection_header(environ, start_response):
            start_response("200 OK", [("connection", "close"), ("X-Kept", "yes")])
            return [b"body"]

        layer = self.serve(sends_connection_header)
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(layer["http_url"], timeout=5)
        self.assertEqual(caught.exception.code, 500)
        [error] = layer.server_errors.take()
        self.assertIn("hop-by-hop", error)

    def test_strips_hop_by_hop_headers_whatever_their_case(self):
        def sends_connection_headers(environ, start_response):
            start_response(
                "200 OK",
                [("connection", "close"), ("Keep-Alive", "timeout=5"), ("TRANSFER-ENCODING", "identity"),
                 ("X-Kept", "yes")],
            )
            return [b"body"]

        layer = self.serve(wsgi.FixupMiddleware(sends_connection_headers))
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"body")
            self.assertEqual(response.headers["X-Kept"], "yes")
            self.assertIsNone(response.headers["Keep-Alive"])
        self.assertEqual(layer.server_errors.take(), [])

    def test_passes_exc_info_only_when_given(self):
        calls = []

        def two_argument_start_response(status, headers):
            calls.append((status, headers))

        def three_argument_start_response(status, headers, exc_info=None):
            calls.append((status, headers, exc_info))

        def app(environ, start_response):
            start_response("200 OK", [("Upgrade", "h2c"), ("X-Kept", "1")])
            return []

        def failing_app(environ, start_response):
            try:
                raise ValueError("oops")
            except ValueError:
                import sys
                start_response("500 Internal Server Error", [("Connection", "close")], sys.exc_info())
            return []

        wsgi.FixupMiddleware(app)({}, two_argument_start_response)
        wsgi.FixupMiddleware(failing_app)({}, three_argument_start_response)
        self.assertEqual(calls[0], ("200 OK", [("X-Kept", "1")]))
        self.assertEqual(calls[1][:2], ("500 Internal Server Error", []))
        self.assertIs(calls[1][2][0], ValueError)


class QuietnessTests(unittest.TestCase):

    def exercise(self):
        def failing_app(environ, start_response):
            raise RuntimeError("logged?")

        layer = wsgi.Layer(failing_app, name=f"quiet_{self._testMethodName}")
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            set_up_by_hand(self, layer)
            with self.assertRaises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(layer["http_url"] + "path", timeout=5)
            caught.exception.close()
            self.assertEqual(caught.exception.code, 500)
            [error] = layer.server_errors.take()  # provoked: reported, not printed
            self.assertIn("RuntimeError: logged?", error)
            layer.tearDown()  # and what stopping prints, if anything
        return stderr.getvalue()

    def test_nothing_reaches_the_terminal_by_default(self):
        with mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            os.environ.pop("GOCEPT_HTTP_VERBOSE_LOGGING", None)
            self.assertEqual(self.exercise(), "")

    def test_verbose_variable_logs_requests_and_errors(self):
        with mock.patch.dict(os.environ, {"SERVERLAYER_VERBOSE": "1"}):
            output = self.exercise()
        self.assertIn('"GET /path HTTP/1.1" 500', output)
        self.assertIn("RuntimeError: logged?", output)





def stream_after(go: threading.Event) -> Callable[..., Any]:
    """An application that streams a few bytes, then, once ``go`` is set,
    128 MiB: more than a client that stopped reading leaves room for."""

    def late_stream(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            yield b"first"
            go.wait(10)
            for _ in range(2000):
                yield bytes(65536)

        return body()

    return late_stream


def next_test(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"next test"]


class ClientThatStopsReadingTests(unittest.TestCase):
    """A client that stops reading a long streamed answer (a page left open
    with its media half loaded) does not hold up every test's end."""

    def test_the_test_end_cuts_the_stream(self):
        def stream(environ, start_response):
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return (bytes(65536) for _ in range(2000))  # 128 MiB, far more than any buffer

        layer = set_up_by_hand(self, wsgi.Layer(stream, name="wsgi_stalled_reader"))
        reader_that_stops(self, layer, "/")
        httpd = layer["httpd"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(  # until the worker waits for room
            channel.outbuf_lock.waiting for channel in httpd.active_channels.values()
        ):
            time.sleep(0.01)
        self.assertFalse(httpd.wait_quiet(0.05))  # its request runs on, its client reading nothing
        started = time.monotonic()
        layer.check_after_test()
        self.assertLess(time.monotonic() - started, 0.5)  # not the 1 s wait for quiet in vain
        self.assertTrue(httpd.wait_quiet(5))
        self.assertEqual(layer.server_errors.take(), [])  # a cut stream is no error

    def test_a_stream_that_stalls_while_the_test_end_waits_is_cut_at_its_end(self):
        go = threading.Event()
        # The rest begins while the end of the test waits for quiet.
        layer = set_up_by_hand(self, wsgi.Layer(stream_after(go), name="wsgi_late_stall", threads=1))
        layer.quiet_timeout = 0.5
        reader_that_stops(self, layer, "/")
        timer = threading.Timer(0.1, go.set)
        timer.start()
        self.addCleanup(timer.cancel)
        layer.check_after_test()  # cuts what stalled so far, waits in vain, gives up
        layer.testTearDown()  # cuts what stalled since
        layer.testSetUp()
        layer["httpd"].set_app(next_test)
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:  # the one worker is free
            self.assertEqual(response.read(), b"next test")

    def test_a_stream_that_stalls_after_its_test_ended_is_cut_then(self):
        # On a busy machine the stall of the test above may come only after
        # testTearDown: the one worker waited for a reader gone for good,
        # and the next test's request for the worker.
        go = threading.Event()
        # The rest begins once the test has ended.
        layer = set_up_by_hand(self, wsgi.Layer(stream_after(go), name="wsgi_stall_after_the_test", threads=1))
        layer.quiet_timeout = 0.1
        reader_that_stops(self, layer, "/")
        layer.check_after_test()  # nothing stalled: waits in vain, gives up
        layer.testTearDown()
        go.set()  # the stream stalls now, its test over
        layer.testSetUp()
        layer["httpd"].set_app(next_test)
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:  # the one worker is free
            self.assertEqual(response.read(), b"next test")

    def test_a_file_the_loop_sends_to_a_reading_client_is_not_cut(self):
        # waitress counts a whole wsgi.file_wrapper as buffered: no worker
        # waits for it, and the download goes on past the test's end.
        size = 40_000_000

        def download(environ, start_response):
            start_response("200 OK", [("Content-Length", str(size))])
            return environ["wsgi.file_wrapper"](io.BytesIO(bytes(size)))

        layer = set_up_by_hand(self, wsgi.Layer(download, name="wsgi_file_download"))
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
        self.addCleanup(client.close)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = client.recv(65536)
        httpd = layer["httpd"]
        self.assertTrue(httpd.wait_quiet(5))  # the worker is done: the loop sends the file
        layer.check_after_test()  # while the client still reads
        received += read_until_closed(client)
        self.assertEqual(len(received.partition(b"\r\n\r\n")[2]), size)


def thread_naming_app(environ, start_response):
    """Answers with the name of the thread that runs it; on ``/self`` with
    what its own server answered to ``/inner`` too; on ``/big`` with 20 MiB
    (more than waitress buffers before a worker waits for its loop); on
    ``/until-gone`` once its client is gone (at most 5 s), saying whether
    ``waitress.client_disconnected`` said so."""
    served_by = threading.current_thread().name
    path = environ["PATH_INFO"]
    if path == "/self":
        url = f"http://{environ['SERVER_NAME']}:{environ['SERVER_PORT']}/inner"
        with urllib.request.urlopen(url, timeout=5) as response:
            served_by += " | " + response.read().decode()
    if path == "/big":
        start_response("200 OK", [("Content-Length", str(20 * 2**20)), ("X-Served-By", served_by)])
        return [b"x" * 2**20 for _ in range(20)]
    if path == "/until-gone":
        UNTIL_GONE_RUNS.set()
        gone = environ["waitress.client_disconnected"]
        deadline = time.monotonic() + 5
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.005)
        GONE_SEEN.append((served_by, gone()))
    body = served_by.encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


GONE_SEEN: list[tuple[str, bool]] = []
UNTIL_GONE_RUNS = threading.Event()




@unittest.skipUnless(hasattr(select, "EPOLLEXCLUSIVE"), "the acceptor needs epoll's EPOLLEXCLUSIVE (Linux)")
class AcceptorTests(AcceptorChecks, unittest.TestCase):
    """A thread of the layer's own (the acceptor) accepts new connections
    and answers the request each brought, without handing it from the loop
    to a worker. A connection that comes while it is busy goes to the loop
    (so one may also come just as it finishes: the tests try a few)."""

    def serve(self):
        return set_up_by_hand(self, wsgi.Layer(thread_naming_app, name=f"acceptor_{self._testMethodName}"))

    def test_a_response_larger_than_waitress_buffers_is_sent_whole(self):
        # The acceptor then waits for the loop to send what is buffered.
        layer = self.serve()
        served_by = []
        for _ in range(self.ATTEMPTS):
            for headers in ({"Connection": "close"}, {}):
                connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
                self.addCleanup(connection.close)
                connection.request("GET", "/big", headers=headers)
                response = connection.getresponse()
                self.assertEqual(len(response.read()), 20 * 2**20)
                served_by.append(response.headers["X-Served-By"])
                if not headers:  # the kept connection goes on
                    connection.request("GET", "/after")
                    self.assertTrue(connection.getresponse().read())
            if all(name.endswith(" acceptor") for name in served_by[-2:]):
                return
        self.fail(f"the acceptor answered none of {served_by}")

    def test_the_acceptor_answers_the_next_requests_of_a_keep_alive_connection_it_answered(self):
        # It waits for them beside the listening sockets (pending), as for a
        # first request that comes after its connection: the loop neither
        # reads them nor hands them to a worker.
        layer = self.serve()
        server = layer["httpd"]
        for _ in range(self.ATTEMPTS):
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
            self.addCleanup(connection.close)
            served_by = []
            for number in range(5):
                connection.request("GET", f"/{number}")
                served_by.append(connection.getresponse().read().decode())
            if served_by[0].endswith(" acceptor"):
                self.assertEqual(served_by, served_by[:1] * 5)
                self.assertTrue(until(lambda: server.pending is not None))
                self.assertNotIn(server.pending, list(server._map.values()))
                return
            connection.close()
        self.fail("the acceptor answered none of the connections' first requests")

    LOOP_TURN_METHOD = "poll_once"

    def wake_loop(self, server):
        server.pull_trigger()

    def test_the_loop_accepts_a_connection_left_to_the_acceptor_once_it_answers_a_request(self):
        # The second request came before the acceptor took up the first,
        # which waits for it: the loop accepts and answers it meanwhile.
        other_answered = threading.Event()

        def waits_for_the_other(environ, start_response):
            if environ["PATH_INFO"] == "/first":
                body = b"the other came" if other_answered.wait(10) else b"waited in vain"
            else:
                other_answered.set()
                body = b"other"
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]

        layer = set_up_by_hand(self, wsgi.Layer(waits_for_the_other, name="acceptor_left_first"))
        server = layer["httpd"]
        address = (layer["http_host"], layer["http_port"])
        with self.acceptor_held_up(server) as go_on:
            with socket.create_connection(address, timeout=10) as first:
                first.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
                with socket.create_connection(address, timeout=10) as other:
                    other.sendall(b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n")
                    go_on.set()
                    self.assertEqual(RawClient(other).answer(), b"other")
                self.assertEqual(RawClient(first).answer(), b"the other came")

    def test_a_connection_the_acceptor_kept_is_closed_by_it_at_its_client_s_end(self):
        # The loop never hears of it: no turn of the loop to watch it
        # (join), none to close it.
        layer = self.serve()
        server = layer["httpd"]
        served_by = []
        with mock.patch.object(wsgi._Channel, "join", autospec=True, side_effect=wsgi._Channel.join) as join:
            for number in range(self.ATTEMPTS):
                with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10) as sock:
                    client = RawClient(sock)
                    sock.sendall(f"GET /{number} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                    served_by.append(client.answer().decode())
                    sock.shutdown(socket.SHUT_WR)
                    # The server's end, after the client's; only then the next
                    # connection (one coming first hands this one to the loop).
                    self.assertEqual(client.take(1), b"")
        self.assertEqual(client_connections(server), 0)
        self.assertTrue(any(name.endswith(" acceptor") for name in served_by), served_by)
        self.assertEqual(join.call_count, 0, served_by)

    def test_a_connection_the_acceptor_kept_idle_for_waitress_s_channel_timeout_is_closed(self):
        layer = self.serve()
        server = layer["httpd"]
        server.adj.channel_timeout = server.adj.cleanup_interval = 0.2
        server.next_channel_cleanup = 0  # waitress's maintenance, from the loop's next turn on
        for _ in range(self.ATTEMPTS):
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10) as sock:
                client = RawClient(sock)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                if client.answer().endswith(b" acceptor"):
                    self.assertEqual(client.take(1), b"")  # the server's end, not the socket's timeout
                    return
        self.fail("the acceptor answered none of the connections' first requests")

    def test_a_client_gone_is_seen_by_a_request_the_acceptor_runs(self):
        layer = self.serve()
        GONE_SEEN.clear()
        for _ in range(self.ATTEMPTS):
            UNTIL_GONE_RUNS.clear()
            sock = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
            sock.sendall(b"GET /until-gone HTTP/1.1\r\nHost: test\r\n\r\n")
            # Reset once the request runs: one the server had not read by
            # then would never run (on a busy machine, now and then).
            self.assertTrue(UNTIL_GONE_RUNS.wait(10))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
            deadline = time.monotonic() + 10
            while not GONE_SEEN and time.monotonic() < deadline:
                time.sleep(0.005)
            served_by, seen = GONE_SEEN.pop()
            if served_by.endswith(" acceptor"):
                self.assertTrue(seen)
                return
        self.fail("the acceptor answered none of the requests")

    def test_the_acceptor_stops_at_the_connection_limit_and_goes_on_below_it(self):
        limit = 12
        with mock.patch.object(wsgi, "CONNECTION_LIMIT", limit):
            layer = self.serve()
        server = layer["httpd"]
        room = limit - len(server._map)  # the server's socket, its trigger and its listener count too
        kept = []
        for number in range(room + 1):
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
            self.addCleanup(connection.close)
            kept.append(connection)
            connection.request("GET", f"/kept-{number}")
            if number < room:
                self.assertTrue(connection.getresponse().read())
        # The last one waits to be accepted; once another closes, it is answered.
        kept[0].close()
        self.assertTrue(kept[-1].getresponse().read())
        for connection in kept:
            connection.close()
        served_by = [get_closing(layer, f"/{number}") for number in range(self.ATTEMPTS)]
        self.assertTrue(any(name.endswith(" acceptor") for name in served_by), served_by)

    def acceptor_answering(self, path: str, go_on: threading.Event, limit: int = 100):
        """A layer whose acceptor answered a request to ``path``, or
        answers it until ``go_on`` is set (``/wait``); the layer and the
        request's connection."""

        self.paths_run: list[str] = []

        def waits_on_wait(environ, start_response):
            self.paths_run.append(environ["PATH_INFO"])
            if environ["PATH_INFO"] == "/wait":
                go_on.wait(10)
            body = threading.current_thread().name.encode()
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]

        with mock.patch.object(wsgi, "CONNECTION_LIMIT", limit):
            layer = set_up_by_hand(self, wsgi.Layer(waits_on_wait, name=f"acceptor_{self._testMethodName}"))
        self.addCleanup(go_on.set)
        server = layer["httpd"]
        # Waiting alone on the listening sockets, the acceptor takes the next connection.
        self.assertTrue(until(lambda: server.acceptor is not None and not server._loop_accepting))
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
        self.addCleanup(connection.close)
        connection.request("GET", path)
        if path == "/wait":
            self.assertTrue(until(lambda: server.answering is not None))
        else:
            self.assertTrue(connection.getresponse().read().endswith(b" acceptor"))
        return layer, connection

    def test_a_connection_the_acceptor_answers_counts_towards_the_connection_limit(self):
        # The loop's map lacks it; the loop accepts meanwhile, and stops one below the limit.
        go_on = threading.Event()
        layer, waiting = self.acceptor_answering("/wait", go_on, limit=12)
        server = layer["httpd"]
        room = 12 - len(server._map) - 1  # the server's socket, its trigger and its listener count too
        others = []
        for number in range(room + 1):
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
            self.addCleanup(connection.close)
            connection.request("GET", f"/other-{number}")
            others.append(connection)
        for connection in others[:room]:
            self.assertTrue(connection.getresponse().read())
        self.loop_turn(server)
        self.assertEqual(len(server._map), 11)  # and the one answered: 12
        # Nor does it watch the listening sockets meanwhile (it would spin).
        self.assertFalse(server.listeners[0].readable())
        go_on.set()
        self.assertTrue(waiting.getresponse().read().endswith(b" acceptor"))
        for connection in [waiting, *others[:room]]:
            connection.close()
        self.assertTrue(others[-1].getresponse().read())  # accepted once there was room

    def test_the_loop_and_the_acceptor_do_not_both_take_the_last_free_connection(self):
        # Each looks for room, then accepts: a connection the acceptor took
        # counts once it answers it, which the loop, accepting meanwhile
        # (woken while the acceptor answered the one before), did not see.
        go_on = threading.Event()
        layer, _ = self.acceptor_answering("/", go_on, limit=12)  # kept: pending
        server = layer["httpd"]
        self.assertTrue(until(lambda: server.pending is not None))
        kept = []
        while len(server._map) + 1 < 11:  # and the pending one: 1 free
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
            self.addCleanup(connection.close)
            connection.request("GET", "/kept")
            self.assertTrue(connection.getresponse().read())
            kept.append(connection)
            self.assertTrue(until(lambda: server.pending is not None))
        # Held after it accepted the last connection, before it counts it.
        held, take_up = threading.Event(), wsgi.WaitressServer._take_up

        def held_first(this, *args):
            if this is server:
                held.set()
                go_on.wait(10)
            return take_up(this, *args)

        with mock.patch.object(wsgi.WaitressServer, "_take_up", held_first):
            last = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
            self.addCleanup(last.close)
            last.sendall(b"GET /last HTTP/1.1\r\nHost: t\r\n\r\n")
            self.assertTrue(held.wait(10))
            beyond = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
            self.addCleanup(beyond.close)
            self.assertTrue(until(lambda: select.select(server.sockets, [], [], 0)[0]))  # there to be accepted
            loops_turn = threading.Thread(target=server.accept_waiting)  # what the loop's listener does
            loop_waits = threading.Event()
            watched = Watched(server._admitting, lambda thread: thread is loops_turn and loop_waits.set())
            with mock.patch.object(server, "_admitting", watched):
                loops_turn.start()
                # Before the fix it accepted at once; now it waits for the acceptor.
                self.assertTrue(until(lambda: loop_waits.is_set() or not loops_turn.is_alive()))
                go_on.set()
                loops_turn.join(10)
        self.assertTrue(RawClient(last).answer())  # by the acceptor, or by a worker if it came after its connection
        # At the limit the acceptor stops, and leaves the connection it kept to the loop.
        self.assertTrue(until(lambda: server.acceptor is None))
        self.assertEqual(len(server._map), 12)

    def test_a_request_the_acceptor_takes_up_as_the_server_stops_is_not_run(self):
        # The stop closes the connection the acceptor answers (``answering``),
        # which it may look for just before the acceptor sets it.
        go_on = threading.Event()
        layer, _ = self.acceptor_answering("/", go_on)  # takes the first connection
        server = layer["httpd"]
        take_up = wsgi.WaitressServer._take_up

        def stop_comes_first(this, channel, still_open):
            if this is server and getattr(this.serving, "accepted", None) and not this.stop_requested:
                this.request_stop()
            return take_up(this, channel, still_open)

        self.assertTrue(until(lambda: server.pending is not None))  # the first, kept: the acceptor waits again
        with mock.patch.object(wsgi.WaitressServer, "_take_up", stop_comes_first):
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10) as sock:
                sock.sendall(b"GET /during-stop HTTP/1.1\r\nHost: t\r\n\r\n")
                self.assertEqual(read_until_closed(sock), b"")
        self.assertEqual(self.paths_run, ["/"])

    def test_the_stop_leaves_the_connection_the_acceptor_waits_on_to_the_acceptor(self):
        # The stop closes the connection the acceptor answers, from its own
        # thread; the acceptor, done answering it, waits on it for the next
        # request and closes it once it sees the stop. Both closed it when
        # the stop looked for it just before the acceptor waited on it: the
        # acceptor unregistered a closed descriptor (EBADF) and its thread died.
        layer = wsgi.Layer(thread_naming_app, name="acceptor_waits_as_the_stop_comes")
        layer.setUp()
        server = layer["httpd"]
        stop_raised: list[BaseException] = []

        def stop():
            try:
                layer.tearDown()  # which raises what the server raised
            except BaseException as error:
                stop_raised.append(error)

        stopping = threading.Thread(target=stop, name="stopping")
        self.addCleanup(lambda: stopping.join(10) if stopping.ident else layer.tearDown())
        self.assertTrue(until(lambda: server.acceptor is not None and not server._loop_accepting))
        for listening in server.sockets:  # accepted with its request: waited on once answered, not before
            listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        stop_waits, wait_on = threading.Event(), server._wait_on

        def stop_comes_first(channel):
            if threading.get_ident() == server.acceptor_ident and not stopping.ident:
                stopping.start()
                # The stop closes what the acceptor answers; now it waits for the acceptor.
                self.assertTrue(until(lambda: stop_waits.is_set() or channel._fileno is None))
            wait_on(channel)

        watched = Watched(server._handing_on, lambda thread: thread is stopping and stop_waits.set())
        with mock.patch.object(server, "_wait_on", stop_comes_first), mock.patch.object(server, "_handing_on", watched):
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                self.assertIn(b" acceptor", RawClient(sock).answer())
                self.assertEqual(read_until_closed(sock), b"")  # closed by the stop
            stopping.join(10)
        self.assertFalse(stopping.is_alive())
        self.assertEqual(stop_raised, [])
        self.assertFalse(any("acceptor_waits_as_the_stop_comes" in thread.name for thread in threading.enumerate()))

    def test_a_failure_of_the_acceptor_is_a_server_error(self):
        # Not only a traceback on stderr, which a passing test run hides.
        layer = set_up_by_hand(self, wsgi.Layer(thread_naming_app, name="acceptor_fails"))
        server = layer["httpd"]
        self.assertTrue(until(lambda: server.acceptor is not None and not server._loop_accepting))
        failing = server.acceptor
        with (
            mock.patch.object(server, "accept_and_serve", side_effect=RuntimeError("a fault of ours")),
            mock.patch.object(server, "hand_over_pending", side_effect=RuntimeError("another, as it ends")),
        ):
            # The loop accepts it instead, as after any end of the acceptor.
            self.assertIn(" worker ", get_closing(layer, "/"))
            failing.join(10)
        [error] = layer.server_errors.take()
        self.assertIn("The acceptor of serverlayer serverlayer.tests.test_wsgi.acceptor_fails failed", error)
        self.assertIn("RuntimeError: a fault of ours", error)
        self.assertIn("RuntimeError: another, as it ends", error)

    def test_the_loop_starts_the_acceptor_again_once_there_is_room(self):
        # Not only when the loop itself accepts a connection: one the kernel
        # offered the acceptor alone as it stopped would wait for another.
        limit = 12
        with mock.patch.object(wsgi, "CONNECTION_LIMIT", limit):
            layer = self.serve()
        server = layer["httpd"]
        kept = []
        while server.acceptor is not None:  # until it stopped at the limit
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
            self.addCleanup(connection.close)
            connection.request("GET", "/kept")
            self.assertTrue(connection.getresponse().read())
            kept.append(connection)
            # The acceptor keeps the connection it answered (pending), and
            # waits for more while there is room; it stops at the limit.
            self.assertTrue(until(lambda: server.acceptor is None or (server.pending and server.has_room())))
            self.assertLessEqual(len(kept), limit)
        deadline = time.monotonic() + 10
        for connection in kept:
            connection.close()
        while (server.acceptor is None or len(server._map) >= limit) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertIsNotNone(server.acceptor)

    def test_the_acceptor_ends_with_the_layer(self):
        layer = wsgi.Layer(thread_naming_app, name="acceptor_ends")
        layer.setUp()
        try:
            names = [thread.name for thread in threading.enumerate()]
            self.assertIn("serverlayer serverlayer.tests.test_wsgi.acceptor_ends acceptor", names)
        finally:
            layer.tearDown()
        self.assertEqual([thread for thread in threading.enumerate() if "acceptor_ends" in thread.name], [])



#: Set by a test to let the ``/block`` requests of ``holding_app`` end;
#: whether it was, for each that ended.
UNBLOCK = threading.Event()
UNBLOCKED: list[bool] = []


def holding_app(environ, start_response):
    """``thread_naming_app``; on ``/block`` once ``UNBLOCK`` is set (at most
    10 s); echoes a request's body after the thread's name."""
    if environ["PATH_INFO"] == "/block":
        UNBLOCK.wait(10)
        UNBLOCKED.append(UNBLOCK.is_set())
    body = threading.current_thread().name.encode() + b" " + environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def idle_or_waiting_as_holders(server) -> bool:
    """Whether every worker is idle or waits for a request of the
    connection it holds: a holder still answering one counts as neither
    (a request the loop queues meanwhile makes it give up its hold)."""
    dispatcher = server.task_dispatcher
    with dispatcher.lock:
        return bool(dispatcher.active_count <= len(dispatcher.holders))


def held_channels(server) -> list:
    return [channel for channel in list(server._map.values()) if isinstance(channel, wsgi._Channel) and channel.held]


class RawClient:
    """Reads answers with a ``Content-Length`` from a socket, as they come."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def take(self, size: int) -> bytes:
        """``size`` bytes, fewer at the end of the connection."""
        while len(self.buffer) < size and (data := self.sock.recv(65536)):
            self.buffer += data
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def answer(self) -> bytes:
        """The next answer's body; its status must be 200."""
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"the connection ended before an answer: {self.buffer!r}")
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise AssertionError(head)
        lines = head.lower().split(b"\r\n")
        length = int(next(line for line in lines if line.startswith(b"content-length:")).split(b":")[1])
        return self.take(length)


@unittest.skipUnless(hasattr(os, "eventfd"), "workers hold connections where the system has eventfd (Linux)")
class HoldTests(unittest.TestCase):
    """A worker done with a keep-alive connection's request waits for the
    next one itself, while another worker stays idle for the loop's."""

    def serve(self, **kwargs):
        UNBLOCK.clear()
        UNBLOCKED.clear()
        self.addCleanup(UNBLOCK.set)
        # Without the acceptor, which keeps the keep-alive connection it
        # answered to itself (AcceptorTests): the loop's go to workers.
        with mock.patch.object(wsgi.WaitressServer, "uses_acceptor", False):
            layer = set_up_by_hand(self, wsgi.Layer(holding_app, name=f"hold_{self._testMethodName}", **kwargs))
        # Every worker waits for work: one still starting counts as busy,
        # and with none idle but the one that answered, that one would not
        # hold (or would give up its hold after its next answer).
        dispatcher = layer["httpd"].task_dispatcher
        self.assertTrue(until(lambda: dispatcher.active_count == 0))
        return layer

    def kept(self, layer) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
        self.addCleanup(connection.close)
        return connection

    def get(self, connection: http.client.HTTPConnection, path: str = "/", body: bytes | None = None) -> str:
        connection.request("GET" if body is None else "POST", path, body=body)
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        return response.read().decode()

    def test_a_keep_alive_client_s_requests_are_read_by_the_worker_that_answered_the_last(self):
        layer = self.serve()
        connection = self.kept(layer)
        handed = []
        server = layer["httpd"]
        served_by = []
        with mock.patch.object(server.task_dispatcher, "add_task", side_effect=server.task_dispatcher.add_task) as add:
            for number in range(50):
                served_by.append(self.get(connection, f"/{number}").strip())
                # Its next request comes once the worker waits for it as
                # the connection's holder: not while it still finishes the
                # answer (a busy machine), which leaves the request to the loop.
                self.assertTrue(until(lambda: idle_or_waiting_as_holders(server) and held_channels(server)))
            handed = add.call_count
        # The loop hands a worker the first request (or two: the loop's
        # turn may have begun before the hold); that worker reads and
        # answers the rest.
        self.assertLessEqual(handed, 2, served_by)
        self.assertEqual(len(set(served_by[2:])), 1, served_by)
        self.assertIn(" worker ", served_by[-1])

    def test_what_a_held_connection_receives_is_served_as_from_the_loop(self):
        layer = self.serve()
        server = layer["httpd"]
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10) as sock:
            client = RawClient(sock)

            def ask(*parts: bytes, answers: int = 1) -> list[bytes]:
                for part in parts:
                    self.assertTrue(until(lambda: held_channels(server)))  # each part to the holder
                    sock.sendall(part)
                return [client.answer() for _ in range(answers)]

            for _ in range(3):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                client.answer()
            # Two requests at once, answered in order.
            first, second = ask(
                b"POST /1 HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\na"
                b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nb",
                answers=2,
            )
            self.assertTrue(first.endswith(b" a") and second.endswith(b" b"), (first, second))
            # A head and body in pieces; a chunked body; a body sent after 100 Continue.
            pieces = ask(b"POST / HTTP/1.1\r\nHo", b"st: t\r\nContent-Length: 3\r\n\r\n", b"abc")[0]
            self.assertTrue(pieces.endswith(b" abc"), pieces)
            chunked = ask(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")[0]
            self.assertTrue(chunked.endswith(b" hi"), chunked)
            self.assertTrue(until(lambda: held_channels(server)))
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            self.assertEqual(client.take(25), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"ok")
            continued = client.answer()
            self.assertTrue(continued.endswith(b" ok"), continued)
            # The client's end after its last request: answered, then ended.
            self.assertTrue(until(lambda: held_channels(server)))
            sock.sendall(b"GET /last HTTP/1.1\r\nHost: t\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            self.assertIn(b" worker ", client.answer())
            self.assertEqual(client.take(1), b"")

    def test_a_worker_holding_a_connection_answers_a_request_the_loop_has_no_idle_worker_for(self):
        layer = self.serve(threads=2)
        server = layer["httpd"]
        held, blocked, waiting = self.kept(layer), self.kept(layer), self.kept(layer)
        # held's first: a worker that answered blocked's or waiting's first
        # request (one that came after its connection, under load) held it.
        for connection in (held, held, held, blocked, waiting):
            self.get(connection)
            # The worker that answered is idle again, or waits as a holder
            # (not still answering as one): the next request finds it idle,
            # rather than waking the holder to answer it, or making it give
            # up its hold, after which no worker holds (3 connections, 2 workers).
            self.assertTrue(until(lambda: idle_or_waiting_as_holders(server)))
        self.assertTrue(until(lambda: held_channels(server)))  # held's, by one worker; the other is idle
        blocked.request("GET", "/block")  # takes the idle worker
        self.assertTrue(until(lambda: server.task_dispatcher.active_count == 2))
        self.assertIn(" worker ", self.get(waiting, "/waiting"))  # answered by the holder
        self.assertEqual(UNBLOCKED, [])  # while the other worker is still blocked
        UNBLOCK.set()
        self.assertIn(" worker ", blocked.getresponse().read().decode())
        self.assertIn(" worker ", self.get(held))  # from the loop again

    def test_a_request_no_idle_worker_is_left_for_goes_to_a_waiting_holder_not_to_one_answering(self):
        # Two workers hold a connection each; one of them answers a request
        # of its connection that blocks, and the third worker is blocked
        # too. The loop's next request woke the holder that had begun its
        # hold last, the one answering, and waited for it, while the other
        # only waited for its connection's next request.
        layer = self.serve(threads=3)
        server = layer["httpd"]
        waiting_holder, answering_holder, blocked, asking = (self.kept(layer) for _ in range(4))
        for holds, connection in enumerate((waiting_holder, answering_holder), 1):
            self.get(connection)
            self.get(connection)
            # Not while the holder still finishes its answer: it may give
            # up its hold after it.
            self.assertTrue(until(
                lambda holds=holds: idle_or_waiting_as_holders(server) and len(held_channels(server)) == holds
            ))
        for connection in (blocked, asking):
            self.get(connection)  # the third worker's: it holds neither
            # It is idle again: the next request finds it idle, rather than
            # waking a holder to answer it (which then holds no more: as
            # many connections as workers).
            self.assertTrue(until(lambda: idle_or_waiting_as_holders(server)))
        self.assertEqual(len(held_channels(server)), 2)
        answering_holder.request("GET", "/block")  # its holder answers it
        self.assertTrue(until(lambda: server.task_dispatcher.active_count == 2 and len(held_channels(server)) == 2))
        blocked.request("GET", "/block")  # takes the idle worker
        self.assertTrue(until(lambda: server.task_dispatcher.active_count == 3))
        self.assertIn(" worker ", self.get(asking, "/asking"))  # answered by the waiting holder
        self.assertEqual(UNBLOCKED, [])  # while the others are still blocked
        UNBLOCK.set()
        for connection in (answering_holder, blocked):
            self.assertIn(" worker ", connection.getresponse().read().decode())

    def test_no_worker_holds_a_connection_while_there_are_as_many_as_workers(self):
        # Their requests would keep taking the holders back: with 8
        # keep-alive clients and 4 workers, a tenth fewer requests.
        layer = self.serve(threads=4)
        server = layer["httpd"]
        others = [self.kept(layer) for _ in range(3)]
        for connection in others:
            self.get(connection)
        connection = self.kept(layer)
        for _ in range(5):
            self.get(connection)
        address = connection.sock.getsockname()
        (channel,) = [each for each in list(server._map.values()) if getattr(each, "addr", None) == address]
        self.assertEqual(channel.holds, 0)
        for other in others:
            other.close()
        self.assertTrue(until(lambda: len(server.active_channels) < 4))
        for _ in range(3):
            self.get(connection)
        self.assertTrue(until(lambda: channel.held))  # with fewer, it is held again

    def test_a_held_connection_idle_for_waitress_s_channel_timeout_is_closed(self):
        layer = self.serve()
        server = layer["httpd"]
        server.adj.channel_timeout = server.adj.cleanup_interval = 0.2
        server.next_channel_cleanup = 0  # waitress's maintenance, from the loop's next turn on
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10) as sock:
            client = RawClient(sock)
            for _ in range(3):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                client.answer()
            self.assertTrue(until(lambda: held_channels(server)))
            self.assertEqual(client.take(1), b"")  # closed once idle, within the socket's timeout

    def test_the_layer_s_tear_down_ends_a_worker_holding_a_connection(self):
        layer = wsgi.Layer(holding_app, name="hold_tear_down")
        with mock.patch.object(wsgi.WaitressServer, "uses_acceptor", False):  # as serve()
            layer.setUp()
        try:
            connection = self.kept(layer)
            for _ in range(3):
                self.get(connection)
            self.assertTrue(until(lambda: held_channels(layer["httpd"])))
        finally:
            started = time.monotonic()
            layer.tearDown()
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual([thread.name for thread in threading.enumerate() if "hold_tear_down" in thread.name], [])

    def test_a_hold_that_begins_after_the_stop_woke_the_holders_ends_at_once(self):
        # A worker found the connection holdable just before the stop, and
        # counted itself a holder only after the stop (request_stop, then
        # release) woke the holders: no one woke it, and the release's
        # closing the socket does not end a poll() on it. It waited for
        # channel_timeout, and tearDown left it behind.
        layer = self.serve()
        server = layer["httpd"]
        dispatcher = server.task_dispatcher
        begin_hold = dispatcher.begin_hold

        def begin_hold_after_the_stop(wake: int) -> bool:
            server._stop_requested = True  # as request_stop() and release() do, then
            dispatcher.wake_holders()
            return begin_hold(wake)

        connection = self.kept(layer)
        self.get(connection)  # a worker's (no acceptor here), which then holds the connection
        (channel,) = [each for each in list(server._map.values()) if isinstance(each, wsgi._Channel)]
        # Its hold begun before the patch: one begun after it (the worker
        # slow to get there) stopped the server before the next request,
        # which the loop then never read (a 10 s timeout, now and then).
        self.assertTrue(until(lambda: channel.held))
        with mock.patch.object(dispatcher, "begin_hold", side_effect=begin_hold_after_the_stop):
            self.get(connection)
            self.assertTrue(until(lambda: channel.holds))
            self.assertTrue(until(lambda: not channel.held), "the worker still holds the connection")

    def test_a_connection_held_by_a_worker_is_not_held_by_another_too(self):
        # Another worker, done with a request of the same connection that
        # the loop read while the first one's ran, would read it too.
        layer = self.serve()
        server = layer["httpd"]
        connection = self.kept(layer)
        for _ in range(3):
            self.get(connection)
        (channel,) = until(lambda: held_channels(server))
        poller, wake = select.poll(), os.eventfd(0, os.EFD_NONBLOCK)
        poller.register(wake, select.POLLIN)
        other = threading.Thread(target=channel.hold, name="other worker")
        server.task_dispatcher.waits[other] = (poller, wake)
        try:
            other.start()
            other.join(5)
            os.eventfd_write(wake, 1)  # had it held the connection: give it back
            other.join(5)
        finally:
            del server.task_dispatcher.waits[other]
            os.close(wake)
        self.assertNotIn(other.ident, server.task_dispatcher.holders)
        self.assertEqual(channel.holds, 1)
        self.assertIn(" worker ", self.get(connection))

    def test_the_loop_does_not_read_what_a_worker_held_since_the_loop_s_turn_began(self):
        # The loop's poll() found the connection readable before a worker
        # held it; the worker read the request, answered it and gave the
        # connection back; then the loop reads: nothing is there, which
        # waitress took for a broken connection and closed it.
        layer = self.serve(threads=1)  # no worker holds: the loop reads each request
        server = layer["httpd"]
        connection = self.kept(layer)
        self.get(connection)
        self.get(connection)
        (channel,) = [each for each in list(server._map.values()) if isinstance(each, wsgi._Channel)]
        self.assertTrue(until(lambda: channel.watched))
        channel.holds += 1  # a hold came and went since the loop watched it
        channel.handle_read()
        self.assertTrue(channel.connected)
        self.assertIn(" worker ", self.get(connection))

    def test_the_loop_does_not_read_what_a_worker_began_to_hold_while_the_loop_looked_at_it(self):
        # A worker began to hold the connection just after the loop's
        # readable() found it not held, but before that recorded the holds
        # it saw: the loop's turn then took the worker's hold for one it had
        # seen, read after the worker (nothing there) and waitress closed
        # the connection as broken.
        layer = self.serve(threads=1)  # no worker holds: the test does, by hand
        server = layer["httpd"]
        connection = self.kept(layer)
        self.get(connection)
        self.get(connection)
        (channel,) = [each for each in list(server._map.values()) if isinstance(each, wsgi._Channel)]
        self.assertTrue(until(lambda: channel.watched and not channel.total_outbufs_len))
        looking = threading.get_ident()

        def lingering(*set_to: bool) -> bool:
            # readable() asks it between its look at ``held`` and its record of ``holds``.
            if threading.get_ident() == looking and not channel.held:
                channel.held = True  # as hold() does, under read_lock
                channel.holds += 1
                channel.watched = False
            return False

        with mock.patch.object(wsgi._Channel, "lingering", new_callable=mock.PropertyMock, side_effect=lingering):
            channel.readable()
        self.assertFalse(channel.watched)  # the worker reads it: client_disconnected asks the kernel
        channel.held = False  # the worker read a request, answered it and gave the connection back
        channel.handle_read()  # for what the loop's poll() saw
        self.assertTrue(channel.connected)
        self.assertIn(" worker ", self.get(connection))

    def test_more_keep_alive_clients_than_spare_workers_each_get_their_own_answers(self):
        # Workers begin and end holds all the time here: a connection held
        # by two, or read by the loop and a worker at once, mixed answers
        # up, or made waitress close the connection.
        layer = self.serve(threads=4)

        def ask(number: int) -> None:
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
            try:
                for request in range(300):
                    body = b"%d.%d" % (number, request)
                    self.assertTrue(self.get(connection, "/", body).endswith(" " + body.decode()))
            finally:
                connection.close()

        self.assertEqual(failures_in_threads(ask, 8), [])
