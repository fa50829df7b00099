"""Every HTTP layer records the requests of the current test."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import unittest
import urllib.error
import urllib.request
from unittest import mock

import httpx
import requests

from serverlayer import (
    ConfigurationError,
    RequestTimeoutError,
    SetUpError,
    asgi,
    content,
    custom,
    recording,
    static,
    wsgi,
)
from serverlayer.recording import REQUEST_HEAD, RecordedRequest, _BodyFirst, _UnreadHead, split_target
from serverlayer.tests.helpers import set_up_by_hand
from serverlayer.tests.test_content_protocol import parse_responses


def echo_app(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Length", str(len(body) + 5))])
    return [b"echo:" + body]


class EchoHandler(custom.RequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + 5))
        self.end_headers()
        self.wfile.write(b"echo:" + body)

    do_GET = do_POST


async def asgi_echo(scope, receive, send):
    """``echo_app`` for the asgi layer."""
    if scope["type"] != "http":  # the lifespan: nothing to start
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body) + 5).encode())]})
    await send({"type": "http.response.body", "body": b"echo:" + body})


WSGI_RECORDED = wsgi.Layer(echo_app, name="WSGI_RECORDED")
WSGI_RECORDED_TLS = wsgi.Layer(echo_app, name="WSGI_RECORDED_TLS", tls=True)
CUSTOM_RECORDED = custom.Layer(EchoHandler, name="CUSTOM_RECORDED")
CUSTOM_RECORDED_TLS = custom.Layer(EchoHandler, name="CUSTOM_RECORDED_TLS", tls=True)
STATIC_RECORDED = static.Layer(name="STATIC_RECORDED")
CONTENT_RECORDED = content.Layer(name="CONTENT_RECORDED")
CONTENT_RECORDED_TLS = content.Layer(name="CONTENT_RECORDED_TLS", tls=True)
ASGI_RECORDED = asgi.Layer(asgi_echo, name="ASGI_RECORDED")  # on httptools, uvicorn's default
ASGI_H11_RECORDED = asgi.Layer(asgi_echo, name="ASGI_H11_RECORDED", http_protocol="h11")


def exchange(layer, data: bytes) -> bytes:
    """Send ``data`` on one connection, over TLS on a TLS layer, and read
    until the server closes it."""
    sock = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
    if layer["http_url"].startswith("https:"):
        sock = layer["ssl_context"].wrap_socket(sock, server_hostname=layer["http_host"])
    with sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


#: A last request after one under test, for the server to answer and then close.
LAST_GET = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


class RecordingChecks:
    """The same checks against each kind of server."""

    def connection(self):
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        return connection

    def test_records_method_path_query_headers_and_body(self):
        connection = self.connection()
        connection.request("POST", "/pay%20now?amount=100&currency=EUR&note=", body=json.dumps({"card": "4242"}),
                           headers={"Content-Type": "application/json", "X-Request-Id": "r-1"})
        self.assertEqual(connection.getresponse().read(), b'echo:{"card": "4242"}')
        [request] = self.layer["http_requests"]
        self.assertEqual((request.method, request.path, request.query),
                         ("POST", "/pay%20now", "amount=100&currency=EUR&note="))
        self.assertEqual(request.query_params, {"amount": ["100"], "currency": ["EUR"], "note": [""]})
        # What http.client sent, and nothing the server adds (a WSGI environ has much more).
        self.assertEqual(sorted(name.lower() for name in request.headers.keys()),
                         ["accept-encoding", "content-length", "content-type", "host", "x-request-id"])
        self.assertEqual(request.headers["content-type"], "application/json")
        self.assertEqual(request.headers["X-REQUEST-ID"], "r-1")
        self.assertEqual(request.json(), {"card": "4242"})
        self.assertEqual(request.summary(), "POST /pay%20now?amount=100&currency=EUR&note= (16 bytes)")

    def test_requests_are_emptied_before_each_test(self):
        urllib.request.urlopen(self.layer["http_url"] + "earlier", timeout=5).close()
        self.assertEqual([request.path for request in self.layer["http_requests"]], ["/earlier"])
        # What the test runner calls between this test and the next:
        self.layer.testTearDown()
        self.layer.testSetUp()
        self.assertEqual(list(self.layer["http_requests"]), [])

    def test_keep_alive_requests_are_recorded_apart_and_bodies_reach_the_app(self):
        connection = self.connection()
        for number in range(5):
            body = f"body {number}".encode() * (number + 1)
            connection.request("POST", f"/{number}", body=body)
            self.assertEqual(connection.getresponse().read(), b"echo:" + body)
        self.assertEqual([request.body for request in self.layer["http_requests"]],
                         [f"body {number}".encode() * (number + 1) for number in range(5)])

    def test_pipelined_requests(self):
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                         b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nde")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        self.assertIn(b"echo:abc", received)
        self.assertIn(b"echo:de", received)
        self.assertEqual([(r.path, r.body) for r in self.layer["http_requests"]], [("/a", b"abc"), ("/b", b"de")])

    #: The records of an upload its client left unfinished: none where the
    #: application or handler runs once the body is whole.
    unfinished_upload_records: list[str] = []

    def test_an_upload_its_client_left_unfinished(self):
        urllib.request.urlopen(self.layer["http_url"] + "whole", timeout=5).close()
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"POST /unfinished HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
            # Once the server asks for the body, it reads it: a wait for
            # quiet waits until it has seen the client leave.
            self.assertEqual(sock.recv(25), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"half")
        self.layer.check_server_errors()  # waits until no request runs
        self.assertEqual([request.summary() for request in self.layer["http_requests"]],
                         ["GET /whole", *self.unfinished_upload_records])

    def test_wait_for_a_request_made_in_the_background(self):
        def request_later():
            time.sleep(0.05)  # the application under test taking its time
            urllib.request.urlopen(self.layer["http_url"] + "late", timeout=5).close()

        client = threading.Thread(target=request_later)
        client.start()
        self.addCleanup(client.join, 5)
        [late] = self.layer["http_requests"].wait_for(match=lambda request: request.path == "/late")
        self.assertEqual(late.method, "GET")

    def test_wait_for_fails_listing_what_arrived(self):
        urllib.request.urlopen(self.layer["http_url"] + "only", timeout=5).close()
        with self.assertRaises(RequestTimeoutError) as caught:
            self.layer["http_requests"].wait_for(2, timeout=0.1)
        self.assertIn("Waited 0.1 seconds for 2 request(s); 1 of them arrived, 1 request(s) in all:\n"
                      "  1. GET /only", str(caught.exception))

    def test_wait_for_refuses_a_timeout_that_is_no_number_of_seconds(self):
        # NaN waited for ever (the test hung), infinity raised OverflowError,
        # "1" a TypeError from threading.
        for timeout, message in (
            (float("nan"), "timeout=nan: wait_for() waits that many seconds, 0 or more"),
            (float("inf"), "timeout=inf: wait_for() waits that many seconds, 0 or more; write timeout=None"),
            ("1", "write the number 1.0, not the text '1'"),
        ):
            raised: list[BaseException] = []

            def wait(timeout=timeout, raised=raised):
                try:
                    self.layer["http_requests"].wait_for(1, match=lambda request: request.path == "/free",
                                                         timeout=timeout)
                except Exception as error:  # noqa: BLE001 -- the test looks at it
                    raised.append(error)

            waiting = threading.Thread(target=wait)
            waiting.start()
            waiting.join(2)
            if waiting.is_alive():  # hung: the request it waits for sets it free
                urllib.request.urlopen(self.layer["http_url"] + "free", timeout=5).close()
                waiting.join(10)
            with self.subTest(timeout=timeout):
                self.assertEqual(len(raised), 1, "wait_for() did not raise")
                self.assertIsInstance(raised[0], ConfigurationError)
                self.assertIn(message, str(raised[0]))

    def test_wait_for_says_where_the_requests_it_waits_for_go(self):
        """Requests that never came were often sent elsewhere: to another
        layer's server, whose http_url hid this one's in a stack."""
        with self.assertRaises(RequestTimeoutError) as caught:
            self.layer["http_requests"].wait_for(1, timeout=0.01)
        self.assertIn(f"0 request(s) in all.\nThis server records the requests sent to {self.layer['http_url']};"
                      " those sent to another address", str(caught.exception))


class WSGIRecordingTests(RecordingChecks, unittest.TestCase):
    layer = WSGI_RECORDED

    def test_chunked_upload_is_recorded_whole_and_reaches_the_app_whole(self):
        connection = self.connection()
        connection.request("POST", "/upload", body=iter([b"one ", b"two ", b"three"]), encode_chunked=True)
        self.assertEqual(connection.getresponse().read(), b"echo:one two three")
        self.assertEqual(self.layer["http_requests"][0].body, b"one two three")


class CustomRecordingTests(RecordingChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED

    def test_the_published_handler_is_the_users_class(self):
        self.assertIs(self.layer["request_handler"], EchoHandler)


class ASGIRecordingTests(RecordingChecks, unittest.TestCase):
    layer = ASGI_RECORDED
    # The application runs once the head is in, and read what came of the body.
    unfinished_upload_records = ["POST /unfinished (4 bytes)"]


class ASGIH11RecordingTests(ASGIRecordingTests):
    layer = ASGI_H11_RECORDED


#: Header fields as a client may send them: names in any case, with an
#: underscore, repeated; a chunked body.
FIELDS_AS_SENT = [("Host", "x"), ("x-lower", "a"), ("Transfer-Encoding", "chunked"), ("Cookie", "a=1"),
                  ("Cookie", "b=2"), ("X-Tag", "one"), ("X-TAG", "two"), ("X_Under", "u"), ("Connection", "close")]


class HeaderFieldsChecks:
    """The header fields are recorded as the client sent them."""

    def test_header_fields_are_recorded_as_sent(self):
        head = "".join(f"{name}: {value}\r\n" for name, value in FIELDS_AS_SENT).encode()
        data = exchange(self.layer, b"POST /upload HTTP/1.1\r\n" + head + b"\r\n5\r\nhello\r\n0\r\n\r\n")
        [(status, _, _)], rest = parse_responses(data, ["POST"])
        self.assertEqual((status, rest), (200, b""))
        [request] = self.layer["http_requests"]
        self.assertEqual(request.headers.items(), FIELDS_AS_SENT)
        self.assertEqual(request.headers.get_all("cookie"), ["a=1", "b=2"])
        self.assertIsNone(request.headers["Content-Length"])  # none was sent
        self.assertEqual((request.method, request.path, request.body), ("POST", "/upload", b"hello"))


class WSGIHeaderFieldsTests(HeaderFieldsChecks, unittest.TestCase):
    layer = WSGI_RECORDED

    def test_the_application_still_gets_the_environ_waitress_makes(self):
        environs = []

        def app(environ, start_response):
            environs.append(dict(environ))
            start_response("200 OK", [("Content-Length", "0")])
            return []

        self.layer["httpd"].set_app(app)
        exchange(self.layer, b"GET / HTTP/1.1\r\nHost: x\r\nX-Tag: one\r\nx-tag: two\r\nConnection: close\r\n\r\n")
        [environ] = environs
        self.assertEqual(environ["HTTP_X_TAG"], "one, two")
        self.assertNotIn(REQUEST_HEAD, environ)


class WSGITLSHeaderFieldsTests(HeaderFieldsChecks, unittest.TestCase):
    layer = WSGI_RECORDED_TLS


class CustomHeaderFieldsTests(HeaderFieldsChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED


class BodyLengthChecks:
    """A Content-Length is digits, with optional whitespace around them
    (RFC 9110 section 5.5, RFC 9112 section 6.3). The body recorded is the
    one the application reads; a length that is no such number gets a 400
    and the connection ends, before anything reads a body whose end is in
    doubt."""

    #: The status and body the layer answers ``POST /echo`` with ``hello``.
    echoed: tuple[int, bytes | None] = (200, b"echo:hello")
    #: Whether a chunk's size over the limit is refused only once that
    #: much has arrived (waitress's way), not when announced.
    reads_chunks_to_the_limit = False

    def test_whitespace_around_the_length(self):
        for field in (b"Content-Length: 5 ", b"Content-Length:\t5 \t", b"Content-Length:5"):
            with self.subTest(field=field):
                self.layer["http_requests"].clear()
                data = exchange(self.layer, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + field + b"\r\n\r\nhello" + LAST_GET)
                [(status, _, body), _], rest = parse_responses(data, ["POST", "GET"])
                self.assertEqual(status, self.echoed[0], data)
                if self.echoed[1] is not None:
                    self.assertEqual(body, self.echoed[1])
                self.assertEqual(rest, b"")
                self.assertEqual([(request.path, request.body) for request in self.layer["http_requests"]],
                                 [("/echo", b"hello"), ("/last", b"")])

    def test_a_length_that_is_no_number_is_refused_and_ends_the_connection(self):
        for fields in (b"Content-Length: +3", b"Content-Length: -1", b"Content-Length: 3, 4",
                       b"Content-Length: 3\r\nContent-Length: 4", b"Content-Length: 3, 3",
                       b"Content-Length: 3\r\nContent-Length: 3", b"Content-Length: 0x3", b"Content-Length: 3_0",
                       b"Content-Length: \xb2", b"Content-Length: \xd9\xa3", b"Content-Length: 3 3",
                       b"Content-Length:"):
            with self.subTest(fields=fields):
                data = exchange(self.layer, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n\r\nabc" + LAST_GET)
                [(status, headers, _)], rest = parse_responses(data, ["POST"])
                self.assertEqual((status, headers["Connection"], rest), (400, "close", b""), data)
                self.assertEqual(list(self.layer["http_requests"]), [])

    def test_a_body_over_a_gigabyte_is_refused_with_413(self):
        # Held in memory to be recorded; and a buffered read of the length
        # alone would have taken it, or raised inside the server.
        for length in (b"1073741825", b"3000000000", b"99999999999999999999999"):
            with self.subTest(length=length):
                data = exchange(self.layer, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                                + b"\r\n\r\nabc")
                [(status, headers, _)], rest = parse_responses(data, ["POST"])
                self.assertEqual((status, headers["Connection"], rest), (413, "close", b""), data)
                self.assertEqual(list(self.layer["http_requests"]), [])
        if self.reads_chunks_to_the_limit:
            return
        data = exchange(self.layer, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"40000001\r\nabc")  # a chunk of 1 GiB and a byte
        [(status, headers, _)], rest = parse_responses(data, ["POST"])
        self.assertEqual((status, headers["Connection"], rest), (413, "close", b""), data)


class WSGIBodyLengthTests(BodyLengthChecks, unittest.TestCase):
    """waitress frames the body itself: the layers built on http.server agree with it."""

    layer = WSGI_RECORDED
    reads_chunks_to_the_limit = True


class CustomBodyLengthTests(BodyLengthChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED


class CustomTLSBodyLengthTests(BodyLengthChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED_TLS


class StaticBodyLengthTests(BodyLengthChecks, unittest.TestCase):
    layer = STATIC_RECORDED
    echoed = (405, None)  # and the connection goes on: the body was read


class ContentBodyLengthTests(BodyLengthChecks, unittest.TestCase):
    layer = CONTENT_RECORDED

    def setUp(self):
        self.layer["http_content"].route("/echo", "POST", data=b"hello").respond("echo:hello")


class ContentTLSBodyLengthTests(ContentBodyLengthTests):
    layer = CONTENT_RECORDED_TLS


def http_connection(test, layer):
    """An ``http.client`` connection to ``layer``, over TLS on a TLS layer."""
    if layer["http_url"].startswith("https:"):
        connection = http.client.HTTPSConnection(layer["http_host"], layer["http_port"], timeout=5,
                                                 context=layer["ssl_context"])
    else:
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
    test.addCleanup(connection.close)
    return connection


class PathAsSentChecks:
    """http.server makes a leading ``//`` of ``self.path`` one ``/``; the
    recorded path is the request line's, as the client sent it."""

    def get(self, target):
        connection = http_connection(self, self.layer)
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()

    def test_a_path_starting_with_slashes_is_recorded_as_sent(self):
        for target in ("//api//v1?x=1", "///three", "/one//two/"):
            self.get(target)
        self.assertEqual([(request.path, request.query) for request in self.layer["http_requests"]],
                         [("//api//v1", "x=1"), ("///three", ""), ("/one//two/", "")])
        self.assertEqual(str(self.layer["http_requests"][0]), "GET //api//v1?x=1")


