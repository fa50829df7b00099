"""Chunked request bodies and ``Expect: 100-continue`` on the layers built
on ``http.server``: custom, static and content; and how the wsgi layer
records a chunked upload."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

import aiohttp
import httpx
import requests

from serverlayer import content, custom, static, wsgi
from serverlayer.content import Response
from serverlayer.tests.test_content_protocol import exchange, parse_responses

PIECES = [b'{"item": ', b'"tea", ', b'"count": 2}']
DECODED = b'{"item": "tea", "count": 2}'
#: DECODED as a client might chunk it: sizes in either case, extensions, trailers.
RAW_CHUNKED = (b"9;name=value\r\n" + DECODED[:9] + b"\r\n"
               b"A ; quoted=\"a;b\"\r\n" + DECODED[9:19] + b"\r\n"
               b"8\r\n" + DECODED[19:] + b"\r\n"
               b"0;last\r\nX-Checksum: 42\r\nX-Other: yes\r\n\r\n")
#: A last request, after which the server closes the connection.
CLOSING_POST = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def decode_chunked(rfile) -> bytes:
    """What a handler that understands chunked bodies does with ``rfile``."""
    body = b""
    while size := int(rfile.readline().split(b";")[0], 16):
        body += rfile.read(size)
        rfile.readline()
    while rfile.readline() not in (b"\r\n", b""):  # trailers
        pass
    return body


class Uploads(custom.RequestHandler):
    """Answers ``/decode`` with the body it decodes itself, anything else
    with its path, leaving the body unread."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        answer = f"seen {self.path}".encode()
        if self.path == "/decode":
            answer = decode_chunked(self.rfile)
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("X-Client-Port", str(self.client_address[1]))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_PUT = do_POST


class HTTP10Uploads(custom.RequestHandler):
    """An HTTP/1.0 handler (the default) that reads its body."""

    def do_POST(self):
        received = str(len(self.rfile.read(int(self.headers["Content-Length"])))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(received)))
        self.end_headers()
        self.wfile.write(received)


def uploads_app(environ, start_response):
    """What ``Uploads`` answers, reading the body waitress decoded."""
    environ["wsgi.input"].read()
    answer = f"seen {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Length", str(len(answer))), ("X-Client-Port", environ["REMOTE_PORT"])])
    return [answer]


UPLOADS = custom.Layer(Uploads, name="CHUNKED_UPLOADS")
WSGI_UPLOADS = wsgi.Layer(uploads_app, name="CHUNKED_WSGI_UPLOADS")
HTTP10_UPLOADS = custom.Layer(HTTP10Uploads, name="CHUNKED_HTTP10_UPLOADS")
STATIC = static.Layer(name="CHUNKED_STATIC")
CONTENT = content.Layer(name="CHUNKED_CONTENT")


