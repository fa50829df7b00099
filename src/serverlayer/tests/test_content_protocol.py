"""The content layer speaks HTTP/1.1 correctly: responses without a body,
HTTP/1.0 clients, and clients that give up on a delayed answer."""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import time
import unittest
from collections.abc import Sequence

import requests

from serverlayer import ConfigurationError, content
from serverlayer.content import Response

PROTOCOL_CONTENT = content.Layer(name="PROTOCOL_CONTENT")
PROTOCOL_CONTENT_TLS = content.Layer(name="PROTOCOL_CONTENT_TLS", tls=True)


class _NeverClosed(io.BytesIO):
    """A stream several ``HTTPResponse`` objects read one after another."""

    def close(self) -> None:
        pass


class _Replay:
    def __init__(self, data: bytes) -> None:
        self.file = _NeverClosed(data)

    def makefile(self, *args, **kwargs) -> _NeverClosed:
        return self.file


Parsed = tuple[int, http.client.HTTPMessage, bytes]


def parse_responses(data: bytes, methods: Sequence[str]) -> tuple[list[Parsed], bytes]:
    """The responses in ``data``, one per request method, read as
    http.client reads them, and whatever bytes follow the last one."""
    replay = _Replay(data)
    responses = []
    for method in methods:
        response = http.client.HTTPResponse(replay, method=method)  # type: ignore[arg-type]
        response.begin()
        responses.append((response.status, response.headers, response.read()))
    return responses, replay.file.read()