class WSGIPathAsSentTests(PathAsSentChecks, unittest.TestCase):
    layer = WSGI_RECORDED


class CustomPathAsSentTests(PathAsSentChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED


class CustomTLSPathAsSentTests(PathAsSentChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED_TLS


class StaticPathAsSentTests(PathAsSentChecks, unittest.TestCase):
    layer = STATIC_RECORDED

    def test_the_file_is_still_served(self):
        with open(os.path.join(self.layer["documentroot"], "f.txt"), "w") as file:
            file.write("file")
        self.assertEqual(self.get("//f.txt"), (200, b"file"))
        self.assertEqual([request.path for request in self.layer["http_requests"]], ["//f.txt"])


class ContentPathAsSentTests(PathAsSentChecks, unittest.TestCase):
    layer = CONTENT_RECORDED

    def test_routes_match_the_path_as_sent(self):
        http_content = self.layer["http_content"]
        http_content.route("//api//v1").respond("as sent")
        http_content.route("/api//v1").respond("one slash")
        self.assertEqual(self.get("//api//v1"), (200, b"as sent"))
        self.assertEqual(self.get("/api//v1"), (200, b"one slash"))
        http_content.expect("//expected")
        self.get("//expected")
        self.assertEqual(http_content.problems(), [])
        self.assertEqual(http_content.url_for("//api//v1"), self.layer["http_url"] + "/api//v1")


class ContentTLSPathAsSentTests(ContentPathAsSentTests):
    layer = CONTENT_RECORDED_TLS


#: A URL of the remote service a layer stands in for, as a client asks
#: the server it uses as its HTTP proxy for it: whole, in the request line
#: (the absolute form, RFC 9112 section 3.2.2).
PROXIED = "http://api.example.com/v1/items?x=1"


def target_parts(layer) -> list[tuple[str, str, str, str, str, str]]:
    return [(request.method, request.path, request.query, request.scheme, request.authority, request.target)
            for request in layer["http_requests"]]


class AbsoluteFormChecks:
    """A request target in the absolute form is recorded as its path and
    query, as the layer's routes match them, and the scheme and authority
    the client asked for, as sent; its Host header is recorded as sent too."""

    def test_a_target_in_absolute_form(self):
        for target, host in ((b"http://API.example.com:8080/v1/items?x=1", b"elsewhere"),
                             (b"http://api.example.com//v1%2Fx?", b"api.example.com"), (b"/last", b"x")):
            data = exchange(self.layer, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
                                        b"Connection: close\r\n\r\n")
            self.assertTrue(data.startswith(b"HTTP/1.1 "), data)  # 404 on the static layer
        self.assertEqual(target_parts(self.layer), [
            ("GET", "/v1/items", "x=1", "http", "API.example.com:8080", "http://API.example.com:8080/v1/items?x=1"),
            ("GET", "//v1%2Fx", "", "http", "api.example.com", "http://api.example.com//v1%2Fx"),
            ("GET", "/last", "", "", "", "/last"),
        ])
        self.assertEqual(self.layer["http_requests"][0].headers["Host"], "elsewhere")
        self.assertEqual(str(self.layer["http_requests"][0]), "GET http://API.example.com:8080/v1/items?x=1")


class ProxyClientChecks(AbsoluteFormChecks):
    """Clients configured to use the layer as their HTTP proxy."""

    def setUp(self):
        # No proxy settings of the machine's count: no_proxy would send urllib and curl past the layer.
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
            del os.environ[name]

    def test_clients_that_use_the_layer_as_their_proxy(self):
        proxy = self.layer["http_url"]
        with requests.Session() as session:
            session.trust_env = False
            session.get(PROXIED, proxies={"http": proxy}, timeout=5)
            session.post("http://api.example.com/v1/items", data=b"payload", proxies={"http": proxy}, timeout=5)
        with httpx.Client(proxy=proxy, trust_env=False, timeout=5) as client:
            client.get(PROXIED)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
        with contextlib.suppress(urllib.error.HTTPError):  # the static layer's 404 and 405
            opener.open(PROXIED, timeout=5).close()
        got = ("GET", "/v1/items", "x=1", "http", "api.example.com", PROXIED)
        posted = ("POST", "/v1/items", "", "http", "api.example.com", "http://api.example.com/v1/items")
        self.assertEqual(target_parts(self.layer), [got, posted, got, got])
        self.assertEqual(self.layer["http_requests"][1].body, b"payload")
        self.assertEqual(self.layer["http_requests"][1].summary(), "POST http://api.example.com/v1/items (7 bytes)")
        self.assertEqual({request.headers["Host"] for request in self.layer["http_requests"]}, {"api.example.com"})

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed")
    def test_curl_with_the_layer_as_its_proxy(self):
        subprocess.run(["curl", "-sS", "-m", "10", "-o", os.devnull, "-x", self.layer["http_url"],
                        "http://api.example.com:8080/v1/items?x=1"], check=True, timeout=20)
        self.assertEqual(target_parts(self.layer), [
            ("GET", "/v1/items", "x=1", "http", "api.example.com:8080", "http://api.example.com:8080/v1/items?x=1"),
        ])


class WSGIAbsoluteFormTests(ProxyClientChecks, unittest.TestCase):
    layer = WSGI_RECORDED


class WSGITLSAbsoluteFormTests(AbsoluteFormChecks, unittest.TestCase):
    layer = WSGI_RECORDED_TLS


class CustomAbsoluteFormTests(ProxyClientChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED


class CustomTLSAbsoluteFormTests(AbsoluteFormChecks, unittest.TestCase):
    layer = CUSTOM_RECORDED_TLS


class StaticAbsoluteFormTests(ProxyClientChecks, unittest.TestCase):
    layer = STATIC_RECORDED


class ASGIAbsoluteFormTests(ProxyClientChecks, unittest.TestCase):
    """httptools gives a path without the target's scheme and authority."""

    layer = ASGI_RECORDED

    def test_the_application_sees_no_recording_key(self):
        scopes = []

        async def app(scope, receive, send):
            if scope["type"] == "http":
                scopes.append(dict(scope))
            await asgi_echo(scope, receive, send)

        layer = set_up_by_hand(self, asgi.Layer(app, name="asgi_absolute_scope"))
        exchange(layer, b"GET http://api.example.com/v1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n" + LAST_GET)
        self.assertEqual([scope["raw_path"] for scope in scopes], [b"/v1", b"/last"])  # as uvicorn gives it
        self.assertEqual([key for scope in scopes for key in scope if key.startswith("serverlayer")], [])
        self.assertEqual([request.target for request in layer["http_requests"]], ["http://api.example.com/v1", "/last"])


class ASGIH11AbsoluteFormTests(ProxyClientChecks, unittest.TestCase):
    """h11 gives the whole target, less the query, as the path."""

    layer = ASGI_H11_RECORDED


class ContentAbsoluteFormTests(ProxyClientChecks, unittest.TestCase):
    layer = CONTENT_RECORDED

    def test_routes_match_a_proxied_request_by_its_path(self):
        """A layer standing in for a remote service answers a client that
        uses it as its proxy as one sent to it directly. A route matches the
        path whatever host the request names, as it matches whatever Host
        header; ``match=`` tells hosts apart."""
        http_content = self.layer["http_content"]
        http_content.route("/v1/items", match=lambda request: request.authority == "other.example.com").respond("other")
        http_content.route("/v1/items", query={"x": "1"}).respond("items")
        http_content.expect("/v1/orders", "POST", json={"item": 1})
        proxies = {"http": self.layer["http_url"]}
        with requests.Session() as session:
            session.trust_env = False
            self.assertEqual(session.get(PROXIED, proxies=proxies, timeout=5).text, "items")
            self.assertEqual(session.get("http://other.example.com/v1/items", proxies=proxies, timeout=5).text,
                             "other")
            session.post("http://api.example.com/v1/orders", json={"item": 1}, proxies=proxies, timeout=5)
            self.assertEqual(http_content.problems(), [])
            session.get("http://api.example.com/v1/other", proxies=proxies, timeout=5)
        self.assertEqual(http_content.problems(), ["unexpected request: GET http://api.example.com/v1/other"])
        http_content.reset()  # this test checked on purpose


class ContentTLSAbsoluteFormTests(AbsoluteFormChecks, unittest.TestCase):
    layer = CONTENT_RECORDED_TLS


class OtherLayerTests(unittest.TestCase):

    def test_wsgi_records_the_request_as_sent_though_the_app_rewrites_it(self):
        """The record is made into a RecordedRequest only when the test
        reads it, after the application changed its environ."""

        def rewriting_app(environ, start_response):
            environ["PATH_INFO"] = "/rewritten"
            environ["REQUEST_URI"] = "/rewritten"
            environ["HTTP_X_TOKEN"] = "changed"
            environ["REQUEST_METHOD"] = "PUT"
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]

        layer = set_up_by_hand(self, wsgi.Layer(rewriting_app, name="wsgi_rewriting"))
        request = urllib.request.Request(layer["http_url"] + "original?a=1", headers={"X-Token": "sent"})
        self.assertEqual(urllib.request.urlopen(request, timeout=5).read(), b"ok")
        [recorded] = layer["http_requests"]
        self.assertEqual((recorded.method, recorded.path, recorded.query), ("GET", "/original", "a=1"))
        self.assertEqual(recorded.headers["x-token"], "sent")
        self.assertIs(layer["http_requests"][0], recorded)  # made once, then kept

    def test_custom_records_the_headers_as_sent_though_the_handler_changes_its_own(self):
        class Rewriting(custom.RequestHandler):
            def do_GET(self):
                self.headers.replace_header("X-Token", "changed")
                del self.headers["User-Agent"]
                self.headers["X-Added"] = "by the handler"
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        layer = set_up_by_hand(self, custom.Layer(Rewriting, name="custom_rewriting"))
        request = urllib.request.Request(layer["http_url"], headers={"X-Token": "sent", "User-Agent": "agent/1"})
        urllib.request.urlopen(request, timeout=5).close()
        [recorded] = layer["http_requests"]
        self.assertEqual((recorded.headers["X-Token"], recorded.headers["User-Agent"], recorded.headers["X-Added"]),
                         ("sent", "agent/1", None))

    def test_asgi_records_a_request_with_a_body_as_sent_though_middleware_changes_its_scope(self):
        """ASGI middleware changes the scope it passes on in place (Starlette's
        MutableHeaders(scope=scope) changes scope["headers"]); a request with a
        body is recorded once the body is whole, after the application began."""

        async def rewriting_app(scope, receive, send):
            if scope["type"] != "http":
                return
            scope["headers"].append((b"x-added", b"by middleware"))
            scope["headers"][:] = [(name, b"changed" if name == b"x-token" else value)
                                   for name, value in scope["headers"]]
            scope["method"], scope["raw_path"], scope["query_string"] = "PUT", b"/rewritten", b"b=2"
            await asgi_echo(scope, receive, send)

        for protocol in ("httptools", "h11"):
            layer = set_up_by_hand(self, asgi.Layer(rewriting_app, name=f"asgi_rewriting_{protocol}",
                                                    http_protocol=protocol))
            request = urllib.request.Request(layer["http_url"] + "original?a=1", data=b"body",
                                             headers={"X-Token": "sent"})
            self.assertEqual(urllib.request.urlopen(request, timeout=5).read(), b"echo:body")
            [recorded] = layer["http_requests"]
            self.assertEqual((recorded.method, recorded.path, recorded.query, recorded.body),
                             ("POST", "/original", "a=1", b"body"), protocol)
            self.assertEqual((recorded.headers["x-token"], recorded.headers["x-added"]), ("sent", None), protocol)

    def test_wsgi_record_keeps_no_stream_of_the_connection(self):
        def app(environ, start_response):
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]

        layer = set_up_by_hand(self, wsgi.Layer(app, name="wsgi_no_streams"))
        urllib.request.urlopen(layer["http_url"], data=b"body", timeout=5).close()
        unread = layer.requests._items[0]
        self.assertIsInstance(unread, _UnreadHead)
        self.assertEqual((type(unread.head), unread.body, unread.certificate), (bytes, b"body", None))

    def test_static_layer_records(self):
        layer = set_up_by_hand(self, static.Layer(name="static_recorded"))
        with open(os.path.join(layer["documentroot"], "f.txt"), "w") as file:
            file.write("file")
        urllib.request.urlopen(layer["http_url"] + "f.txt?v=2", timeout=5).close()
        [request] = layer["http_requests"]
        self.assertEqual((request.method, request.path, request.query), ("GET", "/f.txt", "v=2"))

    def test_content_layer_records(self):
        layer = set_up_by_hand(self, content.Layer(name="content_recorded"))
        request = urllib.request.Request(layer["http_url"] + "x", data=b"payload", method="PUT")
        with self.assertRaises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)
        self.assertEqual(layer["http_requests"][0].summary(), "PUT /x (7 bytes)")

    def test_a_layer_set_up_again_starts_without_the_requests_of_its_last_server(self):
        """Blocks of ``with layer:`` (a pytest test without layers, a
        script) run no testSetUp: the next block's server received nothing
        yet, and a wait_for must not return what the last one received."""
        for layer in (wsgi.Layer(echo_app, name="again_wsgi"), custom.Layer(EchoHandler, name="again_custom"),
                      content.Layer(name="again_content")):
            with layer:
                if isinstance(layer, content.Layer):
                    layer["http_content"].expect("/earlier", "POST").respond("ok")
                urllib.request.urlopen(layer["http_url"] + "earlier", data=b"", timeout=5).close()
            with layer:
                self.assertEqual(list(layer["http_requests"]), [], layer)
                with self.assertRaises(RequestTimeoutError):
                    layer["http_requests"].wait_for(1, timeout=0.01)

    def test_a_refused_second_set_up_keeps_the_requests(self):
        layer = set_up_by_hand(self, wsgi.Layer(echo_app, name="refused_again"))
        urllib.request.urlopen(layer["http_url"] + "kept", timeout=5).close()
        with self.assertRaises(SetUpError):
            layer.setUp()
        self.assertEqual([request.path for request in layer["http_requests"]], ["/kept"])