class ChunkedUploadChecks:
    """A chunked POST from each client, then a GET on the same connection
    if the answer to the POST keeps it open.

    ``upload`` and ``follow`` are (path, status, body) of the two; a body
    of None is not compared.
    """

    upload: tuple[str, int, bytes | None]
    follow: tuple[str, int, bytes | None]
    #: Whether the handler names the client's port in ``X-Client-Port``.
    tells_port = False
    #: The body of the raw upload, as the client chunks it.
    raw_chunked = RAW_CHUNKED

    def url(self, path):
        return self.layer["http_url"] + path.lstrip("/")

    def check(self, upload, follow, ports=None):
        """``upload`` and ``follow`` are (status, body); ``ports`` the
        ``X-Client-Port`` of each answer, where the client reads headers."""
        for (path, status, body), got in ((self.upload, upload), (self.follow, follow)):
            self.assertEqual(got[0], status, f"{path}: {got}")
            if body is not None:
                self.assertEqual(got[1], body, path)
        if ports is not None and self.tells_port:
            self.assertNotIn(None, ports)
            self.assertEqual(len(set(ports)), 1, f"the client needed a new connection: {ports}")
        recorded = list(self.layer["http_requests"])
        self.assertEqual([(request.method, request.path, request.body) for request in recorded],
                         [("POST", self.upload[0], DECODED), ("GET", self.follow[0], b"")])
        self.assertEqual(recorded[0].headers["transfer-encoding"].lower(), "chunked")

    def test_requests_with_a_generator_body(self):
        with requests.Session() as session:
            first = session.post(self.url(self.upload[0]), data=iter(PIECES), timeout=5)
            second = session.get(self.url(self.follow[0]), timeout=5)
        self.check((first.status_code, first.content), (second.status_code, second.content),
                   [first.headers.get("X-Client-Port"), second.headers.get("X-Client-Port")])

    def test_httpx_with_an_iterator(self):
        with httpx.Client(timeout=5) as client:
            first = client.post(self.url(self.upload[0]), content=iter(PIECES))
            second = client.get(self.url(self.follow[0]))
        self.check((first.status_code, first.content), (second.status_code, second.content),
                   [first.headers.get("X-Client-Port"), second.headers.get("X-Client-Port")])

    def test_aiohttp_with_an_async_generator(self):
        async def pieces():
            for piece in PIECES:
                yield piece

        async def talk():
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(self.url(self.upload[0]), data=pieces()) as first:
                    upload = (first.status, await first.read(), first.headers.get("X-Client-Port"))
                async with session.get(self.url(self.follow[0])) as second:
                    follow = (second.status, await second.read(), second.headers.get("X-Client-Port"))
            return upload, follow

        upload, follow = asyncio.run(talk())
        self.check(upload[:2], follow[:2], [upload[2], follow[2]])

    def test_raw_chunks_with_extensions_and_trailers_then_a_pipelined_request(self):
        following = f"GET {self.follow[0]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        data = exchange(self.layer,
                        f"POST {self.upload[0]} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                        + self.raw_chunked + following)
        responses, rest = parse_responses(data, ["POST", "GET"])
        self.assertEqual(rest, b"")
        self.check(responses[0][::2], responses[1][::2])