def exchange(layer, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on one connection and read until the server closes it."""
    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


class BodilessStatusTests(unittest.TestCase):
    layer = PROTOCOL_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def connection(self):
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        return connection

    def test_a_body_for_204_or_304_is_refused_when_programmed(self):
        route = self.http_content.route("/x")
        for programme in (
            lambda: route.respond("oops", status=204),
            lambda: route.respond(b"x", status=304),
            lambda: route.respond_json({"a": 1}, status=204),
            lambda: route.respond_sequence(Response(304, "stale")),
            lambda: self.http_content.serve_content("oops", code=204),
        ):
            with self.subTest(), self.assertRaises(ConfigurationError) as caught:
                programme()
            message = str(caught.exception)
            self.assertRegex(message, r"A (204|304) response has no body")
            self.assertIn("leave out the body", message)

    def test_a_1xx_status_is_refused_as_an_answer_however_given(self):
        # An interim response alone leaves the client waiting for the final one.
        route = self.http_content.route("/hints")
        for programme in (
            lambda: route.respond(status=103, headers={"Link": "</style.css>; rel=preload"}),
            lambda: route.respond("0123456789", status=100),
            lambda: route.respond_json({"a": 1}, status=102),
            lambda: route.respond_stream(["a"], status=102),
            lambda: route.respond_sse(["a"], status=199),
            lambda: route.respond_sequence(Response(103)),
            lambda: Response.json([1], status=100),
            lambda: self.http_content.serve_content("", code=103),
        ):
            with self.subTest(), self.assertRaises(ConfigurationError) as caught:
                programme()
            message = str(caught.exception)
            self.assertRegex(message, r"^(status|code)=1\d\d: a 1xx status is an interim response")
            self.assertIn("Answer with a final status, 200 to 999", message)
        route.respond(status=200, headers={"Link": "</style.css>; rel=preload"})
        with requests.get(self.layer["http_url"] + "hints", timeout=5) as response:
            self.assertEqual((response.status_code, response.headers["Link"]), (200, "</style.css>; rel=preload"))

    def test_101_is_an_answer_to_test_a_clients_upgrade_with(self):
        # Switching Protocols ends the HTTP exchange: no answer follows it.
        self.http_content.route("/socket").respond(
            status=101, headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": "bogus"})
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as client:
            client.sendall(b"GET /socket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            self.assertTrue(client.recv(65536).startswith(b"HTTP/1.1 101 "))

    def test_204_and_304_have_no_length_and_the_connection_goes_on(self):
        self.http_content.route("/deleted", "DELETE").respond(status=204, headers={"X-Done": "yes"})
        self.http_content.route("/cached").respond(status=304, headers={"ETag": '"v1"'})
        self.http_content.route("/next").respond("next")
        connection = self.connection()
        connection.connect()
        port = connection.sock.getsockname()[1]
        for method, path, status in (("DELETE", "/deleted", 204), ("GET", "/cached", 304)):
            connection.request(method, path)
            response = connection.getresponse()
            self.assertEqual((response.status, response.read()), (status, b""))
            self.assertIsNone(response.getheader("Content-Length"))
            self.assertIsNone(response.getheader("Transfer-Encoding"))
            connection.request("GET", "/next")
            self.assertEqual(connection.getresponse().read(), b"next")
        self.assertEqual(connection.sock.getsockname()[1], port)  # one connection throughout

    def test_204_chunked_sends_no_chunks(self):
        self.http_content.route("/nothing").respond(status=204, chunked=True)
        self.http_content.route("/next").respond("next")
        data = exchange(self.layer, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [(status, headers, body), second], rest = parse_responses(data, ["GET", "GET"])
        self.assertEqual((status, body, headers["Transfer-Encoding"], headers["Content-Length"]),
                         (204, b"", None, None))
        self.assertEqual((second[0], second[2], rest), (200, b"next", b""))

    def test_requests_session_after_204_and_304(self):
        self.http_content.route("/deleted").respond(status=204)
        self.http_content.route("/cached").respond(status=304)
        self.http_content.route("/next").respond("next")
        with requests.Session() as session:
            for path, status in (("/deleted", 204), ("/cached", 304)):
                self.assertEqual(session.get(self.layer["http_url"] + path.lstrip("/"), timeout=5).status_code,
                                 status)
                self.assertEqual(session.get(self.layer["http_url"] + "next", timeout=5).content, b"next")

    def test_head_has_the_get_length_and_no_body(self):
        self.http_content.route("/page").respond("twelve bytes")
        self.http_content.route("/stream").respond("streamed", chunked=True)
        data = exchange(self.layer, b"HEAD /page HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [page, stream, get], rest = parse_responses(data, ["HEAD", "HEAD", "GET"])
        self.assertEqual((page[0], page[1]["Content-Length"], page[2]), (200, "12", b""))
        self.assertEqual((stream[0], stream[1]["Transfer-Encoding"], stream[2]), (200, "chunked", b""))
        self.assertEqual((get[0], get[2], rest), (200, b"twelve bytes", b""))


class HTTP10Tests(unittest.TestCase):
    layer = PROTOCOL_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_chunked_answer_to_http_10_is_sent_whole_and_the_connection_closed(self):
        self.http_content.route("/stream").respond("sent in chunks to HTTP/1.1", chunked=True)
        for request in (b"GET /stream HTTP/1.0\r\n\r\n",
                        b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"):
            with self.subTest(request=request):
                data = exchange(self.layer, request, timeout=2)  # closed by the server, or a timeout
                head, _, body = data.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
                self.assertNotIn(b"transfer-encoding", head.lower())
                self.assertIn(b"\r\nConnection: close", head)
                self.assertEqual(body, b"sent in chunks to HTTP/1.1")

    def test_a_chunked_answer_cut_short_tells_an_http_10_client_its_whole_length(self):
        # Without chunks or a length, the cut would look like the end of the body.
        self.http_content.route("/cut").respond("0123456789", truncate=4, chunked=True)
        data = exchange(self.layer, b"GET /cut HTTP/1.0\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 10\r\n", head + b"\r\n")
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(body, b"0123")
        with self.assertRaises(http.client.IncompleteRead):
            parse_responses(data, ["GET"])


class ChunkedTests(unittest.TestCase):
    layer = PROTOCOL_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_a_chunked_body_goes_in_two_chunks(self):
        self.http_content.route("/stream").respond("in two chunks", chunked=True)
        data = exchange(self.layer, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nTransfer-Encoding: chunked", head)
        self.assertEqual(body, b"6\r\nin two\r\n7\r\n chunks\r\n0\r\n\r\n")

    def test_a_later_http_1_minor_version_gets_chunks_as_http_11_does(self):
        # RFC 9112 section 2.3: answer as the highest 1.x version the server speaks.
        self.http_content.route("/stream").respond("chunked for 1.1 and later", chunked=True)
        data = exchange(self.layer, b"GET /stream HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n")
        [(status, headers, body)], rest = parse_responses(data, ["GET"])
        self.assertEqual((status, headers["Transfer-Encoding"], body, rest),
                         (200, "chunked", b"chunked for 1.1 and later", b""))


class HeaderTests(unittest.TestCase):
    """The headers a test gives go out as given, once each, in place of the layer's own."""

    layer = PROTOCOL_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_a_content_type_given_replaces_the_json_default(self):
        self.http_content.route("/problem").respond_json(
            {"title": "Bad"}, status=400, headers={"Content-Type": "application/problem+json"})
        self.http_content.route("/lower").respond_sequence(
            Response.json([1], headers=[("content-type", "application/vnd.api+json")]))
        self.http_content.route("/plain").respond_json({"a": 1})
        data = exchange(self.layer, b"GET /problem HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /lower HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [problem, lower, plain], rest = parse_responses(data, ["GET", "GET", "GET"])
        self.assertEqual((problem[0], problem[1].get_all("Content-Type"), problem[2]),
                         (400, ["application/problem+json"], b'{"title": "Bad"}'))
        self.assertEqual(lower[1].get_all("Content-Type"), ["application/vnd.api+json"])
        self.assertEqual(plain[1].get_all("Content-Type"), ["application/json"])
        self.assertEqual(rest, b"")

    def test_a_date_or_server_given_replaces_the_servers_own(self):
        self.http_content.route("/old").respond("cached", headers={
            "Date": "Mon, 01 Jan 2024 00:00:00 GMT", "server": "nginx/1.25", "Cache-Control": "max-age=60"})
        self.http_content.route("/new").respond("fresh")
        data = exchange(self.layer, b"GET /old HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /new HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [old, new], rest = parse_responses(data, ["GET", "GET"])
        self.assertEqual((old[1].get_all("Date"), old[1].get_all("Server"), old[2]),
                         (["Mon, 01 Jan 2024 00:00:00 GMT"], ["nginx/1.25"], b"cached"))
        [server] = new[1].get_all("Server")
        self.assertEqual((len(new[1].get_all("Date")), server.split("/")[0], rest), (1, "BaseHTTP", b""))


class FramingTests(unittest.TestCase):
    """A response goes out framed one way, the layer's: headers that would
    frame it otherwise are refused when the test declares them."""

    layer = PROTOCOL_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_a_transfer_encoding_header_on_a_whole_body_is_refused(self):
        route = self.http_content.route("/te")
        for programme in (
            lambda: route.respond("hello", headers={"Transfer-Encoding": "chunked"}),
            lambda: route.respond(headers=[("transfer-encoding", "gzip")], status=204),
            lambda: route.respond_json({"a": 1}, headers={"Transfer-Encoding": "chunked"}),
            lambda: route.respond_sequence(Response(200, "hello", {"Transfer-Encoding": "chunked"})),
            lambda: self.http_content.serve_content("hello", headers={"Transfer-Encoding": "chunked"}),
        ):
            with self.subTest(), self.assertRaises(ConfigurationError) as caught:
                programme()
            self.assertIn("leave out the header and write chunked=True", str(caught.exception))
        route.respond("hello", chunked=True)  # what the header meant: chunks, framed by the layer
        data = exchange(self.layer, b"GET /te HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [(status, headers, body)], rest = parse_responses(data, ["GET"])
        self.assertEqual((status, headers.get_all("Transfer-Encoding"), headers["Content-Length"], body, rest),
                         (200, ["chunked"], None, b"hello", b""))

    def test_a_content_length_other_than_the_bodys_is_refused(self):
        route = self.http_content.route("/length")
        for headers in ({"Content-Length": "3"}, {"content-length": "6"}, {"Content-Length": "five"}):
            with self.subTest(headers=headers), self.assertRaises(ConfigurationError) as caught:
                route.respond("hello", headers=headers)
            self.assertIn("but the body is 5 bytes", str(caught.exception))
        with self.assertRaises(ConfigurationError):
            route.respond("héllo", headers={"Content-Length": "5"})  # six bytes in UTF-8

    def test_a_content_length_that_is_the_bodys_goes_out_once(self):
        self.http_content.route("/length").respond("héllo", headers={"Content-Length": "6"})
        # A 304 may name the length a 200 would have (RFC 9110 section 8.6).
        self.http_content.route("/cached").respond(status=304, headers={"Content-Length": "1234"})
        data = exchange(self.layer, b"GET /length HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /cached HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [length, cached], rest = parse_responses(data, ["GET", "GET"])
        self.assertEqual((length[1].get_all("Content-Length"), length[2]), (["6"], "héllo".encode()))
        self.assertEqual((cached[0], cached[1].get_all("Content-Length"), cached[2], rest),
                         (304, ["1234"], b"", b""))

    def test_a_content_length_without_a_body_answers_head_with_the_length_of_a_get(self):
        # RFC 9110 section 8.6: a HEAD answer may name the length of what GET
        # would send; a body that large need not be made to say so.
        self.http_content.route("/big.iso", "HEAD").respond(headers={"Content-Length": "4700000000"})
        self.http_content.route("/zero", "GET").respond("hello", headers={"Content-Length": "05"})
        self.http_content.route("/gone").respond(reset=True, headers={"Content-Length": "100"})  # no head is sent
        data = exchange(self.layer, b"HEAD /big.iso HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /zero HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        [big, zero], rest = parse_responses(data, ["HEAD", "GET"])
        self.assertEqual((big[0], big[1].get_all("Content-Length"), big[2]), (200, ["4700000000"], b""))
        self.assertEqual((zero[1].get_all("Content-Length"), zero[2], rest), (["05"], b"hello", b""))


def tls_exchange(layer, data: bytes) -> bytes:
    """Send ``data`` over TLS on one connection and read until the server
    ends it (its TLS close_notify, or the TCP connection's end). The TLS is
    done in memory over a plain socket, so that a TCP reset raises
    ``ConnectionResetError``: Python's ssl sockets, with OpenSSL 3, report
    one as an end of stream like any other."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = layer["ssl_context"].wrap_bio(incoming, outgoing, server_hostname="localhost")
    received = b""
    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
        handshaken = False
        while True:
            if not handshaken:
                try:
                    tls.do_handshake()
                    handshaken = True
                    tls.write(data)
                except ssl.SSLWantReadError:
                    pass
            sock.sendall(outgoing.read())
            chunk = sock.recv(65536)  # a reset raises here
            if not chunk:
                return received
            incoming.write(chunk)
            while handshaken:
                try:
                    decrypted = tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    return received
                if not decrypted:  # the server's close_notify
                    return received
                received += decrypted


class TLSResetTests(unittest.TestCase):
    layer = PROTOCOL_CONTENT_TLS

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_a_reset_reaches_the_client_through_tls_as_a_reset(self):
        self.http_content.route("/reset").respond(reset=True)
        self.http_content.route("/fine").respond("fine")
        answer = tls_exchange(self.layer, b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nfine"), answer)
        with self.assertRaises(ConnectionResetError):
            tls_exchange(self.layer, b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.layer["httpd"].wait_quiet(5))


class GivingUpTests(unittest.TestCase):
    layer = PROTOCOL_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_a_client_that_gives_up_on_a_delay_frees_its_thread(self):
        self.http_content.route("/slow").respond("late", delay=30)
        client = socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5)
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.layer["http_requests"].wait_for(1)
        client.close()
        started = time.monotonic()
        self.assertTrue(self.layer["httpd"].wait_quiet(2), "the handler still waits for its delay")
        self.assertLess(time.monotonic() - started, 1)

    def test_a_client_that_gives_up_with_a_request_body(self):
        self.http_content.route("/slow").respond("late", delay=30)
        client = socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5)
        client.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        self.layer["http_requests"].wait_for(1)
        client.close()
        started = time.monotonic()
        self.assertTrue(self.layer["httpd"].wait_quiet(2), "the handler still waits for its delay")
        self.assertLess(time.monotonic() - started, 1)

    def test_a_pipelined_request_does_not_cut_the_delay_short(self):
        self.http_content.route("/slowish").respond("late", delay=0.3)
        self.http_content.route("/next").respond("next")
        started = time.monotonic()
        data = exchange(self.layer, b"GET /slowish HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        [first, second], rest = parse_responses(data, ["GET", "GET"])
        self.assertEqual((first[2], second[2], rest), (b"late", b"next", b""))

    def pipelined_during_delay(self, delay: float) -> tuple[bytes, float, float]:
        """Ask for /slowish, answered after ``delay``, and for /next while
        the server waits: what came back, the time it took, and the
        process's CPU time meanwhile."""
        self.http_content.route("/slowish").respond("late", delay=delay)
        self.http_content.route("/next").respond("next")
        started, cpu = time.monotonic(), time.process_time()
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as client:
            client.sendall(b"GET /slowish HTTP/1.1\r\nHost: x\r\n\r\n")
            self.layer["http_requests"].wait_for(1)
            # Read from the connection, not buffered with the first request.
            client.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := client.recv(65536):
                data += chunk
        return data, time.monotonic() - started, time.process_time() - cpu

    def test_a_request_arriving_during_a_delay_is_answered_after_it(self):
        data, took, _ = self.pipelined_during_delay(0.05)
        self.assertGreaterEqual(took, 0.05)
        self.assertLess(took, 0.5)
        [first, second], rest = parse_responses(data, ["GET", "GET"])
        self.assertEqual((first[2], second[2], rest), (b"late", b"next", b""))

    def test_a_request_arriving_during_a_delay_does_not_keep_the_server_busy(self):
        data, took, cpu = self.pipelined_during_delay(0.3)
        self.assertGreaterEqual(took, 0.3)
        self.assertLess(cpu, 0.15, "the server spins while it waits")
        [first, second], _ = parse_responses(data, ["GET", "GET"])
        self.assertEqual((first[2], second[2]), (b"late", b"next"))

    def test_a_client_that_stops_sending_gets_no_answers_at_all(self):
        # Shutting down its sending side counts as gone: neither the delayed
        # answer nor one to a request sent with it comes.
        self.http_content.route("/slow").respond("late", delay=30)
        self.http_content.route("/next").respond("next")
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as client:
            client.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            client.shutdown(socket.SHUT_WR)
            self.assertEqual(client.recv(65536), b"")

    def test_a_short_delay_is_not_much_longer(self):
        self.http_content.route("/slowish").respond("late", delay=0.05)
        started = time.monotonic()
        self.assertEqual(requests.get(self.layer["http_url"] + "slowish", timeout=5).content, b"late")
        self.assertLess(time.monotonic() - started, 0.8)

    def test_a_request_arriving_during_a_delay_of_centuries_is_no_error(self):
        # Waiting for the server to stop, a lock's wait raised OverflowError
        # on a timeout past threading.TIMEOUT_MAX (292 years).
        layer = content.Layer(name="delay_centuries_pipelined")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        layer.testSetUp()
        layer["http_content"].route("/forever").respond(delay=1e10)
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        layer["http_requests"].wait_for(1)
        client.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)  # the server sees the second request, and waits on
        layer.check_server_errors()
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)
        layer.check_server_errors()

    def test_teardown_is_not_held_up_by_a_delay_with_a_request_waiting(self):
        layer = content.Layer(name="delay_pipelined_teardown")
        layer.setUp()
        self.addCleanup(layer.tearDown)  # if the test fails before its own
        layer.testSetUp()
        layer["http_content"].route("/forever").respond(delay=60)
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        layer["http_requests"].wait_for(1)
        client.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)