class EmptyLinesBeforeARequestTests(unittest.TestCase):
    """RFC 9112 section 2.2: empty lines before a request line are ignored,
    on every layer, as waitress does (http.server closed the connection)."""

    def test_the_requests_after_them_are_answered(self):
        for layer in (custom.Layer(EchoHandler, name="empty_lines_custom"), static.Layer(name="empty_lines_static"),
                      content.Layer(name="empty_lines_content"), wsgi.Layer(echo_app, name="empty_lines_wsgi")):
            with self.subTest(layer=layer):
                set_up_by_hand(self, layer)
                data = exchange(layer, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                                       b"\r\n\r\n" + LAST_GET)  # an extra CRLF after the body, and another
                responses, rest = parse_responses(data, ["POST", "GET"])
                self.assertEqual((len(responses), rest), (2, b""), data)
                self.assertEqual([request.path for request in layer["http_requests"]], ["/echo", "/last"])


def answers(data: bytes) -> list[tuple[int, str | None, bytes]]:
    """Status, Connection header and body of each response in ``data``,
    which holds nothing else."""
    found: list[tuple[int, str | None, bytes]] = []
    while data:
        [(status, headers, body)], data = parse_responses(data, ["POST"])
        found.append((status, headers["Connection"], body))
    return found


class UnannouncedBodyTests(unittest.TestCase):
    """A request without Content-Length or Transfer-Encoding has no body
    (RFC 9112 section 6.3), whatever its client sends after it; an HTTP/1.0
    one neither, whose body the end of the connection cannot end (RFC 1945
    section 7.2.2: the server could not answer). Every layer records it
    without one, as waitress and uvicorn read it, and hands its handler or
    application none; what the client sent after it is read as the next
    request, and gets a 400 with a status line once the requests before
    it are answered."""

    def set_up_layers(self, *, http_server_only: bool = False):
        """A layer of each kind (those built on http.server alone if told),
        each answering ``POST /echo``."""
        name = self._testMethodName
        layers = [custom.Layer(EchoHandler, name=f"custom_{name}"), static.Layer(name=f"static_{name}"),
                  content.Layer(name=f"content_{name}")]
        if not http_server_only:
            layers += [wsgi.Layer(echo_app, name=f"wsgi_{name}"), asgi.Layer(asgi_echo, name=f"asgi_{name}"),
                       asgi.Layer(asgi_echo, name=f"h11_{name}", http_protocol="h11")]
        for layer in layers:
            set_up_by_hand(self, layer)
        echo = layers[2]["http_content"].route("/echo", "POST")
        echo.respond_with(lambda request: content.Response(200, b"echo:" + request.body))
        return layers

    def answered(self, layer, body: bytes) -> tuple[int, bytes]:
        return (405, b"POST is not allowed here: a static file server answers GET and HEAD.\n") if isinstance(
            layer, static.Layer) else (200, b"echo:" + body)

    def test_what_follows_gets_a_400_once_the_request_is_answered(self):
        """The 400 came without a status line on the layers built on
        http.server (it answers a line it cannot parse as HTTP/0.9), and in
        place of the request's answer on the asgi layer's httptools."""
        unannounced = b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\nhello world\r\n\r\n"
        announced = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"
        for layer in self.set_up_layers():
            for data, bodies in ((unannounced, [b""]), (announced + unannounced, [b"ab", b""])):
                with self.subTest(layer=layer, pipelined=len(bodies)):
                    layer["http_requests"].clear()
                    found = answers(exchange(layer, data))
                    self.assertEqual([(status, body) for status, _, body in found[:-1]],
                                     [self.answered(layer, body) for body in bodies])
                    self.assertEqual(found[-1][:2], (400, "close"))
                    recorded = [(request.method, request.path, request.body) for request in layer["http_requests"]]
                    self.assertEqual(recorded, [("POST", "/echo", body) for body in bodies])

    def test_an_http_10_request_whose_client_ends_its_side(self):
        """``printf 'POST /echo HTTP/1.0\\r\\n\\r\\nhello' | nc -N``: answered
        without a body, and the connection ends (HTTP/1.0); with keep-alive
        asked for, what followed gets a 400 before it ends, or nothing where
        the server keeps no HTTP/1.0 connection alive (uvicorn's)."""
        for layer in self.set_up_layers():
            for keep_alive in (b"", b"Connection: keep-alive\r\n"):
                with self.subTest(layer=layer, keep_alive=keep_alive):
                    layer["http_requests"].clear()
                    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
                        sock.sendall(b"POST /echo HTTP/1.0\r\n" + keep_alive + b"\r\nhello")
                        sock.shutdown(socket.SHUT_WR)
                        received = b""
                        while chunk := sock.recv(65536):
                            received += chunk
                    found = answers(received)
                    self.assertEqual((found[0][0], found[0][2]), self.answered(layer, b""))
                    refused = [status for status, _, _ in found[1:]]
                    self.assertIn(refused, ([], [400]) if keep_alive else ([],))
                    self.assertEqual([(request.path, request.body) for request in layer["http_requests"]],
                                     [("/echo", b"")])

    def test_a_line_that_is_no_request_line_gets_a_status_line(self):
        """The layers built on http.server answer every request line they
        cannot parse in HTTP/1.x, with Connection: close."""
        for layer in self.set_up_layers(http_server_only=True):
            for line, status in ((b"hello", 400), (b"hello world", 400), (b"a b c d", 400),
                                 (b"GET / HTTX/1.1", 400), (b"GET / HTTP/2.0", 505)):
                with self.subTest(layer=layer, line=line):
                    [(got, connection, _)] = answers(exchange(layer, line + b"\r\nHost: x\r\n\r\n"))
                    self.assertEqual((got, connection), (status, "close"))
            self.assertEqual(list(layer["http_requests"]), [])


    def test_an_http_09_request_after_an_http_11_one_is_answered_in_http_09(self):
        # As on a connection of its own: no status line, no headers.
        static_layer = self.set_up_layers(http_server_only=True)[1]
        received = exchange(static_layer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /\r\n\r\n")
        first, _, second = received.partition(b"</html>\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n"), received[:100])
        self.assertTrue(second.startswith(b"<!DOCTYPE"), second[:100])