class CustomLayerTests(ChunkedUploadChecks, unittest.TestCase):
    layer = UPLOADS
    upload = ("/upload", 200, b"seen /upload")
    follow = ("/next", 200, b"seen /next")
    tells_port = True

    def test_a_handler_decoding_the_chunks_itself_gets_them_as_sent(self):
        data = exchange(self.layer, b"POST /decode HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + RAW_CHUNKED
                                    + b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [(status, _, body), (_, _, follow)], rest = parse_responses(data, ["POST", "GET"])
        self.assertEqual((status, body, follow, rest), (200, DECODED, b"seen /next", b""))
        self.assertEqual(self.layer["http_requests"][0].body, DECODED)

    def test_a_body_the_handler_leaves_unread_is_not_read_as_the_next_request(self):
        data = exchange(self.layer, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nunread body"
                                    b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [first, second], rest = parse_responses(data, ["POST", "GET"])
        self.assertEqual((first[2], second[2], rest), (b"seen /upload", b"seen /next", b""))

    def test_a_one_byte_body_is_recorded_and_not_read_as_the_next_request(self):
        data = exchange(self.layer, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nX"
                                    b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [first, second], rest = parse_responses(data, ["POST", "GET"])
        self.assertEqual((first[2], second[2], rest), (b"seen /upload", b"seen /next", b""))
        self.assertEqual([request.body for request in self.layer["http_requests"]], [b"X", b""])

    def test_transfer_encoding_overrides_content_length(self):
        data = exchange(self.layer, b"POST /decode HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" + RAW_CHUNKED)
        [(status, headers, body)], rest = parse_responses(data, ["POST"])
        self.assertEqual((status, body, rest), (200, DECODED, b""))
        self.assertEqual(self.layer["http_requests"][0].body, DECODED)


class WSGILayerTests(ChunkedUploadChecks, unittest.TestCase):
    """waitress decodes the chunks; the request is recorded as sent,
    ``Transfer-Encoding: chunked`` and all."""

    layer = WSGI_UPLOADS
    upload = ("/upload", 200, b"seen /upload")
    follow = ("/next", 200, b"seen /next")
    tells_port = True
    # waitress refuses whitespace before a chunk extension's ";" (which
    # RFC 9112 allows) with a 400.
    raw_chunked = RAW_CHUNKED.replace(b"A ; quoted", b"A;quoted")


class StaticLayerTests(ChunkedUploadChecks, unittest.TestCase):
    """The static layer answers POST with 405, and the connection goes on:
    the chunked body was read, so the next request is understood."""

    layer = STATIC
    upload = ("/upload", 405, b"POST is not allowed here: a static file server answers GET and HEAD.\n")
    follow = ("/file.txt", 200, b"a file")

    def setUp(self):
        with open(os.path.join(self.layer["documentroot"], "file.txt"), "wb") as file:
            file.write(b"a file")


class ContentLayerTests(ChunkedUploadChecks, unittest.TestCase):
    layer = CONTENT
    upload = ("/orders", 201, b'{"ordered": {"item": "tea", "count": 2}}')
    follow = ("/orders", 404, b"")

    def setUp(self):
        http_content = self.layer["http_content"]
        http_content.route("/orders", "POST", headers={"Transfer-Encoding": "chunked"}).respond_with(
            lambda request: Response.json({"ordered": request.json()}, status=201)
        )


class MalformedChunkedBodyTests(unittest.TestCase):
    """A body that breaks the chunked coding gets a 400 that says how, and
    the connection is closed: what follows cannot be trusted."""

    layer = UPLOADS

    def answer(self, body: bytes, *, transfer_encoding: bytes = b"chunked", half_close: bool = False) -> bytes:
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + transfer_encoding
                         + b"\r\n\r\n" + body)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        return received

    def assertRefused(self, answer: bytes, reason: str) -> None:
        [(status, headers, page)], rest = parse_responses(answer, ["POST"])
        self.assertEqual((status, headers["Connection"], rest), (400, "close", b""))
        self.assertIn(reason, answer.split(b"\r\n")[0].decode())
        self.assertEqual(list(self.layer["http_requests"]), [])

    def test_bad_chunk_size(self):
        for size in (b"zz", b"0x3", b"+3", b"", b"1" * 17):
            with self.subTest(size=size):
                self.assertRefused(self.answer(size + b"\r\nabc\r\n0\r\n\r\n"), "bad chunk size")

    def test_a_bad_chunk_size_is_shown_in_its_first_20_bytes(self):
        self.assertRefused(self.answer(b"z" * 30 + b"\r\nabc\r\n0\r\n\r\n"),
                           "bad chunk size b'zzzzzzzzzzzzzzzzzzzz', expected 1 to 16 hex digits")

    def test_sizes_of_several_hex_digits(self):
        first, second = os.urandom(0x1A), os.urandom(0x100)
        answer = self.answer(b"1a\r\n" + first + b"\r\n100\r\n" + second + b"\r\n0\r\n\r\n", half_close=True)
        [(status, _, page)], rest = parse_responses(answer, ["POST"])
        self.assertEqual((status, page, rest), (200, b"seen /upload", b""))
        self.assertEqual([request.body for request in self.layer["http_requests"]], [first + second])

    def test_chunk_data_without_crlf(self):
        self.assertRefused(self.answer(b"3\r\nabcX\r\n0\r\n\r\n"), "chunk of 3 bytes not followed by CRLF")

    def test_connection_closed_in_the_middle(self):
        # The last: a line as long as allowed (65536 bytes), cut before its end.
        for body in (b"5\r\nab", b"5\r\nabcde", b"5\r\nabcde\r\n", b"5\r\nabcde\r\n0\r\nX-Trailer: 1\r\n", b"5",
                     b"3;" + b"x" * 65534):
            with self.subTest(body=body):
                self.assertRefused(self.answer(body, half_close=True), "connection closed")

    def test_a_hundred_trailer_fields_are_read_one_more_is_refused(self):
        for count, refused in ((100, False), (101, True)):
            trailers = b"".join(b"X-Trailer-%d: %d\r\n" % (number, number) for number in range(count))
            with self.subTest(count=count):
                answer = self.answer(b"3\r\nabc\r\n0\r\n" + trailers + b"\r\n", half_close=True)
                if refused:
                    self.assertRefused(answer, "more than 100 trailer fields")
                else:
                    [(status, headers, page)], rest = parse_responses(answer, ["POST"])
                    self.assertEqual((status, page, rest), (200, b"seen /upload", b""))
                    self.assertEqual([request.body for request in self.layer["http_requests"]], [b"abc"])
                    self.layer["http_requests"].clear()

    def test_a_line_is_as_long_as_http_server_allows_a_request_line(self):
        # http.server reads 65537 bytes of a request line and refuses more
        # than 65536: 65535 characters and CRLF pass, one more does not.
        for characters, refused in ((65535, False), (65536, True)):
            size_line = b"3;" + b"x" * (characters - 2) + b"\r\n"
            with self.subTest(characters=characters):
                answer = self.answer(size_line + b"abc\r\n0\r\n\r\n", half_close=True)
                if refused:
                    self.assertRefused(answer, "a line longer than 65536 bytes")
                else:
                    self.assertEqual(parse_responses(answer, ["POST"])[0][0][0], 200)
                    self.assertEqual([request.body for request in self.layer["http_requests"]], [b"abc"])
                    self.layer["http_requests"].clear()

    def test_chunked_after_another_coding_is_decoded_to_that_coding(self):
        answer = self.answer(b"3\r\nabc\r\n0\r\n\r\n", transfer_encoding=b"gzip, chunked", half_close=True)
        [(status, headers, page)], rest = parse_responses(answer, ["POST"])
        self.assertEqual((status, rest), (200, b""))
        self.assertEqual([request.body for request in self.layer["http_requests"]], [b"abc"])

    def test_a_transfer_coding_without_chunked_last(self):
        for codings in (b"gzip", b"chunked, br"):
            with self.subTest(codings=codings):
                self.assertRefused(self.answer(b"abc", transfer_encoding=codings, half_close=True),
                                   "chunked must be the last transfer coding")

    def test_a_request_http_server_refuses_is_neither_recorded_nor_handled(self):
        headers = b"".join(b"X-Header-%d: %d\r\n" % (number, number) for number in range(101))
        answer = exchange(self.layer, b"POST /upload HTTP/1.1\r\n" + headers + b"Content-Length: 3\r\n\r\nabc")
        [(status, _, _)], rest = parse_responses(answer, ["POST"])
        self.assertEqual((status, rest), (431, b""))  # http.server: too many headers
        self.assertEqual(list(self.layer["http_requests"]), [])


class ExpectContinueChecks:
    """Recording reads the body before the handler runs, so the interim
    ``100 Continue`` must come before that, and only once."""

    def expect_continue(self, framing, body, *, then=b"", version=b"HTTP/1.1"):
        """Send headers with ``Expect: 100-continue``, wait for the 100,
        then send ``body`` and ``then``; what follows the 100."""
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=0.5) as sock:
            sock.sendall(b"POST /upload " + version + b"\r\nHost: x\r\nExpect: 100-continue\r\n" + framing + b"\r\n")
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                interim += sock.recv(1)  # a timeout here: no 100 Continue
            self.assertRegex(interim, rb"^HTTP/1\.[01] 100 Continue\r\n")
            sock.settimeout(5)
            sock.sendall(body + then)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        self.assertNotIn(b" 100 Continue", received)  # only once
        return received


class ExpectContinueTests(ExpectContinueChecks, unittest.TestCase):
    layer = UPLOADS

    def test_content_length(self):
        received = self.expect_continue(b"Content-Length: 4\r\n", b"body", then=CLOSING_POST)
        [(status, _, _), _], rest = parse_responses(received, ["POST", "POST"])
        self.assertEqual((status, rest), (200, b""))
        self.assertEqual(self.layer["http_requests"][0].body, b"body")

    def test_chunked(self):
        received = self.expect_continue(b"Transfer-Encoding: chunked\r\n", RAW_CHUNKED, then=CLOSING_POST)
        [(status, _, _), _], rest = parse_responses(received, ["POST", "POST"])
        self.assertEqual((status, rest), (200, b""))
        self.assertEqual(self.layer["http_requests"][0].body, DECODED)


class RefusesExpectations(HTTP10Uploads):
    """Refuses every expectation, as a handler may that checks a request's
    headers before it wants the body."""

    def handle_expect_100(self):
        self.send_error(417)
        return False


class RefusedExpectationTests(unittest.TestCase):
    layer = custom.Layer(RefusesExpectations, name="CHUNKED_REFUSED_EXPECTATIONS")

    def test_a_refused_expectation_is_the_answer(self):
        """The client gets the refusal, without sending its body."""
        received = exchange(self.layer, b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 4\r\n\r\n")
        [(status, _, _)], rest = parse_responses(received, ["POST"])
        self.assertEqual((status, rest), (417, b""))
        self.assertEqual(list(self.layer["http_requests"]), [])


class HTTP10HandlerExpectContinueTests(ExpectContinueChecks, unittest.TestCase):
    """``BaseHTTPRequestHandler`` answers ``Expect`` only for HTTP/1.1 handlers."""

    layer = HTTP10_UPLOADS

    def test_content_length(self):
        received = self.expect_continue(b"Content-Length: 4\r\n", b"body")
        self.assertTrue(received.startswith(b"HTTP/1.0 200 "), received)
        self.assertTrue(received.endswith(b"\r\n\r\n4"), received)
        self.assertEqual(self.layer["http_requests"][0].body, b"body")

    def test_a_later_minor_version_of_http_1_gets_its_continue(self):
        received = self.expect_continue(b"Content-Length: 4\r\n", b"body", version=b"HTTP/1.2")
        self.assertTrue(received.startswith(b"HTTP/1.0 200 "), received)
        self.assertEqual(self.layer["http_requests"][0].body, b"body")

    def test_no_continue_unless_an_http_1_1_client_expects_it(self):
        """RFC 9110 section 10.1.1: a 100 only for a 100-continue
        expectation, never to an HTTP/1.0 client."""
        for head in (b"POST /upload HTTP/1.1\r\nHost: x\r\n",
                     b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: x-other\r\n",
                     b"POST /upload HTTP/1.0\r\nExpect: 100-continue\r\n"):
            with self.subTest(head=head):
                received = exchange(self.layer, head + b"Content-Length: 4\r\n\r\nbody")
                self.assertTrue(received.startswith(b"HTTP/1.0 200 "), received)
                self.assertTrue(received.endswith(b"\r\n\r\n4"), received)

    def test_no_body_no_continue(self):
        received = exchange(self.layer, b"POST /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                        b"Content-Length: 0\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.0 200 "), received)

    @unittest.skipIf(shutil.which("curl") is None, "curl is not installed")
    def test_curl_posting_2_mb_does_not_wait_a_second(self):
        """curl sends ``Expect: 100-continue`` with big bodies and waits
        a second for the 100 before sending anyway."""
        with tempfile.NamedTemporaryFile() as upload:
            upload.write(os.urandom(2_000_000))
            upload.flush()
            started = time.monotonic()
            completed = subprocess.run(
                ["curl", "--silent", "--show-error", "--data-binary", f"@{upload.name}", self.layer["http_url"]],
                capture_output=True, timeout=30,
            )
            took = time.monotonic() - started
        self.assertEqual((completed.stdout, completed.stderr), (b"2000000", b""))
        [request] = self.layer["http_requests"]
        self.assertEqual((len(request.body), request.headers["Expect"]), (2_000_000, "100-continue"))
        self.assertLess(took, 0.5)
