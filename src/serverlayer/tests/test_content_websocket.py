"""The content layer stands in for a WebSocket service: a scripted endpoint,
tried with websockets' own client (and a raw socket where a client must
misbehave)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
import sys
import time
import unittest
from unittest import mock

import aiohttp
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect

from serverlayer import ConfigurationError, ExpectationError, ServerSideError, content, custom
from serverlayer.matching import json_differences
from serverlayer.tests.helpers import set_up_by_hand, thread_names
from serverlayer.websocket_script import message_differences

WS_CONTENT = content.Layer(name="WS_CONTENT")
WSS_CONTENT = content.Layer(name="WSS_CONTENT", tls=True)


def ws_connect(layer, path: str, **kwargs) -> ClientConnection:
    """websockets' client, without keepalive pings: a ping answered late
    on a busy machine must not close the connection mid-test."""
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 10)
    if layer["ws_url"].startswith("wss:"):
        kwargs.setdefault("ssl", layer["ssl_context"])
    client = connect(layer["ws_url"] + path.lstrip("/"), ping_interval=None, **kwargs)
    return client.__enter__()  # what "with" does: websockets 17.1 warns about a client used without


def close_details(client: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes; the code and reason it closed with."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            client.recv(timeout=10)
    received = client.protocol.close_rcvd
    return (received.code, received.reason) if received else (None, None)


class ScriptTests(unittest.TestCase):
    layer = WS_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def connect(self, path: str = "/feed", **kwargs) -> ClientConnection:
        client = ws_connect(self.layer, path, **kwargs)
        self.addCleanup(client.close)
        return client

    def test_messages_on_connect_keep_their_order_and_kind(self):
        self.http_content.websocket("/feed").on_connect("text", b"\x00binary", {"json": [1, 2]})
        started = time.monotonic()
        client = self.connect()
        self.assertEqual(client.recv(timeout=10), "text")
        self.assertEqual(client.recv(timeout=10), b"\x00binary")
        self.assertEqual(json.loads(client.recv(timeout=10)), {"json": [1, 2]})
        self.assertLess(time.monotonic() - started, 1.0)  # ~10 ms here: no pause between them

    def test_a_message_gets_the_reply_of_the_first_rule_it_matches(self):
        feed = self.http_content.websocket("/feed")
        feed.on_message("ping", "pong")
        feed.on_message(re.compile(r"p.*"), "p-word")
        feed.on_message({"op": "add", "a": 1, "b": 2}, {"result": 3})
        feed.on_message(bytes, b"got bytes")
        feed.on_message(lambda message: message.endswith("!"), "excited")
        client = self.connect()
        client.send("ping")
        self.assertEqual(client.recv(timeout=10), "pong")
        client.send("pong")
        self.assertEqual(client.recv(timeout=10), "p-word")
        client.send('{"b": 2, "op": "add", "a": 1}')  # JSON: key order does not matter
        self.assertEqual(json.loads(client.recv(timeout=10)), {"result": 3})
        client.send(b"\x01\x02")
        self.assertEqual(client.recv(timeout=10), b"got bytes")
        client.send("wow!")
        self.assertEqual(client.recv(timeout=10), "excited")
        self.assertEqual(self.http_content.websockets[0].received,
                         ["ping", "pong", '{"b": 2, "op": "add", "a": 1}', b"\x01\x02", "wow!"])

    def test_reply_with_answers_what_no_rule_matches(self):
        feed = self.http_content.websocket("/feed")
        feed.on_message("known", "rule")
        feed.reply_with(lambda message: None if message == "quiet" else [message.upper(), {"n": len(message)}])
        client = self.connect()
        client.send("known")
        self.assertEqual(client.recv(timeout=10), "rule")
        client.send("quiet")
        client.send("echo")
        started = time.monotonic()
        self.assertEqual(client.recv(timeout=10), "ECHO")  # nothing came for "quiet"
        self.assertEqual(json.loads(client.recv(timeout=10)), {"n": 4})
        self.assertLess(time.monotonic() - started, 0.5)  # ~5 ms here: no pause between them

    def test_a_fragmented_message_arrives_whole(self):
        feed = self.http_content.websocket("/feed").on_message("one two three", "whole")
        client = self.connect()
        client.send(["one ", "two ", "three"])  # websockets sends an iterable as fragments
        self.assertEqual(client.recv(timeout=10), "whole")
        self.assertEqual(feed.received, ["one two three"])

    def test_a_ping_is_answered(self):
        self.http_content.websocket("/feed")
        client = self.connect()
        self.assertTrue(client.ping(b"hello").wait(10))

    def test_messages_go_out_an_interval_apart(self):
        self.http_content.websocket("/feed").on_connect("a", "b", "c", interval=0.05)
        started = time.monotonic()
        client = self.connect()
        for expected in "abc":
            self.assertEqual(client.recv(timeout=10), expected)
        took = time.monotonic() - started
        # "c" leaves two intervals after the handshake, which came after
        # started: a lower bound a busy machine only stretches. The upper
        # one is ten times what it takes here: nothing waits longer than due.
        self.assertGreaterEqual(took, 0.1)
        self.assertLess(took, 1.0)

    def test_replies_without_interval_go_out_together(self):
        self.http_content.websocket("/feed").expect("go", "x", "y").on_message("more", "z", "w")
        client = self.connect()
        started = time.monotonic()
        client.send("go")
        client.send("more")
        self.assertEqual([client.recv(timeout=10) for _ in range(4)], ["x", "y", "z", "w"])
        self.assertLess(time.monotonic() - started, 0.5)  # ~5 ms here: no pause between them

    def test_a_message_due_soon_is_not_held_up_by_one_due_later(self):
        feed = self.http_content.websocket("/feed").on_connect("a", "z", interval=30)
        feed.on_message("go", "b", "c", interval=0.05)
        client = self.connect()
        self.assertEqual(client.recv(timeout=10), "a")
        client.send("go")
        self.assertEqual(client.recv(timeout=10), "b")
        self.assertEqual(client.recv(timeout=10), "c")  # not after "z", due in 30 s

    def test_a_client_message_is_answered_while_a_paced_feed_runs(self):
        self.http_content.websocket("/feed").on_connect("first", "last", interval=30).on_message("now?", "now")
        client = self.connect()
        self.assertEqual(client.recv(timeout=10), "first")
        client.send("now?")
        self.assertEqual(client.recv(timeout=10), "now")  # not held up behind "last"

    def test_the_close_follows_the_last_message_at_once(self):
        self.http_content.websocket("/feed").on_connect("a", "b", interval=0.5, close=1000)
        client = self.connect()
        self.assertEqual([client.recv(timeout=10), client.recv(timeout=10)], ["a", "b"])
        started = time.monotonic()
        self.assertEqual(close_details(client), (1000, ""))
        self.assertLess(time.monotonic() - started, 0.25)  # sent with "b", not an interval later

    def test_a_message_behind_a_ping_in_one_read_is_answered(self):
        self.http_content.websocket("/feed").on_message("hello", "hi")
        client = self.connect()
        client.protocol.send_ping(b"are you there")
        client.protocol.send_text(b"hello")
        client.socket.sendall(b"".join(client.protocol.data_to_send()))  # both frames at once
        self.assertEqual(client.recv(timeout=10), "hi")

    def test_the_script_closes_with_its_code_and_reason(self):
        self.http_content.websocket("/feed").on_connect("maintenance", close=(4000, "come back later"))
        client = self.connect()
        self.assertEqual(client.recv(timeout=10), "maintenance")
        self.assertEqual(close_details(client), (4000, "come back later"))

    def test_a_reply_can_close(self):
        self.http_content.websocket("/feed").on_message("bye", "see you", close=1000)
        client = self.connect()
        client.send("bye")
        self.assertEqual(client.recv(timeout=10), "see you")
        self.assertEqual(close_details(client), (1000, ""))

    def test_the_client_closing_ends_the_connection_and_frees_the_worker(self):
        feed = self.http_content.websocket("/feed")
        client = self.connect()
        client.send("hello")
        client.close(code=1000)
        self.assertEqual(client.protocol.close_rcvd.code, 1000)  # the server answered the close
        self.assertTrue(self.layer["httpd"].wait_quiet(5))
        self.assertEqual(feed.received, ["hello"])
        self.assertEqual(feed.connections, 1)

    def cpu_seconds_during(self, action) -> float:
        """The process's CPU time while ``action`` runs: a serving loop that
        spins instead of waiting shows here."""
        started = time.process_time()
        action()
        return time.process_time() - started

    def test_waiting_for_the_next_message_does_not_spin(self):
        self.http_content.websocket("/feed").on_connect("a", "b", interval=0.5)
        client = self.connect()
        self.assertEqual(client.recv(timeout=10), "a")
        cpu = self.cpu_seconds_during(lambda: self.assertEqual(client.recv(timeout=10), "b"))
        self.assertLess(cpu, 0.25)  # a few milliseconds here; spinning, about 0.5 s

    def test_a_feed_stalled_for_years_waits_without_raising_or_spinning(self):
        # poll() takes at most 24.8 days: the server raised OverflowError past that.
        self.http_content.websocket("/feed").on_connect("first", "second", interval=1e8)
        client = self.connect()
        self.assertEqual(client.recv(timeout=10), "first")
        cpu = self.cpu_seconds_during(lambda: self.assertRaises(TimeoutError, client.recv, timeout=0.3))
        self.assertLess(cpu, 0.15)
        self.layer.check_server_errors()

    def test_a_wait_longer_than_one_poll_goes_in_slices(self):
        self.http_content.websocket("/feed").on_connect("a", "b", interval=0.3)
        with mock.patch.object(custom, "LONGEST_WAIT", 0.05):
            client = self.connect()
            self.assertEqual(client.recv(timeout=10), "a")
            started = time.monotonic()
            self.assertEqual(client.recv(timeout=10), "b")
        self.assertGreaterEqual(time.monotonic() - started, 0.2)  # not before it was due

    def test_a_client_that_vanishes_without_closing_frees_its_worker(self):
        self.http_content.websocket("/feed").on_connect("a")
        raw_websocket(self.layer, "/feed").close()  # no close frame: gone
        cpu = self.cpu_seconds_during(lambda: time.sleep(0.3))
        self.assertLess(cpu, 0.15)  # a worker reading the end of the stream for ever would spin

    def test_the_first_script_for_a_path_serves_it(self):
        self.http_content.websocket(re.compile(r"/rooms/\d+")).on_connect("room")
        self.http_content.websocket("/rooms/1").on_connect("never")
        self.assertEqual(self.connect("/rooms/1").recv(timeout=10), "room")
        self.assertEqual(self.connect("/rooms/22").recv(timeout=10), "room")

    def test_paths_match_decoded_as_routes_do(self):
        self.http_content.route("/café").respond("a page")  # a route for the same path does not take it
        self.http_content.websocket("/café").on_connect("café")
        self.http_content.websocket(re.compile(r"/rooms/[a-z ]+")).on_connect("room")
        self.assertEqual(self.connect("/caf%C3%A9").recv(timeout=10), "café")
        self.assertEqual(self.connect("/rooms/tea%20room").recv(timeout=10), "room")

    def test_a_path_without_a_script_answers_as_http_would(self):
        self.http_content.websocket("/feed")
        for path in ("/elsewhere", "/feed2", "/fee"):  # before, after, and a prefix
            with self.subTest(path=path), self.assertRaises(InvalidStatus) as caught:
                self.connect(path)
            self.assertEqual(caught.exception.response.status_code, 404)
        self.assertEqual(self.connect("/feed").protocol.state.name, "OPEN")  # and it keeps serving

    def test_a_handshake_with_a_query_is_served_by_its_paths_script(self):
        # What the refusal of websocket("/feed?token=abc") advises.
        self.http_content.websocket("/feed").on_connect("hi")
        self.assertEqual(self.connect("/feed?token=abc").recv(timeout=10), "hi")
        self.assertEqual(self.layer["http_requests"][-1].query_params, {"token": ["abc"]})

    def test_a_subprotocol_is_agreed(self):
        self.http_content.websocket("/graphql", subprotocols=["graphql-transport-ws"])
        client = self.connect("/graphql", subprotocols=["other", "graphql-transport-ws"])
        self.assertEqual(client.subprotocol, "graphql-transport-ws")

    def test_the_handshake_is_recorded(self):
        self.http_content.websocket("/feed")
        self.connect("/feed?token=abc").close()
        [request] = self.layer["http_requests"]
        self.assertEqual((request.method, request.path, request.query_params), ("GET", "/feed", {"token": ["abc"]}))
        self.assertEqual(request.headers["Upgrade"].lower(), "websocket")
        self.assertEqual(self.http_content.requests, [request])

    def test_a_request_that_is_no_handshake_is_refused_and_the_server_keeps_serving(self):
        self.http_content.websocket("/feed").on_connect("hi")
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=10)
        self.addCleanup(connection.close)
        connection.request("GET", "/feed", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        response = connection.getresponse()
        self.assertEqual(response.status, 400)
        self.assertIn(b"Sec-WebSocket-Key", response.read())
        self.assertEqual(self.connect().recv(timeout=10), "hi")

    def test_a_handshake_websockets_cannot_read_gets_a_400_saying_why(self):
        # A handshake with a body (a POST's) was closed unanswered, and
        # failed the test with a ValueError of the server's ("not enough
        # values to unpack") that asked to fix the server.
        self.http_content.websocket("/feed").on_connect("hi")
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        # websockets 16 (the last for Python 3.10) names a POST's method first.
        for method, body, reasons in (("POST", b"abc", (b"unsupported request body", b"unsupported HTTP method")),
                                      ("GET", b"abc", (b"unsupported request body",))):
            with self.subTest(method=method):
                connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=10)
                self.addCleanup(connection.close)
                connection.request(method, "/feed", body=body, headers=upgrade)
                response = connection.getresponse()
                self.assertEqual(response.status, 400)
                answer = response.read()
                self.assertTrue(any(b"Failed to open a WebSocket connection: " + why in answer for why in reasons),
                                answer)
        self.assertEqual(self.connect().recv(timeout=10), "hi")

    def test_invalid_utf8_in_a_text_message_closes_with_1007(self):
        feed = self.http_content.websocket("/feed")
        client = self.connect()
        client.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
        client.socket.sendall(b"".join(client.protocol.data_to_send()))
        self.assertEqual(close_details(client)[0], 1007)
        self.assertEqual(feed.received, [])
        self.assertTrue(self.layer["httpd"].wait_quiet(5))
        [problem] = feed.problems()
        self.assertIn("the client sent a text message that is no UTF-8", problem)
        self.http_content.reset()  # the client erred on purpose


class OtherClientTests(unittest.TestCase):
    # Plain ws: aiohttp's WebSocket client over TLS leaves its socket to the
    # garbage collector when asyncio.run closes the loop (against uvicorn too).
    layer = WS_CONTENT

    def test_aiohttp(self):
        self.layer["http_content"].websocket("/chat").on_connect("welcome").on_message(
            {"say": "hi"}, {"said": "hi"}, close=(4001, "bye"))

        async def chat() -> list[object]:
            async with aiohttp.ClientSession() as session, \
                    session.ws_connect(self.layer["ws_url"] + "chat") as websocket:
                seen: list[object] = [await websocket.receive_str()]
                await websocket.send_json({"say": "hi"})
                seen.append(await websocket.receive_json())
                closing = await websocket.receive()
                seen.append((closing.type.name, closing.data, closing.extra))
                return seen

        self.assertEqual(asyncio.run(chat()), ["welcome", {"said": "hi"}, ("CLOSE", 4001, "bye")])


class ScriptCheckTests(unittest.TestCase):
    """What a script expects is checked when the test ends."""

    layer = WS_CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def tearDown(self):
        self.http_content.reset()  # what these tests leave unmet must not fail them

    def talk(self, *messages, path="/feed"):
        """Send ``messages`` and close. Only the last may be one the script
        does not expect: the server closes the connection on it."""
        with ws_connect(self.layer, path) as client:
            for message in messages:
                client.send(message)
            client.close()
        self.assertTrue(self.layer["httpd"].wait_quiet(5))

    def test_a_met_expectation_is_no_problem_and_gets_its_reply(self):
        self.http_content.websocket("/feed").expect({"op": "subscribe"}, {"price": 1})
        with ws_connect(self.layer, "/feed") as client:
            client.send('{"op": "subscribe"}')
            self.assertEqual(json.loads(client.recv(timeout=10)), {"price": 1})
        self.http_content.check()

    def test_a_handshake_to_a_path_no_script_serves_is_unexpected(self):
        self.http_content.websocket("/prices").expect("subscribe")
        with self.assertRaises(InvalidStatus) as refused:
            ws_connect(self.layer, "/price")
        self.assertEqual(refused.exception.response.status_code, 404)
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        message = str(caught.exception)
        self.assertIn("no client connected", message)
        self.assertIn("unexpected request: GET /price", message)

    def test_a_handshake_no_script_serves_is_said_to_be_one(self):
        # It read as a plain GET, with nothing to say which paths the
        # scripts serve.
        self.http_content.websocket("/prices").expect("subscribe")
        self.http_content.websocket(re.compile(r"/feeds/\d+"))
        with self.assertRaises(InvalidStatus):
            ws_connect(self.layer, "/price?token=abc")
        self.assertIn("- unexpected request: GET /price?token=abc (a WebSocket handshake; the scripts serve /prices"
                      " and a path matching '/feeds/\\\\d+')", self.failure_text())

    def test_an_unmet_expectation_fails_with_the_closest_messages(self):
        # The rules keep the near misses from being unexpected, which would
        # close the connection while talk() still sends.
        self.http_content.websocket("/feed").expect({"op": "subscribe", "channel": "prices"}) \
            .on_message(str).on_message(bytes)
        self.talk('{"op": "subscibe", "channel": "prices"}', "hello", b"\x00")
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        text = str(caught.exception)
        self.assertIn(
            """expected a message JSON '{"op": "subscribe", "channel": "prices"}' on WebSocket /feed once,"""
            " it arrived 0 time(s).\n  Closest messages that arrived:\n"
            """    '{"op": "subscibe", "channel": "prices"}': $.op is "subscibe", not "subscribe"\n""",
            text,
        )
        self.assertIn("    'hello': not JSON", text)
        self.assertIn("    b'\\x00': a binary message, not JSON text", text)

    def test_without_a_connection_the_failure_says_so(self):
        self.http_content.websocket("/feed").expect("hello")
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        self.assertIn("expected a message 'hello' on WebSocket /feed once, it arrived 0 time(s); no client connected",
                      str(caught.exception))

    def test_too_many_and_unexpected_messages_fail(self):
        self.http_content.websocket("/feed").expect("hello", times=2)
        self.talk("hello", "hello", "hello", "what?")
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        text = str(caught.exception)
        self.assertIn("expected a message 'hello' on WebSocket /feed 2 times, it arrived 3 time(s)", text)
        self.assertIn("unexpected message on WebSocket /feed: 'what?'", text)

    def test_a_long_message_is_cut_in_the_report(self):
        self.http_content.websocket("/feed").expect("hello")
        self.talk("x" * 100)
        self.assertIn("unexpected message on WebSocket /feed: '" + "x" * 56 + "...\n", self.failure_text() + "\n")

    def test_the_three_closest_messages_are_shown(self):
        self.http_content.websocket("/feed").expect("hello").on_message(re.compile("h.*"))
        self.talk("hallo", "hullo", "help!", "hoi")
        text = self.failure_text()
        self.assertEqual(text.count("\n    'h"), 3, text)  # each as near as the others: the first three
        self.assertNotIn("'hoi'", text)

    def failure_text(self) -> str:
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        return str(caught.exception)

    def test_an_unexpected_message_closes_the_connection_at_once(self):
        self.http_content.websocket("/feed").expect("hello", "hi")
        with ws_connect(self.layer, "/feed") as client:
            client.send("what?")
            self.assertEqual(close_details(client), (1008, "the test expected no such message"))
        self.assertEqual(self.http_content.problems()[-1], "unexpected message on WebSocket /feed: 'what?'")

    def test_without_expectations_an_unanswered_message_keeps_the_connection(self):
        self.http_content.websocket("/feed").on_message("ping", "pong")
        with ws_connect(self.layer, "/feed") as client:
            client.send("fire and forget")
            client.send("ping")
            self.assertEqual(client.recv(timeout=10), "pong")
        self.http_content.check()

    def test_at_least_is_met_by_more(self):
        self.http_content.websocket("/feed").expect(re.compile("tick .*"), at_least=2)
        self.talk("tick 1", "tick 2", "tick 3")
        self.http_content.check()

    def test_at_least_is_met_exactly(self):
        self.http_content.websocket("/feed").expect(re.compile("tick .*"), at_least=2)
        self.talk("tick 1", "tick 2")
        self.http_content.check()

    def test_many_times(self):
        self.http_content.websocket("/feed").expect("tick", times=300)
        self.talk(*["tick"] * 300)
        self.http_content.check()

    def test_a_message_goes_to_the_first_expectation_still_wanting_it(self):
        feed = self.http_content.websocket("/feed")
        feed.expect(re.compile("a.*"), "first").expect("ab", "second")
        with ws_connect(self.layer, "/feed") as client:
            client.send("ab")
            self.assertEqual(client.recv(timeout=10), "first")
            client.send("ab")
            self.assertEqual(client.recv(timeout=10), "second")
            client.send("ab")  # both met: the last matching one takes it, once too often
            self.assertEqual(client.recv(timeout=10), "second")
        self.assertEqual(self.http_content.problems(),
                         ["expected a message 'ab' on WebSocket /feed once, it arrived 2 time(s).\n"
                          "  The messages it counted:\n    'ab'\n    'ab'"])

    def test_a_met_at_least_expectation_leaves_a_message_to_an_unmet_one(self):
        # An at_least expectation always wants more: declared first, it
        # took "bye" too, which got its reply, and "bye" stayed unmet.
        feed = self.http_content.websocket("/feed")
        feed.expect(str, "ok", at_least=1).expect("bye", "see you", close=1000)
        with ws_connect(self.layer, "/feed") as client:
            for message, reply in [("tick", "ok"), ("tick", "ok"), ("bye", "see you")]:
                client.send(message)
                self.assertEqual(client.recv(timeout=10), reply)
            self.assertEqual(close_details(client)[0], 1000)
        self.assertEqual(feed.problems(), [])

    def test_an_earlier_expectation_met_too_often_does_not_take_what_a_later_one_wants(self):
        self.http_content.websocket("/feed").expect(re.compile("a."), "first").expect("ab", "second")
        with ws_connect(self.layer, "/feed") as client:
            for message, reply in [("ax", "first"), ("ax", "first"), ("ab", "second")]:
                client.send(message)
                self.assertEqual(client.recv(timeout=10), reply)

    def test_expecting_a_message_never(self):
        self.http_content.websocket("/feed").expect("no", times=0).on_message(str)
        self.talk("no")
        self.assertEqual(self.http_content.problems(),
                         ["expected a message 'no' on WebSocket /feed 0 times, it arrived 1 time(s).\n"
                          "  The messages it counted:\n    'no'"])

    def test_an_expectation_whose_messages_met_an_earlier_one(self):
        self.http_content.websocket("/feed").expect("ab").expect(re.compile("a."))
        self.talk("ab")
        self.assertEqual(self.http_content.problems(), [
            "expected a message matching /'a.'/ on WebSocket /feed once, it arrived 0 time(s);"
            " the messages it matches came before it or met an earlier expectation",
        ])

    def test_an_expectation_met_too_often_shows_the_messages_it_counted(self):
        # As the HTTP report does; it showed the closest of the messages it
        # did not count ("'status': not 'ping'").
        self.http_content.websocket("/feed").expect("ping", times=2).on_message("status")
        self.talk("ping", "status", "ping", "ping")
        self.assertEqual(self.http_content.problems(), [
            "expected a message 'ping' on WebSocket /feed 2 times, it arrived 3 time(s).\n"
            "  The messages it counted:\n    'ping'\n    'ping'\n    'ping'",
        ])

    def test_an_expectation_declared_after_its_message_came(self):
        # The report blamed an earlier expectation where there was none.
        feed = self.http_content.websocket("/feed")
        self.talk("hello")
        feed.expect("hello")
        self.assertEqual(self.http_content.problems(), [
            "expected a message 'hello' on WebSocket /feed once, it arrived 0 time(s);"
            " the messages it matches came before it or met an earlier expectation",
        ])

    def test_a_function_or_type_is_named_in_the_report(self):
        def is_greeting(message):
            return message.startswith("hi")

        self.http_content.websocket("/feed").expect(is_greeting).expect(bytes)
        text = self.failure_text()
        self.assertIn("expected a message accepted by ScriptCheckTests.test_a_function_or_type_is_named_in_the_report."
                      "<locals>.is_greeting on WebSocket /feed once", text)
        self.assertIn("expected a message of type bytes on WebSocket /feed once", text)

    def test_a_match_function_that_raises_is_reported_as_not_matching(self):
        def subscribes(message):
            return json.loads(message)["op"] == "subscribe"

        script = self.http_content.websocket("/feed").expect(subscribes)
        with ws_connect(self.layer, "/feed") as client:
            client.send("hello")  # no JSON: the function raises, and the server closes the connection
            with contextlib.suppress(ConnectionClosed):
                client.recv(timeout=10)
        self.assertTrue(self.layer["httpd"].wait_quiet(5))
        self.layer.server_errors.take()
        self.assertEqual(script.received, ["hello"])
        self.assertIn(
            "  Closest messages that arrived:\n    'hello': ScriptCheckTests.test_a_match_function_that_raises_is"
            "_reported_as_not_matching.<locals>.subscribes raised JSONDecodeError: Expecting value: line 1 column 1"
            " (char 0)",
            self.failure_text(),
        )

    def test_a_message_a_rule_answers_is_not_unexpected(self):
        self.http_content.websocket("/feed").expect("hello").on_message("ping", "pong")
        self.talk("ping", "hello")
        self.http_content.check()

    def test_the_layer_checks_when_a_test_ends(self):
        layer = set_up_by_hand(self, content.Layer(name="ws_checked_at_test_end"))
        layer["http_content"].websocket("/feed").expect("hello")
        with self.assertRaises(ExpectationError):
            layer.check_after_test()
        layer["http_content"].reset()


class LifecycleTests(unittest.TestCase):
    """An open WebSocket ends with its test, and leaves nothing behind."""

    def test_a_client_still_connected_when_the_test_ends_gets_1001(self):
        layer = set_up_by_hand(self, content.Layer(name="ws_open_at_test_end"))
        layer["http_content"].websocket("/feed").on_connect("hi")
        before = thread_names()
        client = ws_connect(layer, "/feed")
        self.addCleanup(client.close)
        self.assertEqual(client.recv(timeout=10), "hi")
        self.assertNotEqual(thread_names(), before)  # a worker serves the connection
        # An open WebSocket is no request in progress: the test's end does
        # not wait for it to finish before checking the server's errors.
        self.assertTrue(layer["httpd"].wait_quiet(5))
        started = time.monotonic()
        layer.testTearDown()
        self.assertLess(time.monotonic() - started, 0.9)  # not the test end's 1 s wait for quiet
        self.assertEqual(close_details(client), (1001, "the test is over"))
        client.close()
        self.assertEqual(sorted(set(thread_names()) - set(before) - {client.recv_events_thread.name}), [])
        layer.testSetUp()  # for the cleanup's testTearDown

    def test_a_script_that_raises_fails_the_test_and_closes_with_1011(self):
        layer = set_up_by_hand(self, content.Layer(name="ws_script_raises"))

        def broken(message):
            raise KeyError(message)

        layer["http_content"].websocket("/feed").reply_with(broken)
        client = ws_connect(layer, "/feed")
        self.addCleanup(client.close)
        client.send("boom")
        self.assertEqual(close_details(client)[0], 1011)
        with self.assertRaises(ServerSideError) as caught:
            layer.check_server_errors()
        self.assertIn("KeyError: 'boom'", str(caught.exception))

    def test_teardown_with_a_client_connected_is_quick(self):
        layer = content.Layer(name="ws_teardown")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        layer["http_content"].websocket("/feed")
        client = ws_connect(layer, "/feed")
        self.addCleanup(client.close)
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.9)
        with self.assertRaises(ConnectionClosed):
            client.recv(timeout=10)

    def test_without_websockets_installed_the_error_says_what_to_install(self):
        http_content = content.HTTPContent()
        with mock.patch.dict(sys.modules, {"websockets": None}), self.assertRaises(ConfigurationError) as caught:
            http_content.websocket("/feed")
        self.assertIn("pip install 'serverlayer[websocket]'", str(caught.exception))


def raw_websocket(layer, path: str) -> socket.socket:
    """A WebSocket client that reads and answers nothing unless told to:
    its handshake done, it has read only the 101 answer."""
    raw = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
    raw.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".encode()
                + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = raw.recv(1)  # byte by byte: not a byte of the frames after it
        if not chunk:
            raise AssertionError(f"closed after {received!r}")
        received += chunk
    assert received.startswith(b"HTTP/1.1 101 "), received
    return raw


def send_text(raw: socket.socket, text: str) -> None:
    raw.sendall(Frame(Opcode.TEXT, text.encode()).serialize(mask=True))


def read_until_close_frame(raw: socket.socket) -> bytes:
    """What the server sends up to its close frame (text frames of a few bytes, then the close)."""
    received = b""
    while b"\x88" not in received:  # FIN and opcode 8: a close frame
        chunk = raw.recv(4096)
        if not chunk:
            raise AssertionError(f"closed without a close frame after {received!r}")
        received += chunk
    return received


class ClientsThatDoNotAnswerTests(unittest.TestCase):
    """Clients that read late or never: the script and the test end cope."""

    def setUp(self):
        self.layer = set_up_by_hand(self, content.Layer(name=f"ws_unanswering_{self._testMethodName}"))
        self.http_content = self.layer["http_content"]

    def test_a_message_that_crossed_the_scripts_close_is_recorded_and_not_answered(self):
        chat = self.http_content.websocket("/chat")
        chat.on_message("bye", close=1000)
        chat.on_message("x", "y")
        raw = raw_websocket(self.layer, "/chat")
        self.addCleanup(raw.close)
        send_text(raw, "bye")
        read_until_close_frame(raw)
        send_text(raw, "x")  # sent before the client answered the close, as a client may
        deadline = time.monotonic() + 10
        while "x" not in chat.received and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(chat.received, ["bye", "x"])
        self.assertTrue(self.layer["httpd"].wait_quiet(5))
        self.layer.check_server_errors()  # no "connection is closing" from websockets

    def test_a_close_the_client_never_answered_ends_with_the_test(self):
        self.http_content.websocket("/feed").on_connect("hello", close=1000)
        before = thread_names()
        raw = raw_websocket(self.layer, "/feed")
        self.addCleanup(raw.close)
        self.assertIn(b"hello", read_until_close_frame(raw))
        self.layer.testTearDown()
        self.assertEqual(sorted(set(thread_names()) - set(before)), [])  # the worker is done
        # No error for the 1001 that a closing connection cannot take (it
        # came too late for this test's check, and failed the next test).
        self.assertEqual(self.layer.server_errors.take(), [])
        self.layer.testSetUp()  # for the cleanup's testTearDown

    def assert_the_test_end_frees_the_worker(self, before: list[str]) -> None:
        """``before``: the threads before the client connected."""
        httpd = self.layer["httpd"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until a worker is stuck writing to the client, which reads nothing
            with httpd._writing_lock:
                if any(not custom._takes_more(connection) for connection in httpd._writing):
                    break
            time.sleep(0.01)
        self.assertNotEqual(thread_names(), before)
        started = time.monotonic()
        self.layer.check_after_test()  # a test runner's cleanup: it cuts the write, then waits for quiet
        self.assertLess(time.monotonic() - started, 0.9)  # not the test end's 1 s wait for quiet
        self.layer.testTearDown()
        self.assertEqual(sorted(set(thread_names()) - set(before)), [])
        self.layer.testSetUp()  # for the cleanup's testTearDown

    def test_a_script_writing_to_a_client_that_reads_nothing_ends_with_the_test(self):
        self.http_content.websocket("/feed").on_connect(*[b"x" * 100_000] * 200)
        before = thread_names()
        raw = raw_websocket(self.layer, "/feed")
        self.addCleanup(raw.close)
        self.assert_the_test_end_frees_the_worker(before)

    def test_a_write_the_test_end_cut_as_it_ended_raises_so_that_the_connection_is_not_kept(self):
        """A write may end just after the end of the test cut its
        connection: its handler must not keep the connection (half shut)
        for the next test's requests, which it would read and not answer."""
        httpd = self.layer["httpd"]
        stalled, stalled_client = socket.socketpair()
        reading, reading_client = socket.socketpair()
        for sock in (stalled, stalled_client, reading, reading_client):
            self.addCleanup(sock.close)
        stalled.setblocking(False)
        self.addCleanup(httpd.allow_waits)
        with self.assertRaises(BrokenPipeError), httpd.writing(stalled):
            with contextlib.suppress(BlockingIOError):
                for _ in range(10_000):  # its client reads nothing: until the socket takes no more
                    stalled.send(b"x" * 65536)
            httpd.end_waits(1)  # the test ends as the write ends
        with httpd.writing(reading):
            reading.sendall(b"x")
            httpd.end_waits(1)  # its client reads: the write ends by itself, uncut
        self.assertEqual(reading_client.recv(1), b"x")

    def test_a_stream_to_a_client_that_reads_nothing_ends_with_the_test(self):
        self.http_content.route("/big").respond_stream([b"x" * 1_000_000] * 20)
        before = thread_names()
        raw = socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=10)
        self.addCleanup(raw.close)
        raw.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assert_the_test_end_frees_the_worker(before)