class ReadingInPiecesTests(unittest.TestCase):

    def test_a_body_is_read_a_piece_at_a_time(self):
        asked = []

        class File(io.BytesIO):
            def read(self, size=-1):
                asked.append(size)
                return super().read(size)

        body = bytes(200_000)
        self.assertEqual(recording._read_exactly(File(body), 10**9), body)  # the client sent less
        self.assertLessEqual(max(asked), recording._PIECE)


class BodyFirstTests(unittest.TestCase):
    """A handler reads a recorded body, then the connection, as one file."""

    def body_first(self, body=b"line 1\nline", rest=b" 2\nnext request"):
        return _BodyFirst(body, io.BufferedReader(io.BytesIO(rest)))

    def test_read(self):
        self.assertEqual(self.body_first().read(), b"line 1\nline 2\nnext request")
        self.assertEqual(self.body_first().read(None), b"line 1\nline 2\nnext request")
        self.assertEqual(self.body_first().read(0), b"")
        self.assertEqual(self.body_first().read(5), b"line ")
        self.assertEqual(self.body_first().read(11), b"line 1\nline")
        self.assertEqual(self.body_first().read(14), b"line 1\nline 2\n")

    def test_read1(self):
        stream = self.body_first()
        self.assertEqual(stream.read1(), b"line 1\nline")
        self.assertEqual(stream.read1(), b" 2\nnext request")
        self.assertEqual(self.body_first().read1(4), b"line")

    def test_readline(self):
        stream = self.body_first()
        self.assertEqual([stream.readline(), stream.readline(), stream.readline()],
                         [b"line 1\n", b"line 2\n", b"next request"])
        stream = self.body_first()
        self.assertEqual([stream.readline(None), stream.readline(None)], [b"line 1\n", b"line 2\n"])
        self.assertEqual(self.body_first().readline(0), b"")
        self.assertEqual(self.body_first().readline(4), b"line")
        stream = self.body_first()
        self.assertEqual([stream.readline(7), stream.readline(4), stream.readline(3)], [b"line 1\n", b"line", b" 2\n"])
        stream = self.body_first()
        stream.readline()
        self.assertEqual(stream.readline(6), b"line 2")  # 4 bytes of the body, 2 of the connection

    def test_readinto(self):
        stream, buffer = self.body_first(), bytearray(9)
        self.assertEqual((stream.readinto(buffer), bytes(buffer)), (9, b"line 1\nli"))
        self.assertEqual((stream.readinto(memoryview(buffer)[:4]), bytes(buffer[:4])), (4, b"ne 2"))
        buffer = bytearray(20)
        self.assertEqual((stream.readinto1(buffer), bytes(buffer[:13])), (13, b"\nnext request"))  # the connection's
        self.assertEqual(self.body_first().readinto1(bytearray(20)), 11)  # the body's rest first

    def test_lines(self):
        self.assertEqual(list(self.body_first()), [b"line 1\n", b"line 2\n", b"next request"])
        self.assertEqual(self.body_first().readlines(), [b"line 1\n", b"line 2\n", b"next request"])
        self.assertEqual(self.body_first().readlines(3), [b"line 1\n"])

    def test_peek(self):
        stream = self.body_first()
        stream.read(7)
        self.assertEqual(stream.peek(), b"line")
        self.assertEqual(stream.read(4), b"line")
        self.assertTrue(stream.peek().startswith(b" 2"))

    def test_anything_else_is_the_connections(self):
        stream = self.body_first()
        self.assertIs(stream.raw, stream.rest.raw)

    def test_handlers_read_the_body_every_way_http_server_lets_them(self):
        class Reading(custom.RequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self):
                length = int(self.headers["Content-Length"])
                buffer = bytearray(length)
                view, got = memoryview(buffer), 0
                while got < length and (count := self.rfile.readinto(view[got:])):
                    got += count
                self.answer(bytes(buffer[:got]))

            def do_POST(self):
                length, seen, lines = int(self.headers["Content-Length"]), 0, []
                for line in self.rfile:
                    lines.append(line.strip())
                    seen += len(line)
                    if seen >= length:
                        break
                self.answer(b",".join(lines))

            def answer(self, body):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        layer = set_up_by_hand(self, custom.Layer(Reading, name="READING_EVERY_WAY"))
        with requests.Session() as session:
            for _ in range(3):  # keep-alive: each request's body, then the next request
                self.assertEqual(session.put(layer["http_url"], data=b"payload", timeout=5).content, b"payload")
                self.assertEqual(session.post(layer["http_url"], data=b"a\nb\nc\n", timeout=5).content, b"a,b,c")


