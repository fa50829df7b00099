"""The content layer streams: bodies sent chunk by chunk at a pace, and
Server-Sent Events, read as streaming clients read them (httpx, aiohttp,
http.client)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import socket
import threading
import time
import unittest
from decimal import Decimal
from fractions import Fraction
from http import HTTPStatus
from typing import Any
from unittest import mock

import aiohttp
import httpx

from serverlayer import ConfigurationError, content
from serverlayer.content import Event, Response
from serverlayer.tests.helpers import raw_request, set_up_by_hand, thread_names
from serverlayer.tests.test_hardening import read_until_closed

STREAMING = content.Layer(name="STREAMING")
STREAMING_TLS = content.Layer(name="STREAMING_TLS", tls=True)


class StreamTests(unittest.TestCase):
    layer = STREAMING

    def setUp(self):
        self.http_content = self.layer["http_content"]
        self.client = httpx.Client(base_url=self.layer["http_url"], timeout=10)
        self.addCleanup(self.client.close)

    def test_chunks_arrive_one_by_one_at_the_interval(self):
        self.http_content.route("/tokens").respond_stream(["Hel", b"lo", " world"], interval=0.1)
        started = time.monotonic()
        with self.client.stream("GET", "/tokens") as response:
            self.assertEqual(response.headers["Transfer-Encoding"], "chunked")
            chunks = list(response.iter_raw())
        self.assertEqual(chunks, [b"Hel", b"lo", b" world"])  # one read each: they came apart
        # The last chunk leaves two intervals after the request arrived.
        # Only a lower bound: a busy machine stretches, never shrinks.
        self.assertGreaterEqual(time.monotonic() - started, 0.2)

    def test_a_generator_is_read_as_the_stream_goes_out(self):
        read = []

        def ticks():  # as good as endless; bounded, so that reading it whole fails rather than hangs
            for number in range(100_000):
                read.append(number)
                yield f"tick {number}\n"

        self.http_content.route("/ticks").respond_stream(ticks(), interval=0.01)  # returns at once
        self.assertEqual(read, [])
        with self.client.stream("GET", "/ticks") as response:
            lines = list(itertools.islice(response.iter_lines(), 5))
        self.assertEqual(lines, [f"tick {number}" for number in range(5)])
        self.assertTrue(self.layer["httpd"].wait_quiet(5))  # the client left: the stream ended
        self.assertLess(len(read), 100)
        with self.client.stream("GET", "/ticks") as response:  # the next request goes on with it
            [line] = itertools.islice(response.iter_lines(), 1)
        self.assertGreaterEqual(int(line.split()[1]), 5)
        self.assertTrue(self.layer["httpd"].wait_quiet(5))

    def test_a_generators_chunk_is_read_when_it_is_due_not_an_interval_before(self):
        read_at = []

        def now():
            for _ in range(2):
                read_at.append(time.monotonic())
                yield f"{read_at[-1]}\n"

        self.http_content.route("/now").respond_stream(now(), interval=0.2)
        with self.client.stream("GET", "/now") as response:
            lines = list(response.iter_lines())
        self.assertEqual(lines, [f"{at}" for at in read_at])
        # Only a lower bound: a busy machine stretches the pause, never shrinks it.
        self.assertGreaterEqual(read_at[1] - read_at[0], 0.2)

    def test_a_client_leaving_a_generators_stream_leaves_its_next_chunk_to_the_next_request(self):
        read = []

        def ticks():
            for number in itertools.count():
                read.append(number)
                yield f"tick {number}\n"

        # The first chunk goes at once; the client leaves during the long pause after it.
        self.http_content.route("/ticks").respond_stream(ticks(), interval=30)
        for expected in ("tick 0", "tick 1"):
            with self.client.stream("GET", "/ticks") as response:
                self.assertEqual(next(response.iter_lines()), expected)
            self.assertTrue(self.layer["httpd"].wait_quiet(5))  # the stream saw its client leave
        self.assertEqual(read, [0, 1])

    def test_server_sent_events_from_a_generator(self):
        def events():
            yield {"delta": "Hel"}
            yield Event("lo", event="delta", id="2")

        self.http_content.route("/events").respond_sse(events())
        body = self.client.get("/events").text
        self.assertEqual(body, 'data: {"delta": "Hel"}\n\nevent: delta\nid: 2\ndata: lo\n\n')

    def test_a_generator_that_raises_or_yields_no_chunk_fails_the_test(self):
        def broken():
            yield "fine"
            raise ConnectionRefusedError(111, "the backend is down")

        def wrong():
            yield "fine"
            yield 42

        for path, chunks, reported in (("/broken", broken(), "ScriptError: the stream's chunks"),
                                       ("/wrong", wrong(), "chunks[1]: a body or chunk is bytes or str, not 42")):
            with self.subTest(path=path):
                self.http_content.route(path).respond_stream(chunks)
                with contextlib.suppress(httpx.HTTPError):
                    self.client.get(path)
                self.assertTrue(self.layer["httpd"].wait_quiet(5))
                [error] = self.layer.server_errors.take()
                self.assertIn(reported, error)

    def test_a_number_as_a_header_value_goes_out_as_python_writes_it(self):
        self.http_content.route("/rate").respond("x", headers={"X-Rate": 1.5})
        self.http_content.serve_content("y", headers={"X-Rate": 2.5})
        self.assertEqual(self.client.get("/rate").headers["X-Rate"], "1.5")
        self.assertEqual(self.client.get("/other").headers["X-Rate"], "2.5")

    def test_a_stream_without_interval_is_one_chunked_body(self):
        self.http_content.route("/all").respond_stream([b"a", b"", b"b"])
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=10)
        self.addCleanup(connection.close)
        started = time.monotonic()
        for _ in range(2):  # and the connection stays usable
            connection.request("GET", "/all")
            response = connection.getresponse()
            self.assertTrue(response.chunked)
            self.assertEqual(response.read(), b"ab")  # the empty chunk did not end the body early
        self.assertLess(time.monotonic() - started, 1.0)  # ~10 ms here: no pause between the chunks

    def test_an_http_1_0_client_gets_the_stream_until_the_connection_closes(self):
        self.http_content.route("/old").respond_stream([b"one ", b"two"], interval=0.01)
        data = raw_request(self.layer["http_host"], self.layer["http_port"], b"GET /old HTTP/1.0\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"Connection: close", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b"one two")

    def test_head_gets_the_headers_only(self):
        self.http_content.route("/tokens").respond_stream([b"never"], interval=30)
        started = time.monotonic()
        response = self.client.head("/tokens")
        self.assertEqual((response.status_code, response.content), (200, b""))
        self.assertLess(time.monotonic() - started, 15)  # not held up by the interval

    def test_a_client_that_leaves_mid_stream_ends_it_without_an_error(self):
        self.http_content.route("/long").respond_stream([b"x" * 100] * 1000, interval=0.5)
        with self.client.stream("GET", "/long") as response:
            self.assertEqual(next(response.iter_raw()), b"x" * 100)
        # The stream would take 500 s; the server notices the close at its next pause.
        self.assertTrue(self.layer["httpd"].wait_quiet(5), "the server still streams to a client that left")

    def test_a_stream_stalled_for_years_waits_without_raising(self):
        # poll() takes at most 24.8 days: the server raised OverflowError
        # (and cut the stream) at the first pause longer than that.
        for label, interval in (("1e8", 1e8), ("10**400, past what a float holds", 10**400)):
            with self.subTest(interval=label):
                self.http_content.reset()
                self.http_content.route("/stalled").respond_stream([b"first", b"never"], interval=interval)
                with self.client.stream("GET", "/stalled", timeout=0.3) as response:
                    chunks = response.iter_raw()
                    self.assertEqual(next(chunks), b"first")
                    with self.assertRaises(httpx.ReadTimeout):
                        next(chunks)
                self.assertTrue(self.layer["httpd"].wait_quiet(5))  # the client left: the stream ended
                self.layer.check_server_errors()

    def test_a_delay_of_years_waits_without_raising(self):
        self.http_content.route("/late").respond("never", delay=1e8)
        with self.assertRaises(httpx.ReadTimeout):
            self.client.get("/late", timeout=0.3)
        self.assertTrue(self.layer["httpd"].wait_quiet(5))
        self.layer.check_server_errors()

    def test_a_stream_keeps_its_headers(self):
        self.http_content.route("/tokens").respond_stream([b"a"], headers={"X-Model": "tiny"})
        self.assertEqual(self.client.get("/tokens").headers["X-Model"], "tiny")

    def test_sse_in_a_sequence(self):
        self.http_content.route("/events").respond_sequence(Response(503), Response.sse(["a", "b", "c"]))
        self.assertEqual(self.client.get("/events").status_code, 503)
        started = time.monotonic()
        response = self.client.get("/events")
        self.assertEqual((response.status_code, response.text), (200, "data: a\n\ndata: b\n\ndata: c\n\n"))
        self.assertLess(time.monotonic() - started, 1.0)  # ~10 ms here: no pause between the events

    def test_a_sequence_can_stream(self):
        self.http_content.route("/retry").respond_sequence(
            Response(503), Response.stream([b"o", b"k"]), Response(chunks=(b"o", b"k", b"!"))
        )
        self.assertEqual(self.client.get("/retry").status_code, 503)
        started = time.monotonic()
        for body in (b"ok", b"ok!"):
            response = self.client.get("/retry")
            self.assertEqual((response.status_code, response.content), (200, body))
        self.assertLess(time.monotonic() - started, 1.0)  # ~10 ms here: no pause between the chunks


class SSETests(unittest.TestCase):
    layer = STREAMING

    def setUp(self):
        self.http_content = self.layer["http_content"]
        self.client = httpx.Client(base_url=self.layer["http_url"], timeout=10)
        self.addCleanup(self.client.close)

    def read_lines(self, path: str) -> tuple[httpx.Headers, list[str]]:
        with self.client.stream("GET", path) as response:
            self.status = response.status_code
            return response.headers, list(response.iter_lines())

    def test_llm_style_json_deltas(self):
        self.http_content.route("/v1/chat").respond_sse([{"delta": "Hel"}, {"delta": "lo"}, "[DONE]"], interval=0.01)
        headers, lines = self.read_lines("/v1/chat")
        self.assertEqual(self.status, 200)
        self.assertEqual(headers["Content-Type"], "text/event-stream; charset=utf-8")
        self.assertEqual(headers["Cache-Control"], "no-cache")
        self.assertEqual(lines, ['data: {"delta": "Hel"}', "", 'data: {"delta": "lo"}', "", "data: [DONE]", ""])

    def test_every_field_of_an_event(self):
        self.http_content.route("/events").respond_sse([
            Event("line one\nline two\r\nline three", event="update", id="7", retry=1500, comment="hi"),
            Event(None, retry=0),
        ])
        started = time.monotonic()
        _, lines = self.read_lines("/events")
        self.assertLess(time.monotonic() - started, 1.0)  # ~10 ms here: no pause between the events
        self.assertEqual(lines, [
            ": hi", "event: update", "id: 7", "retry: 1500",
            "data: line one", "data: line two", "data: line three", "",
            "retry: 0", "",
        ])

    def test_a_comment_alone_sends_no_data_and_empty_data_is_a_message(self):
        self.http_content.route("/events").respond_sse(
            [Event(comment="keep-alive"), Event(""), Event(event="ping", id="3"), Event(None, id="4"), "Hi"])
        _, lines = self.read_lines("/events")
        # Clients dispatch a message for an event with a data line: the
        # comment alone and Event(None) have none; a named event without
        # data has empty data, for a browser's listener of "ping" to fire.
        self.assertEqual(lines, [": keep-alive", "", "data: ", "", "event: ping", "id: 3", "data: ", "",
                                 "id: 4", "", "data: Hi", ""])

    def test_headers_given_win_over_the_defaults(self):
        self.http_content.route("/events").respond_sse(["x"], headers={"content-type": "text/event-stream"})
        headers, _ = self.read_lines("/events")
        self.assertEqual(headers.get_list("Content-Type"), ["text/event-stream"])

    def test_aiohttp_reads_the_events_as_they_come(self):
        self.http_content.route("/events").respond_sse(["a", "b", "c"], interval=0.05)

        async def read() -> list[bytes]:
            async with aiohttp.ClientSession() as session, session.get(self.layer["http_url"] + "events") as response:
                return [line async for line in response.content]

        self.assertEqual(asyncio.run(read()), [b"data: a\n", b"\n", b"data: b\n", b"\n", b"data: c\n", b"\n"])

    def test_bad_event_fields_are_refused(self):
        for fields, message in [
            ({"id": "a\nb"}, "Event id='a\\nb': a single line of text."),
            ({"event": "x\r"}, "Event event='x\\r': a single line of text."),
            ({"id": "a\0"}, "Event id='a\\x00': clients ignore an id with a NUL in it."),
            ({"retry": -1}, "Event retry=-1: milliseconds, a whole number 0 or more."),
            ({"retry": 1.5}, "Event retry=1.5: milliseconds, a whole number 0 or more."),
            ({"retry": True}, "Event retry=True: milliseconds, a whole number 0 or more."),
        ]:
            with self.subTest(fields=fields), self.assertRaises(ConfigurationError) as caught:
                Event("data", **fields)
            self.assertEqual(str(caught.exception), message)

    def test_data_that_is_no_text_nor_json_is_refused(self):
        for data, message in [
            (b"raw", "Event data=b'raw': events carry text; decode the bytes, or give a str."),
            (float("nan"), "Event data=nan is no JSON value (Out of range float values are not JSON compliant"),
            ({1, 2}, "Event data={1, 2} is no JSON value (Object of type set is not JSON serializable): give a str."),
        ]:
            with self.subTest(data=data), self.assertRaises(ConfigurationError) as caught:
                self.http_content.route("/events").respond_sse([data])
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))

    def test_none_in_the_list_is_json_null_and_an_event_of_none_has_no_data(self):
        self.http_content.route("/events").respond_sse([None, Event(None, event="ping")])
        _, lines = self.read_lines("/events")
        self.assertEqual(lines, ["data: null", "", "event: ping", ""])


class StreamConfigurationTests(unittest.TestCase):

    def test_a_stream_takes_no_body_truncate_or_bodiless_status(self):
        for arguments in ({"body": b"x"}, {"truncate": 1}, {"status": 204}, {"status": 304}):
            with self.subTest(arguments=arguments), self.assertRaises(ConfigurationError) as caught:
                Response(chunks=(b"a",), **arguments)
            self.assertIn("A streamed response sends its chunks as its body", str(caught.exception))

    def test_a_chunked_or_streamed_response_takes_no_framing_headers(self):
        for headers in ({"Transfer-Encoding": "chunked"}, [("content-length", "3")]):
            with self.subTest(headers=headers), self.assertRaises(ConfigurationError) as caught:
                Response.stream([b"a"], headers=headers)
            self.assertIn("frames its body itself: leave out the", str(caught.exception))
            with self.subTest(headers=headers, chunked=True), self.assertRaises(ConfigurationError):
                Response(body=b"abc", chunked=True, headers=headers)

    def test_interval_must_be_zero_or_more(self):
        for interval in (-0.1, float("nan")):
            with self.subTest(interval=interval), self.assertRaises(ConfigurationError):
                Response.stream([b"a"], interval=interval)

    def test_interval_must_be_a_finite_number(self):
        # inf made a wait the server raised on; a str or None a bare TypeError.
        route = content.HTTPContent().route("/s")
        for interval, message in [
            (float("inf"), "interval=inf: a stream sends its pieces that many seconds apart, 0 or more;"
                           " infinity never comes: for a very long wait give a large number, such as 3600"
                           " (the end of the test cuts it short)."),
            ("0.1", "interval='0.1': a stream sends its pieces that many seconds apart, 0 or more;"
                    " write the number 0.1, not the text '0.1'."),
            (None, "interval=None: a stream sends its pieces that many seconds apart, 0 or more;"
                   " leave interval out to send them at once."),
            (True, "interval=True: a stream sends its pieces that many seconds apart, 0 or more;"
                   " leave interval out to send them at once."),
        ]:
            for respond in (route.respond_stream, route.respond_sse):
                with self.subTest(interval=interval, respond=respond), \
                        self.assertRaises(ConfigurationError) as caught:
                    respond(["a"], interval=interval)  # type: ignore[arg-type]
                self.assertEqual(str(caught.exception), message)

    def test_chunks_are_bytes_or_str(self):
        with self.assertRaises(ConfigurationError) as caught:
            Response.stream([b"a", 1])  # type: ignore[list-item]
        self.assertEqual(str(caught.exception), "chunks[1]: a body or chunk is bytes or str, not 1.")

    def test_a_lone_chunk_or_event_is_refused_rather_than_split(self):
        # "hello" went out as five chunks (or five events), {"delta": "x"} as
        # the event "delta", b"hello" was refused for its byte 104.
        route = content.HTTPContent().route("/s")
        for respond, given, message in [
            (route.respond_stream, "hello", "chunks='hello': give a list of chunks, such as ['Hel', 'lo'];"
                                            " this is one of them (a stream would send it a piece at a time)."
                                            " To send it alone, write ['hello']."),
            (route.respond_stream, b"hello", "To send it alone, write [b'hello']."),
            (route.respond_sse, "hello", "events='hello': give a list of events, such as"
                                         " [{'delta': 'Hel'}, '[DONE]']; this is one of them"),
            (route.respond_sse, {"delta": "x"}, "To send it alone, write [{'delta': 'x'}]."),
            (route.respond_sse, Event("x"), "events=Event(data='x'"),
            (route.respond_stream, 5, "chunks=5: give a list of chunks, such as ['Hel', 'lo']."),
        ]:
            with self.subTest(respond=respond, given=given), self.assertRaises(ConfigurationError) as caught:
                respond(given)  # type: ignore[arg-type]
            self.assertIn(message, str(caught.exception))
        route.respond_stream(iter(["a", "b"]))  # any iterable of them will do
        route.respond_sse(event for event in ["a", {"b": 1}])

    def test_status_headers_body_and_truncate_are_checked_when_declared(self):
        # Each failed inside the server at the first request, or with a bare TypeError or ValueError.
        http_content = content.HTTPContent()
        route = http_content.route("/s")
        for declare, message in [
            (lambda: route.respond_stream(["a"], status="200"),
             "status='200': an HTTP status is a whole number from 100 to 999: write 200."),
            (lambda: route.respond("a", status=99),
             "status=99: an HTTP status is a whole number from 100 to 999, such as 200."),
            (lambda: http_content.serve_content("a", code="404"),
             "code='404': an HTTP status is a whole number from 100 to 999: write 404."),
            (lambda: route.respond_stream(["a"], headers="X: y"),
             "headers='X: y': give a mapping of names to values, such as {'Content-Type': 'text/plain'},"
             " or (name, value) pairs: each name a token (letters, digits and !#$%&'*+-.^_`|~, no spaces or"
             " colons), each value a single line of text; 'X: y' is none."),
            (lambda: route.respond("a", headers={"Bad Name": "v"}), "('Bad Name', 'v') is none."),
            (lambda: route.respond("a", headers={"X:Y": "v"}), "('X:Y', 'v') is none."),
            (lambda: route.respond("a", headers={"": "v"}), "('', 'v') is none."),
            (lambda: route.respond("a", headers={"X-Name": "Zoë €"}),
             "headers: X-Name: 'Zoë €' has characters a header cannot carry (it is sent as ISO-8859-1)"),
            (lambda: http_content.serve_content("a", headers={"X-A": None}), "('X-A', None) is none."),
            (lambda: http_content.serve_content("a", chunked=True, headers={"Content-Length": "1"}),
             "A chunked or streamed response frames its body itself: leave out the Content-Length header"),
            (lambda: route.respond("a", delay=Fraction(-1, 5)),
             "delay=Fraction(-1, 5): a response waits a number of seconds, 0 or more"),
            (lambda: route.respond_sse(["a"], headers=[("X-A", "1\r\nX-B: 2")]), "('X-A', '1\\r\\nX-B: 2') is none."),
            (lambda: route.respond("a", headers={"X-A": None}), "('X-A', None) is none."),
            (lambda: route.respond(5), "body: a body or chunk is bytes or str, not 5."),
            (lambda: route.respond({"a": 1}), "body: a body or chunk is bytes or str, not {'a': 1}."
                                              " To answer JSON, use respond_json(data)."),
            (lambda: http_content.serve_content(5), "content: a body or chunk is bytes or str, not 5."),
            (lambda: route.respond("abc", truncate="1"),
             "truncate='1': the body is cut after that many bytes, a whole number 0 or more."),
            (lambda: route.respond("abc", truncate=3), "truncate=3 cuts nothing: the body is 3 bytes."),
            (lambda: route.respond("", truncate=0), "truncate=0 cuts nothing: the body is 0 bytes."),
        ]:
            with self.subTest(message=message), self.assertRaises(ConfigurationError) as caught:
                declare()
            self.assertIn(message, str(caught.exception))
        self.assertEqual(Response(headers={"X-Id": 7}).headers, (("X-Id", "7"),))  # as http.server writes it

    def test_a_body_given_first_to_response_is_said_to_go_second(self):
        # respond() takes the body first, Response() the status: Response("ok")
        # was refused as "status='ok'", with no word of the order.
        for given in (("ok",), (b"ok",), ("ok", 200)):
            with self.subTest(given=given):
                with self.assertRaises(ConfigurationError) as caught:
                    Response(*given)
                self.assertIn(f"status={given[0]!r}: an HTTP status is a whole number from 100 to 999;"
                              " Response takes the status first, then the body: Response(200, 'ok')"
                              " (respond() takes the body first)", str(caught.exception))
        self.assertEqual(Response(200, "ok").body, "ok")

    def test_numbers_of_any_kind(self):
        # As before the checks: http.server writes a header value with str(),
        # and waits take any number of seconds.
        self.assertEqual(Response(headers={"X-Rate": 1.5, "X-Cost": Decimal("0.10")}).headers,
                         (("X-Rate", "1.5"), ("X-Cost", "0.10")))
        for seconds in (Fraction(1, 5), Decimal("0.2"), 0.2):
            with self.subTest(seconds=seconds):
                self.assertEqual(Response(delay=seconds).delay, 0.2)
                self.assertEqual(Response.stream(["a"], interval=seconds).interval, 0.2)
        self.assertEqual(Response(HTTPStatus.CREATED).status, 201)
        self.assertEqual(Response(truncate=HTTPStatus.OK, body="x" * 300).truncate, 200)  # any whole number


class EndOfTestTests(unittest.TestCase):
    """A stream or delay in progress ends with its test, leaving no thread."""

    def watch_stream(self, layer, path: str) -> socket.socket:
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
        self.addCleanup(client.close)
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        layer["http_requests"].wait_for(1)
        return client

    def test_a_stream_still_read_when_the_test_ends_is_cut(self):
        layer = set_up_by_hand(self, content.Layer(name="stream_at_test_end"))
        before = thread_names()
        layer["http_content"].route("/long").respond_stream([b"x"] * 100, interval=60)
        client = self.watch_stream(layer, "/long")
        received = b""
        while b"1\r\nx\r\n" not in received:  # the first chunk, after the headers
            received += client.recv(4096) or self.fail(f"closed after {received!r}")
        quiet = self.end_of_test_found_quiet(layer)
        self.assertEqual(quiet, [True])  # the stream ended before the check waited for it
        self.assertEqual(thread_names(), before)  # the worker did not wait out the interval
        self.assertEqual(client.recv(4096), b"")  # the connection closed, the body never ended
        layer.testSetUp()  # for the cleanup's testTearDown

    def end_of_test_found_quiet(self, layer) -> list[bool]:
        """End the test; whether the end-of-test check found the server
        quiet in time (it waits ``quiet_timeout`` for requests still running)."""
        layer.quiet_timeout = 0.5
        server, found = layer["httpd"], []
        wait_quiet = type(server).wait_quiet  # the server's own: a test may not replace it on the server

        def noting(self: Any, timeout: float) -> bool:
            quiet = wait_quiet(self, timeout)
            if self is server:
                found.append(quiet)
            return quiet

        with mock.patch.object(type(server), "wait_quiet", noting):
            layer.check_after_test()  # what the end of a test runs first
            layer.testTearDown()
        return found

    def test_the_next_test_streams_whatever_order_the_last_one_ended_in(self):
        layer = set_up_by_hand(self, content.Layer(name="stream_after_late_check"))
        layer.testTearDown()
        layer.check_after_test()  # after test_ended, as when a test's cleanup runs it
        layer.testSetUp()
        layer["http_content"].route("/paced").respond_stream([b"a", b"b"], interval=0.01)
        answer = raw_request(layer["http_host"], layer["http_port"],
                             b"GET /paced HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.endswith(b"\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n"), answer)  # not cut

    def test_a_delay_still_awaited_when_the_test_ends_is_cut(self):
        layer = set_up_by_hand(self, content.Layer(name="delay_at_test_end"))
        before = thread_names()
        layer["http_content"].route("/late").respond("late", delay=60)
        client = self.watch_stream(layer, "/late")
        self.assertEqual(self.end_of_test_found_quiet(layer), [True])
        self.assertEqual(thread_names(), before)
        # An answer, then the end: a browser resends a request whose
        # connection closes unanswered, into the next test.
        answer = read_until_closed(client)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"The test ended before this delayed answer was due", answer)
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        layer.testSetUp()

    def pipeline_behind(self, layer, path: str) -> socket.socket:
        """Ask for ``path``, then pipeline a second request while it is
        answered; return once the server has seen that request coming."""
        layer["http_content"].route("/next").respond("next")
        seen = threading.Event()
        peek = content.ContentHandler._peek

        def peeking(handler):
            peeked = peek(handler)
            if peeked:
                seen.set()
            return peeked

        patcher = mock.patch.object(content.ContentHandler, "_peek", peeking)
        patcher.start()
        self.addCleanup(patcher.stop)
        client = self.watch_stream(layer, path)
        client.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(seen.wait(10))
        return client

    def test_a_request_pipelined_behind_a_stream_or_delay_does_not_keep_it_past_the_test(self):
        for path in ("/paced", "/late"):
            with self.subTest(path=path):
                layer = set_up_by_hand(self, content.Layer(name=f"pipelined_behind{path.replace('/', '_')}"))
                before = thread_names()
                layer["http_content"].route("/paced").respond_stream([b"a", b"b"], interval=60)
                layer["http_content"].route("/late").respond("late", delay=60)
                client = self.pipeline_behind(layer, path)
                self.assertEqual(self.end_of_test_found_quiet(layer), [True])
                self.assertEqual(thread_names(), before)  # no worker waits out the 60 s
                client.settimeout(5)
                received = b""
                while chunk := client.recv(4096):
                    received += chunk
                self.assertNotIn(b"next", received)  # cut, then closed
                layer.testSetUp()

    def test_the_stop_cuts_a_stream_with_a_request_pipelined_behind_it(self):
        layer = content.Layer(name="pipelined_at_stop")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        layer.testSetUp()
        layer["http_content"].route("/paced").respond_stream([b"a", b"b"], interval=60)
        self.pipeline_behind(layer, "/paced")
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)  # not its stop_timeout of 1 s


class TLSStreamTests(unittest.TestCase):
    layer = STREAMING_TLS

    def test_sse_over_https(self):
        self.layer["http_content"].route("/events").respond_sse([{"n": 1}, {"n": 2}], interval=0.01)
        with httpx.Client(verify=self.layer["ssl_context"], timeout=10) as client, \
                client.stream("GET", self.layer["http_url"] + "events") as response:
            lines = [line for line in response.iter_lines() if line]
        self.assertEqual(lines, ['data: {"n": 1}', 'data: {"n": 2}'])


if __name__ == "__main__":
    unittest.main()