class TLSTests(unittest.TestCase):
    layer = WSS_CONTENT

    def test_wss_with_the_layers_ssl_context(self):
        self.assertTrue(self.layer["ws_url"].startswith("wss://"))
        self.layer["http_content"].websocket("/secure").on_message("hi", "hello over TLS")
        with ws_connect(self.layer, "/secure") as client:
            client.send("hi")
            self.assertEqual(client.recv(timeout=10), "hello over TLS")


class MessagesAtTheTestsEndTests(unittest.TestCase):
    """A message the client sent just before its test ended belongs to that
    test, also when it is still on its way: the TLS front forwards it a
    moment later."""

    def test_a_message_sent_as_the_test_ends_is_recorded_and_checked(self):
        for tls in (False, True):
            with self.subTest(tls=tls):
                layer = content.Layer(name=f"ws_last_message_tls_{tls}", tls=tls)
                layer.setUp()
                self.addCleanup(layer.tearDown)
                for _ in range(10):  # without the fix, over TLS 9 in 10 were lost
                    layer.testSetUp()
                    script = layer["http_content"].websocket("/ws")
                    script.expect("logout")
                    client = ws_connect(layer, "/ws")
                    self.addCleanup(client.close)
                    client.send("logout")
                    layer.check_after_test()  # the test's end: no ExpectationError
                    layer.testTearDown()
                    self.assertEqual(script.received, ["logout"])
                    self.assertEqual(close_details(client), (1001, "the test is over"))
                    client.close()