class RecordedRequestTests(unittest.TestCase):

    def test_a_recorded_request_cannot_be_changed(self):
        request = RecordedRequest("GET", "/", "", (("Host", "x"),), b"")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            request.path = "/changed"  # type: ignore[misc]


class UnreadHeadTests(unittest.TestCase):
    """The wsgi layer's requests, parsed from the head waitress parsed."""

    def test_folded_lines_continue_their_field(self):
        request = _UnreadHead(b"GET /a?b=c HTTP/1.1\r\nX-Long: one \r\n  two\r\n\tthree\r\nX-Empty:\r\n"
                              b" folded\r\nhost:x\r\n\r\n", b"", None).parse()
        self.assertEqual((request.method, request.path, request.query), ("GET", "/a", "b=c"))
        self.assertEqual(request.headers.items(), [("X-Long", "one two three"), ("X-Empty", "folded"), ("host", "x")])

    def test_a_request_line_without_a_version(self):
        request = _UnreadHead(b"GET /old", b"", None).parse()
        self.assertEqual((request.method, request.path, request.headers.items()), ("GET", "/old", []))


class SplitTargetTests(unittest.TestCase):

    def test_origin_and_absolute_forms(self):
        self.assertEqual(
            [split_target(target) for target in (
                "/a/b?c=d", "/", "/a?", "*", "example.com:443", "[::1]:8443", "localhost:80", "p?x=1", "http:///a",
            )],
            [("/a/b", "c=d", "", ""), ("/", "", "", ""), ("/a", "", "", ""), ("*", "", "", ""),
             ("example.com:443", "", "", ""), ("[::1]:8443", "", "", ""), ("localhost:80", "", "", ""),
             ("p", "x=1", "", ""), ("http:///a", "", "", "")],  # an authority-less "URL" is no absolute form
        )

    def test_the_absolute_form_keeps_its_scheme_and_authority_as_sent(self):
        self.assertEqual(
            [split_target(target) for target in (
                "http://host/a/b?c=d", "http://host", "http://host?c=d", "HTTPS://User@[::1]:8443//a%2Fb?c=d?e",
                "ws+x.y-z://h:1/p",
            )],
            [("/a/b", "c=d", "http", "host"), ("/", "", "http", "host"), ("/", "c=d", "http", "host"),
             ("//a%2Fb", "c=d?e", "HTTPS", "User@[::1]:8443"), ("/p", "", "ws+x.y-z", "h:1")],
        )
        request = RecordedRequest("GET", "/a", "b=c", (), b"", scheme="http", authority="host:80")
        self.assertEqual((request.target, str(request)), ("http://host:80/a?b=c", "GET http://host:80/a?b=c"))
        self.assertEqual(RecordedRequest("GET", "/a", "", (), b"").target, "/a")

    def test_a_proxy_stand_in_records_where_connect_asked_to_go(self):
        class Proxy(custom.RequestHandler):
            protocol_version = "HTTP/1.1"

            def do_CONNECT(self):
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True

        layer = set_up_by_hand(self, custom.Layer(Proxy, name="CONNECT_RECORDING"))
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as client:
            client.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            self.assertTrue(client.recv(100).startswith(b"HTTP/1.1 200 "))
        request = layer["http_requests"].wait_for(1)[0]
        self.assertEqual((request.method, request.path, request.query), ("CONNECT", "example.com:443", ""))