class ConfigurationTests(unittest.TestCase):

    def setUp(self):
        self.script = content.HTTPContent().websocket("/feed")

    def test_close_codes_a_server_may_not_send_are_refused(self):
        for close in (999, 1004, 1005, 1006, 1015, 2000, 2999, 5000, "1000", (4000, "x" * 124), (4000, "x", 1)):
            with self.subTest(close=close), self.assertRaises(ConfigurationError) as caught:
                self.script.on_connect(close=close)
            too_long = isinstance(close, tuple) and len(close) == 2
            self.assertIn("at most 123 bytes" if too_long else f"close={close!r}", str(caught.exception))
        with self.assertRaises(ConfigurationError) as caught:
            self.script.on_connect(close=(4000, "é" * 62))  # 124 bytes in UTF-8
        self.assertEqual(str(caught.exception),
                         f"close reason {'é' * 30!r}...: at most 123 bytes fit in a close frame.")
        for close in (1000, 1003, 1007, 1014, 3000, (4999, "x" * 123), [4000, "a list will do"]):
            self.script.on_connect(close=close)  # the bounds themselves are fine

    def test_a_message_json_cannot_encode_is_refused(self):
        with self.assertRaises(ConfigurationError) as caught:
            self.script.on_message("x", object())
        self.assertIn("must be str (a text frame), bytes (a binary frame) or a value JSON can encode",
                      str(caught.exception))

    def test_a_negative_interval_is_refused(self):
        for interval in (-1, float("nan")):
            with self.subTest(interval=interval), self.assertRaises(ConfigurationError):
                self.script.on_connect("a", interval=interval)

    def test_an_interval_no_clock_reaches_is_refused(self):
        # inf made the schedule 0 * inf = NaN: the server thread spun.
        for interval, hint in [
            (float("inf"), "infinity never comes: for a very long wait give a large number, such as 3600"
                           " (the end of the test cuts it short)."),
            ("0.1", "write the number 0.1, not the text '0.1'."),
            (None, "leave interval out to send them at once."),
        ]:
            for declare in (self.script.on_connect, lambda *a, **k: self.script.on_message("x", *a, **k),
                            lambda *a, **k: self.script.expect("x", *a, **k)):
                with self.subTest(interval=interval), self.assertRaises(ConfigurationError) as caught:
                    declare("a", "b", interval=interval)
                self.assertEqual(str(caught.exception),
                                 f"interval={interval!r}: messages go out that many seconds apart, 0 or more; {hint}")

    def test_nan_and_infinity_are_no_json_messages(self):
        # They went out as NaN and {"p": Infinity}, which no JSON parser takes.
        for message in (float("nan"), {"p": float("inf")}, [float("-inf")]):
            with self.subTest(message=message), self.assertRaises(ConfigurationError) as caught:
                self.script.on_connect(message)
            self.assertIn("Out of range float values are not JSON compliant", str(caught.exception))

    def test_reply_with_needs_a_function(self):
        with self.assertRaises(ConfigurationError) as caught:
            self.script.reply_with("pong")  # type: ignore[arg-type]
        self.assertEqual(str(caught.exception),
                         "reply_with('pong'): give a function that takes the message and returns the answer;"
                         " for a fixed answer to every message, write on_message(str, answer) and"
                         " on_message(bytes, answer).")

    def test_subprotocols_are_a_list_of_names(self):
        # "chat" was the subprotocols c, h, a and t.
        for subprotocols, message in [
            ("chat", "subprotocols='chat': give a list of subprotocol names, such as subprotocols=['chat']."),
            (None, "subprotocols=None: give a list of subprotocol names, such as subprotocols=['chat']."),
            ([1], "subprotocols=[1]: 1 is no subprotocol name; a name is text without spaces or separators"
                  " (an HTTP token), such as 'graphql-transport-ws'."),
            (["v1", "a b"], "subprotocols=['v1', 'a b']: 'a b' is no subprotocol name"),
            ([""], "subprotocols=['']: '' is no subprotocol name"),
        ]:
            with self.subTest(subprotocols=subprotocols), self.assertRaises(ConfigurationError) as caught:
                content.HTTPContent().websocket("/chat", subprotocols=subprotocols)  # type: ignore[arg-type]
            self.assertIn(message, str(caught.exception))
        script = content.HTTPContent().websocket("/chat", subprotocols=(name for name in ["v2", "v1"]))
        self.assertEqual(script.subprotocols, ("v2", "v1"))

    def test_a_match_no_message_can_meet_is_refused(self):
        for match, message in [
            (dict, "match=dict: a message is str (text) or bytes (binary), so only those types match a kind"
                   " of message; for JSON of a kind, give a function, such as"
                   " lambda message: message.startswith('{')."),
            (object(), "is not JSON serializable"),
            (float("nan"), "match=nan: a message is matched by"),
        ]:
            for declare in (self.script.on_message, self.script.expect):
                with self.subTest(match=match, declare=declare), self.assertRaises(ConfigurationError) as caught:
                    declare(match)
                self.assertIn(message, str(caught.exception))
        self.script.on_message(None).expect(str).expect(bytes).expect({"op": [1, 2.5]})  # null, kinds, JSON

    def test_expect_needs_a_count(self):
        with self.assertRaises(ConfigurationError):
            self.script.expect("x", times=None)

    def test_a_count_no_number_of_messages_could_meet_is_refused(self):
        for counts, message in [
            ({"times": -1}, "expect(times=-1): a count is a whole number, 0 or more."),
            ({"times": 1.5}, "expect(times=1.5): a count is a whole number, 0 or more."),
            ({"times": True}, "expect(times=True): a count is a whole number, 0 or more."),
            ({"at_least": 0}, "expect(at_least=0): a count is a whole number, 1 or more."),
            ({"at_least": -2}, "expect(at_least=-2): a count is a whole number, 1 or more."),
        ]:
            for expect in (self.script.expect, content.HTTPContent().expect):
                with self.subTest(counts=counts, expect=expect), self.assertRaises(ConfigurationError) as caught:
                    expect("/x", **counts)
                self.assertEqual(str(caught.exception), message)

    def test_an_exact_count_and_a_minimum_together_are_refused(self):
        # times=2 and at_least=1 contradict each other: at_least won, and the
        # exact count the test also asked for was never checked.
        for expect in (self.script.expect, content.HTTPContent().expect):
            with self.subTest(expect=expect), self.assertRaises(ConfigurationError) as caught:
                expect("/x", times=2, at_least=1)
            self.assertEqual(
                str(caught.exception),
                "expect(times=2, at_least=1): give times= for an exact count or at_least= for a minimum,"
                " not both.",
            )

    def test_path_must_be_a_string_or_pattern(self):
        with self.assertRaises(ConfigurationError):
            content.HTTPContent().websocket(b"/feed")  # type: ignore[arg-type]

    def test_a_path_no_handshake_can_have_is_refused(self):
        # Accepted before, and never served: the client got a 404.
        for path, message in [
            ("feed", "websocket('feed'): a request's path starts with \"/\", so this one would never match;"
                     " write websocket('/feed')."),
            ("*", "websocket('*'): a request's path starts with \"/\", so this one would never match;"
                  ' give the path alone, such as websocket("/feed").'),
            ("/feed?token=abc", "websocket('/feed?token=abc'): a path is matched without its query, so this"
                                " one would never match; write websocket('/feed'), which serves it whatever the"
                                " query (http_requests records the query). A question mark that is part of the"
                                " path is sent encoded: write it %3F."),
        ]:
            with self.subTest(path=path), self.assertRaises(ConfigurationError) as caught:
                content.HTTPContent().websocket(path)
            self.assertEqual(str(caught.exception), message)


class MatchingTests(unittest.TestCase):

    def test_json_differences_name_the_paths(self):
        self.assertEqual(
            json_differences({"a": 1, "b": {"c": [1, 2]}, "d": True}, {"a": 2, "b": {"c": [1, 3]}, "d": 1, "e": 0}),
            ["$.a is 2, not 1", "$.b.c[1] is 3, not 2", "$.d is 1, not true", "$.e is not expected"],
        )
        self.assertEqual(json_differences({"a": [1]}, {}), ["$.a is missing"])
        self.assertEqual(json_differences([1, 2], [1]), ["$ has 1 items, not 2"])
        self.assertEqual(json_differences({"x": 1.0}, {"x": 1}), [])

    def test_a_type_matches_any_message_of_its_kind(self):
        self.assertEqual(message_differences(str, "anything"), [])
        self.assertEqual(message_differences(bytes, "text"), ["a text message, not bytes"])
        self.assertEqual(message_differences(str, b"\x00"), ["a binary message, not str"])

    def test_a_long_match_is_cut_in_the_report(self):
        self.assertEqual(message_differences("y" * 58, "z"), ["not '" + "y" * 58 + "'"])  # 60 characters: whole
        self.assertEqual(message_differences("y" * 59, "z"), ["not '" + "y" * 56 + "..."])

    def test_message_kinds_must_agree(self):
        self.assertEqual(message_differences("a", b"a"), ["a binary message, not text"])
        self.assertEqual(message_differences(b"a", "a"), ["a text message, not binary"])
        self.assertEqual(message_differences(re.compile(b"a"), "a"), ["a text message, the pattern is for binary"])
        self.assertEqual(message_differences(re.compile("a"), b"a"), ["a binary message, the pattern is for text"])
        self.assertEqual(message_differences(re.compile("a+"), "aab"), ["does not match /'a+'/"])
        self.assertEqual(message_differences(re.compile("a+"), "aa"), [])


if __name__ == "__main__":
    unittest.main()


class TestFunctionsRaisingConnectionErrorsTests(unittest.TestCase):
    """A function the test gave that raises ConnectionError or TimeoutError
    (it calls a service that is down) fails the test: the server took it
    for a client gone, and the test passed."""

    def check_fails_the_test(self, layer, raised: str) -> None:
        with self.assertRaises(ServerSideError) as caught:
            layer.check_server_errors()
        message = str(caught.exception)
        self.assertIn("serverlayer.errors.ScriptError: ", message)
        self.assertIn(raised, message)

    def test_http_answers_and_matches(self):
        def answer(request):
            raise ConnectionRefusedError(111, "the backend is down")

        def match(request):
            raise TimeoutError("the backend took too long")

        def set_handler(http_content):
            http_content.handler = answer

        for path, configure, raised in (
            ("/answer", lambda http_content: http_content.route("/answer").respond_with(answer),
             "ConnectionRefusedError: [Errno 111] the backend is down"),
            ("/handler", set_handler, "ConnectionRefusedError: [Errno 111] the backend is down"),
            ("/match", lambda http_content: http_content.route("/match", match=match).respond("x"),
             "TimeoutError: the backend took too long"),
        ):
            with self.subTest(path=path):
                layer = set_up_by_hand(self, content.Layer(name=f"raising_test_function{path.replace('/', '_')}"))
                configure(layer["http_content"])
                connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
                self.addCleanup(connection.close)
                connection.request("GET", path)
                with contextlib.suppress(http.client.HTTPException, ConnectionError):
                    connection.getresponse().read()
                self.check_fails_the_test(layer, raised)

    def test_websocket_replies_and_matches(self):
        def reply(message):
            raise ConnectionRefusedError(111, "the backend is down")

        def match(message):
            raise TimeoutError("the backend took too long")

        for path, configure, raised in (
            ("/reply", lambda script: script.reply_with(reply),
             "ConnectionRefusedError: [Errno 111] the backend is down"),
            ("/match", lambda script: script.on_message(match, "x"), "TimeoutError: the backend took too long"),
        ):
            with self.subTest(path=path):
                layer = set_up_by_hand(self, content.Layer(name=f"raising_ws_function{path.replace('/', '_')}"))
                configure(layer["http_content"].websocket(path))
                client = ws_connect(layer, path)
                self.addCleanup(client.close)
                client.send("hi")
                self.assertEqual(close_details(client)[0], 1011)
                self.assertTrue(layer["httpd"].wait_quiet(5))
                self.check_fails_the_test(layer, raised)


class ClientsThatBreakTheProtocolTests(unittest.TestCase):
    """A client under test that sends what WebSocket forbids fails the test:
    the server closes on it, and the test passed unless it expected more."""

    def broken_by(self, frame: bytes) -> str:
        layer = set_up_by_hand(self, content.Layer(name=f"ws_broken_{len(frame)}_{frame[0]}"))
        layer["http_content"].websocket("/ws")
        raw = raw_websocket(layer, "/ws")
        self.addCleanup(raw.close)
        raw.sendall(frame)
        read_until_close_frame(raw)
        self.assertTrue(layer["httpd"].wait_quiet(5))
        with self.assertRaises(ExpectationError) as caught:
            layer["http_content"].check()
        layer["http_content"].reset()  # checked on purpose: not again at the test's end
        return str(caught.exception)

    def test_a_text_message_that_is_no_utf8(self):
        message = self.broken_by(Frame(Opcode.TEXT, "café".encode("latin-1")).serialize(mask=True))
        self.assertIn("on WebSocket /ws, the client sent a text message that is no UTF-8", message)
        self.assertIn("the server closed with 1007", message)

    def test_an_unmasked_frame(self):
        message = self.broken_by(Frame(Opcode.TEXT, b"hi").serialize(mask=False))
        self.assertIn("on WebSocket /ws, the client broke the protocol (incorrect masking)", message)
        self.assertIn("the server closed with 1002", message)


class FunctionsThatReadWhatTheTestReadsTests(unittest.TestCase):
    """A match or reply function may read what the test reads (requests,
    received messages): it runs under the lock those are kept under, which
    it took again and waited for itself; and a WebSocket script's lock was
    taken under the content's, while a match function ran under the
    script's and took the content's."""

    def test_they_answer(self):
        layer = set_up_by_hand(self, content.Layer(name="functions_reading"))
        http_content = layer["http_content"]
        http_content.route("/seen", match=lambda request: len(http_content.requests) > 0).respond("seen")
        script = http_content.websocket("/ws")
        script.expect(lambda message: len(http_content.requests) + len(script.received) > 0, "matched")
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
        self.addCleanup(connection.close)
        connection.request("GET", "/seen")
        self.assertEqual(connection.getresponse().read(), b"seen")
        with ws_connect(layer, "/ws") as client:
            client.send("hi")
            self.assertEqual(client.recv(timeout=10), "matched")
