"""The asgi layer: uvicorn serving HTTP and WebSocket, used as a test would,
with httpx, urllib and the websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import http.client
import io
import json
import logging
import logging.handlers
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
import warnings
import weakref
from collections.abc import Awaitable, Callable
from contextlib import redirect_stderr
from typing import Any, Literal, TypedDict
from unittest import mock

import httpx
import requests
import websockets.exceptions
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as _connect

from serverlayer import ConfigurationError, ResourceError, ServerSideError, SetUpError, asgi
from serverlayer.recording import RequestLog
from serverlayer.reporting import ErrorLog
from serverlayer.server import PlainAccepting, ServerThread, _first_read, remembering
from serverlayer.tests.helpers import (
    ResourceProvider,
    open_descriptors,
    set_up_by_hand,
    stop_asked_again_as_the_serving_ends,
    stop_in_the_round_that_accepts,
    thread_names,
    until,
    without_host_variables,
)
from serverlayer.tests.test_hardening import read_until_closed


def ws_connect(url: str, **kwargs: Any) -> ClientConnection:
    """A WebSocket client without keepalive pings: their thread ends a moment
    after the connection, and zope.testrunner may see it still there."""
    return _connect(url, ping_interval=None, **kwargs)


async def read_body(receive):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def respond(send, body: bytes, status: int = 200, content_type: bytes = b"text/plain"):
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


async def websocket_echo(receive, send):
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "raise":
            raise RuntimeError("raised on purpose in a WebSocket")
        await send({"type": "websocket.send", "text": f"echo: {message.get('text')}"})


async def http_echo(scope, receive, send):
    """Answers with what the server told the application about the request."""
    if scope["path"] == "/raise":
        raise RuntimeError("raised on purpose by the application")
    if scope["path"] == "/streamed":  # in two parts, of no announced length
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first part, ", "more_body": True})
        await send({"type": "http.response.body", "body": b"second part"})
        return
    if scope["path"].startswith("/later"):  # as an application waiting for something else does
        await asyncio.sleep(0.05)
    body = await read_body(receive)
    answer = {
        "scheme": scope["scheme"], "method": scope["method"], "path": scope["path"],
        "query": scope["query_string"].decode(), "client": list(scope["client"]),
        "body": body.decode(), "state": sorted(scope.get("state", {})),
    }
    await respond(send, json.dumps(answer).encode(), content_type=b"application/json")


def lifespan_app(events: list[str], *, startup=None, shutdown=None):
    """An application with lifespan support that notes its lifespan in ``events``."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    if startup is not None:
                        await startup(send)
                    scope["state"]["started"] = True
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if shutdown is not None:
                        await shutdown(send)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "websocket":
            await websocket_echo(receive, send)
        else:
            events.append(f"request {scope['path']}")
            await http_echo(scope, receive, send)

    return app


async def app_without_lifespan(scope, receive, send):
    assert scope["type"] in ("http", "websocket"), f"no {scope['type']} here"
    if scope["type"] == "websocket":
        await websocket_echo(receive, send)
    else:
        await http_echo(scope, receive, send)


LIFESPAN_EVENTS: list[str] = []
ASGI_LAYER = asgi.Layer(lifespan_app(LIFESPAN_EVENTS), name="ASGI_LAYER")


def get_json(url: str, **kwargs) -> dict:
    with urllib.request.urlopen(url, timeout=5, **kwargs) as response:
        return json.loads(response.read())


class ServingTests(unittest.TestCase):
    layer = ASGI_LAYER
    lifespan_events = LIFESPAN_EVENTS
    #: The uvicorn protocol class the layer's connections are served with.
    protocol = "_HttpToolsProtocol"

    def test_serves_with_its_http_protocol(self):
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"GET /which HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n"))
            [transport] = self.layer["httpd"].transports
            self.assertEqual(type(transport.get_protocol()).__name__, self.protocol)

    def exchange_and_end(self, requests: bytes) -> bytes:
        """Send ``requests``, end the client's side (as ``nc -N`` does), and
        read until the server ends the connection."""
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(requests)
            sock.shutdown(socket.SHUT_WR)
            return read_until_closed(sock)

    def test_a_client_that_ends_its_side_gets_its_answer(self):
        received = self.exchange_and_end(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(received.count(b"HTTP/1.1 200 OK"), 1, received)
        self.assertIn(b'"path": "/later"', received)

    def test_pipelined_requests_then_the_end_get_every_answer_in_order(self):
        received = self.exchange_and_end(b"".join(b"GET /later/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(3)))
        self.assertEqual(re.findall(rb'"path": "/later/(\d)"', received), [b"0", b"1", b"2"], received)

    def test_whole_requests_then_an_unfinished_one_then_the_end(self):
        # The whole ones are answered; the last never will be.
        received = self.exchange_and_end(
            b"GET /later/0 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /later/1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /half HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        )
        self.assertEqual(re.findall(rb'"path": "/later/(\d)"', received), [b"0", b"1"], received)
        self.assertNotIn(b"/half", received)

    def test_a_client_that_ends_its_side_with_its_body_unfinished_is_gone(self):
        received = self.exchange_and_end(b"POST /half HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        self.assertEqual(received, b"")

    def test_publishes_where_it_serves(self):
        port = self.layer["http_port"]
        self.assertIsInstance(port, int)
        self.assertNotEqual(port, 0)
        self.assertEqual(self.layer["http_host"], "127.0.0.1")
        self.assertEqual(self.layer["http_address"], f"127.0.0.1:{port}")
        self.assertEqual(self.layer["http_url"], f"http://127.0.0.1:{port}/")
        self.assertEqual(self.layer["ws_url"], f"ws://127.0.0.1:{port}/")
        self.assertIsInstance(self.layer["httpd"], asgi.UvicornServer)
        self.assertEqual(self.layer["httpd"].socket.getsockname()[1], port)
        self.assertIsInstance(self.layer["http_requests"], RequestLog)
        thread = self.layer["httpd_thread"]
        self.assertTrue(thread.is_alive())
        self.assertTrue(thread.daemon)
        self.assertEqual(thread.name, f"serverlayer serverlayer.tests.test_asgi.{self.layer.__name__}")
        self.assertNotIn("ca_bundle", self.layer)

    def test_serves_urllib(self):
        request = urllib.request.Request(
            self.layer["http_url"] + "hello?x=1", headers={"X-Forwarded-For": "192.0.2.1", "X-Forwarded-Proto": "https"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            client_port = response.fp.raw._sock.getsockname()[1]
            answer = json.loads(response.read())
        self.assertEqual(answer["scheme"], "http")
        self.assertEqual((answer["method"], answer["path"], answer["query"]), ("GET", "/hello", "x=1"))
        # The real client and scheme: forwarding headers are the application's business.
        self.assertEqual(answer["client"], ["127.0.0.1", client_port])
        self.assertEqual(self.layer["http_requests"][0].headers["X-Forwarded-For"], "192.0.2.1")

    def test_many_requests_on_one_keep_alive_connection(self):
        with httpx.Client(timeout=5) as client:
            answers = [client.get(f"{self.layer['http_url']}{number}").json() for number in range(20)]
        self.assertEqual([answer["path"] for answer in answers], [f"/{number}" for number in range(20)])
        self.assertEqual(len({tuple(answer["client"]) for answer in answers}), 1, "one connection for all")

    def test_post_body_reaches_the_application_and_the_record(self):
        with httpx.Client(timeout=5) as client:
            response = client.post(self.layer["http_url"] + "form", content=b"a=1&b=2")
        self.assertEqual(response.json()["body"], "a=1&b=2")
        [request] = self.layer["http_requests"]
        self.assertEqual((request.method, request.path, request.body), ("POST", "/form", b"a=1&b=2"))
        self.assertEqual(request.headers["Content-Length"], "7")

    def test_streamed_request_body(self):
        def parts():
            yield b"first "
            yield b"second"

        with httpx.Client(timeout=5) as client:
            response = client.post(self.layer["http_url"] + "stream", content=parts())
        self.assertEqual(response.json()["body"], "first second")
        self.assertEqual(self.layer["http_requests"][0].body, b"first second")

    def test_websocket_echo(self):
        with ws_connect(self.layer["ws_url"] + "chat", open_timeout=5) as websocket:
            websocket.send("hello")
            self.assertEqual(websocket.recv(timeout=5), "echo: hello")
            websocket.send("again")
            self.assertEqual(websocket.recv(timeout=5), "echo: again")

    def test_records_requests_and_websocket_handshakes(self):
        with httpx.Client(timeout=5) as client:
            client.get(self.layer["http_url"] + "p%20ath?q=tea&x=")
        with ws_connect(self.layer["ws_url"] + "socket?room=1", open_timeout=5) as websocket:
            websocket.send("hi")
            websocket.recv(timeout=5)
        get, handshake = self.layer["http_requests"]
        self.assertEqual((get.method, get.path, get.query, get.body), ("GET", "/p%20ath", "q=tea&x=", b""))
        self.assertEqual(get.query_params, {"q": ["tea"], "x": [""]})
        self.assertEqual(get.headers["host"], self.layer["http_address"])
        self.assertEqual((handshake.method, handshake.path, handshake.query), ("GET", "/socket", "room=1"))
        self.assertEqual(handshake.headers["Upgrade"].lower(), "websocket")
        self.assertIn("Sec-WebSocket-Key", handshake.headers)
        self.assertEqual(handshake.body, b"")

    def test_lifespan_ran_before_the_tests_and_its_state_reaches_requests(self):
        events = self.lifespan_events
        self.assertEqual(events[0], "lifespan.startup")
        self.assertNotIn("lifespan.shutdown", events)
        self.assertEqual(get_json(self.layer["http_url"])["state"], ["started"])

    def test_answers_with_date_and_server_headers(self):
        with httpx.Client(timeout=5) as client:
            response = client.get(self.layer["http_url"])
        self.assertEqual(response.headers["server"], "uvicorn")
        self.assertTrue(response.headers["date"].endswith(" GMT"), response.headers.get("date"))


class ClientEndTests(unittest.TestCase):
    """A client that closes its connection while its answer is coming is
    gone to the application (uvicorn's http.disconnect), also though the
    layer keeps the connection for clients that end only their side."""

    http_protocol = "auto"

    def serve_stream(self) -> tuple[Any, list[str]]:
        told: list[str] = []

        async def stream_until_disconnect(scope, receive, send):
            # What Starlette's StreamingResponse and sse-starlette do: answer
            # while listening for the client's disconnect, then return.
            if scope["type"] != "http":
                raise RuntimeError("no lifespan here")
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            assert (await receive())["type"] == "http.request"
            told.append((await receive())["type"])  # no more to send until then: a long poll, a quiet feed

        layer = asgi.Layer(stream_until_disconnect, name=f"client_end_{self.http_protocol}_{self._testMethodName}",
                           http_protocol=self.http_protocol)
        return set_up_by_hand(self, layer), told

    def test_a_client_that_closes_is_gone_at_once(self):
        layer, told = self.serve_stream()
        for close in ("close", "httpx"):
            with self.subTest(close=close):
                told.clear()
                if close == "close":
                    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
                        sock.sendall(b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n")
                        received = b""
                        while b"first" not in received:  # h11 sends the head and the body apart
                            received += sock.recv(4096)
                else:
                    with httpx.Client() as client, client.stream("GET", layer["http_url"] + "feed") as response:
                        self.assertEqual(next(response.iter_raw()), b"first\n")
                started = time.monotonic()
                layer.check_server_errors()  # waits for the application: it ends, without an error
                self.assertLess(time.monotonic() - started, 0.5)  # not the 1 s wait for quiet in vain
                self.assertEqual(told, ["http.disconnect"])
                deadline = time.monotonic() + 5
                while layer["httpd"].transports and time.monotonic() < deadline:
                    time.sleep(0.001)
                self.assertEqual(layer["httpd"].transports, set())  # the server's side closed too

    def test_pipelined_requests_then_the_end_close_at_once_when_the_first_listens(self):
        # The first answer is dropped once its application is told the
        # client left; those behind it would be taken for it: all gone, as upstream.
        layer, told = self.serve_stream()
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            received = read_until_closed(sock)  # closes, rather than time out
        self.assertNotIn(b"/two", received)
        layer.check_server_errors()
        self.assertEqual(told, ["http.disconnect"])
        deadline = time.monotonic() + 5
        while layer["httpd"].transports and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertEqual(layer["httpd"].transports, set())

    def test_a_client_that_ends_only_its_side_still_gets_a_plain_answer(self):
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name=f"half_close_{self.http_protocol}",
                                                http_protocol=self.http_protocol))
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            received = read_until_closed(sock)
        self.assertIn(b'"path": "/plain"', received)

    def test_a_client_that_ends_only_its_side_gets_the_head_of_a_bodiless_answer(self):
        # HEAD, 204 and 304 end with their head: it goes out before the
        # connection closes after its last answer.
        layer = set_up_by_hand(self, asgi.Layer(answers_as_told([]), name=f"half_close_head_{self.http_protocol}",
                                                http_protocol=self.http_protocol))
        for request, status in ((b"HEAD /200/2/ok", b"200"), (b"GET /204/none/", b"204")):
            with self.subTest(request=request), \
                    socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
                sock.sendall(request + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                received = read_until_closed(sock)
                self.assertTrue(received.startswith(b"HTTP/1.1 " + status), received)
                self.assertTrue(received.endswith(b"\r\n\r\n"), received)

    def test_a_pipelined_request_whose_body_cannot_be_read_gets_its_400_after_the_answer_before_it(self):
        # Its body will never be whole (nothing after the fault is read): it
        # is never started, and the 400 follows the answer to the request
        # before it, then the end of the connection.
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name=f"bad_chunk_{self.http_protocol}",
                                                http_protocol=self.http_protocol))
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /second HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
            received = read_until_closed(sock)  # closes, rather than time out
        first, _, rest = received.partition(b'"path": "/first"')
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK"), received)
        self.assertTrue(rest.partition(b"HTTP/1.1 ")[2].startswith(b"400 "), received)
        self.assertNotIn(b"/second", received)
        layer.check_server_errors()


class H11ClientEndTests(ClientEndTests):
    http_protocol = "h11"


H11_LIFESPAN_EVENTS: list[str] = []
ASGI_H11_LAYER = asgi.Layer(lifespan_app(H11_LIFESPAN_EVENTS), name="ASGI_H11_LAYER", http_protocol="h11")


class H11ServingTests(ServingTests):
    """All the same with uvicorn's pure-Python protocol, which serves where
    httptools is not installed."""

    layer = ASGI_H11_LAYER
    lifespan_events = H11_LIFESPAN_EVENTS
    protocol = "_H11Protocol"


class RequestBodyTests(unittest.TestCase):
    """The application reads a request's body as it arrives, as under
    uvicorn alone, and the request is recorded with its whole body."""

    http_protocol = "httptools"

    def serve(self, app):
        layer = asgi.Layer(app, name=f"asgi_body_{self._testMethodName}", http_protocol=self.http_protocol)
        return set_up_by_hand(self, layer)

    def connect(self, layer, timeout=5):
        sock = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=timeout)
        self.addCleanup(sock.close)
        return sock

    def read_until(self, sock, end: bytes) -> bytes:
        received = b""
        while end not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received

    def test_each_piece_of_the_body_reaches_the_application_as_it_arrives(self):
        async def echoes_each_piece(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
                await send({"type": "http.response.body", "body": message.get("body", b""), "more_body": more})

        layer = self.serve(echoes_each_piece)
        sock = self.connect(layer, timeout=2)
        sock.sendall(b"POST /duplex HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        # The client sends the rest only once the first piece came back.
        self.assertIn(b"hello", self.read_until(sock, b"hello"))
        sock.sendall(b"5\r\nworld\r\n0\r\n\r\n")
        self.assertIn(b"world", self.read_until(sock, b"0\r\n\r\n"))
        [request] = layer["http_requests"]
        self.assertEqual(request.body, b"helloworld")

    def test_an_application_that_refuses_before_reading_is_not_sent_the_body(self):
        async def refuses(scope, receive, send):
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})

        layer = self.serve(refuses)
        sock = self.connect(layer)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        status_line = self.read_until(sock, b"\r\n").split(b"\r\n")[0]
        self.assertTrue(status_line.startswith(b"HTTP/1.1 413 "), status_line)  # no 100 Continue first
        [request] = layer["http_requests"]  # recorded before the head, which is all of the answer
        self.assertEqual(request.body, b"")

    def test_an_answer_without_reading_goes_out_once_the_request_is_recorded_whole(self):
        async def answers_without_reading(scope, receive, send):
            if scope["type"] == "http":
                status = 204 if scope["path"] == "/no-content" else 401
                headers = [] if status == 204 else [(b"content-length", b"12")]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": b"" if status == 204 else b"unauthorized"})

        layer = self.serve(answers_without_reading)
        body = os.urandom(4 * 1024 * 1024)
        for path in ("/no-content", "/upload"):
            sock = self.connect(layer)
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)))
            sock.sendall(body[:1024])
            sock.settimeout(0.2)
            with self.assertRaises(TimeoutError):  # nothing of the answer while the body comes
                sock.recv(4096)
            sock.settimeout(5)
            sock.sendall(body[1024:])
            self.assertIn(b" 204 " if path == "/no-content" else b"unauthorized", self.read_until(
                sock, b"\r\n\r\n" if path == "/no-content" else b"unauthorized"))
            self.assertEqual(layer["http_requests"][-1].path, path)  # recorded before the answer went out
            self.assertEqual(layer["http_requests"][-1].body, body)

    def test_an_application_reading_after_part_of_its_answer_gets_the_body(self):
        async def echoes_after_a_prefix(scope, receive, send):
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"echo: ", "more_body": True})
                more = True
                while more:  # what was read for it while its head waited
                    message = await receive()
                    more = message.get("more_body", False)
                    await send({"type": "http.response.body", "body": message.get("body", b""), "more_body": more})

        layer = self.serve(echoes_after_a_prefix)
        response = httpx.post(layer["http_url"], content=b"hello world", timeout=5)
        self.assertEqual(response.content, b"echo: hello world")
        self.assertEqual(layer["http_requests"][-1].body, b"hello world")

    def test_a_held_head_goes_out_once_the_body_is_whole(self):
        event = asyncio.Event()

        async def streams_on_an_event(scope, receive, send):
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
                await event.wait()  # an event source, say, that the test fires later
                await send({"type": "http.response.body", "body": b"fired"})

        layer = self.serve(streams_on_an_event)
        self.addCleanup(lambda: layer["httpd"].loop.call_soon_threadsafe(event.set))
        sock = self.connect(layer)
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{\"topic\": \"x\"}")
        self.assertIn(b"200 OK", self.read_until(sock, b"\r\n\r\n"))  # before the event
        self.assertEqual(layer["http_requests"][-1].body, b'{"topic": "x"}')
        layer["httpd"].loop.call_soon_threadsafe(event.set)
        self.assertIn(b"fired", self.read_until(sock, b"fired"))

    def test_curl_uploading_to_an_application_that_refuses_without_reading_gets_the_answer(self):
        """curl stops sending once it sees an answer (401 here) mid-upload,
        and waits for the rest of it."""
        async def refuses(scope, receive, send):
            if scope["type"] == "http":
                headers = [(b"content-type", b"text/plain")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": b"unauthorized"})

        layer = self.serve(refuses)
        with tempfile.NamedTemporaryFile() as upload:
            upload.write(os.urandom(20 * 1024 * 1024))
            upload.flush()
            answer = subprocess.run(
                ["curl", "-sS", "-m", "10", "-H", "Expect:", "--data-binary", f"@{upload.name}",
                 "-w", " %{http_code}", layer["http_url"]], capture_output=True, text=True, check=False)
        self.assertEqual(answer.stdout, "unauthorized 401", answer.stderr)
        self.assertEqual(len(layer["http_requests"][-1].body), 20 * 1024 * 1024)

    def test_a_client_that_leaves_mid_body_is_gone_for_the_application(self):
        received, done = [], threading.Event()

        async def reads_the_body(scope, receive, send):
            if scope["type"] != "http":
                return
            try:
                while True:
                    message = await receive()
                    received.append(message)
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
            finally:
                done.set()

        layer = self.serve(reads_the_body)
        sock = self.connect(layer)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500)
        deadline = time.monotonic() + 5
        while sum(len(message.get("body", b"")) for message in received) < 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()
        self.assertTrue(done.wait(5))
        self.assertEqual(received[-1]["type"], "http.disconnect")
        self.assertTrue(all(message.get("more_body") for message in received[:-1]), received)  # never a whole body
        self.assertEqual(b"".join(message.get("body", b"") for message in received), b"x" * 500)
        layer.check_server_errors()
        [request] = layer["http_requests"]
        self.assertEqual(request.body, b"x" * 500)  # what arrived

    def test_a_body_the_application_does_not_read_is_recorded_whole(self):
        async def answers_without_reading(scope, receive, send):
            if scope["type"] == "http":
                await respond(send, b"thanks")

        layer = self.serve(answers_without_reading)
        body = os.urandom(3 * 1024 * 1024)
        response = httpx.post(layer["http_url"], content=body, timeout=5)
        self.assertEqual(response.content, b"thanks")
        [request] = layer["http_requests"]
        self.assertEqual(request.body, body)


class H11RequestBodyTests(RequestBodyTests):
    http_protocol = "h11"


class HTTPProtocolTests(unittest.TestCase):
    def test_auto_is_httptools_where_installed(self):
        self.assertIs(asgi.Layer(app_without_lifespan, name="auto")._protocol_class(), asgi.HTTP_PROTOCOLS["httptools"])
        with mock.patch.dict(asgi.HTTP_PROTOCOLS, clear=True, h11=asgi.HTTP_PROTOCOLS["h11"]):
            self.assertIs(asgi.Layer(app_without_lifespan, name="auto")._protocol_class(), asgi.HTTP_PROTOCOLS["h11"])

    def test_an_unknown_protocol_is_refused(self):
        with self.assertRaises(ConfigurationError) as caught:
            asgi.Layer(app_without_lifespan, name="ASGI_WRONG", http_protocol="h2")
        self.assertIn("http_protocol='h2' is none of uvicorn's HTTP/1.1 implementations;"
                      " use 'auto', 'httptools' or 'h11'.", str(caught.exception))
        self.assertIn("ASGI_WRONG", str(caught.exception))

    def test_httptools_without_httptools_is_refused(self):
        with mock.patch.dict(asgi.HTTP_PROTOCOLS, clear=True, h11=asgi.HTTP_PROTOCOLS["h11"]), \
                self.assertRaises(ConfigurationError) as caught:
            asgi.Layer(app_without_lifespan, name="ASGI_NO_HTTPTOOLS", http_protocol="httptools")
        self.assertIn("http_protocol='httptools' needs httptools, which is not installed.", str(caught.exception))

    def test_httptools_arms_no_keep_alive_timer_per_request(self):
        """A count, not a time: uvicorn arms a timer after every response
        and cancels it at the next request (an eighth of the server's work
        for a small answer); the layer arms none."""
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="no_keep_alive_timer",
                                                http_protocol="httptools"))
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for _ in range(3):
            connection.request("GET", "/")
            self.assertEqual(connection.getresponse().read()[:1], b"{")
        [transport] = layer["httpd"].transports
        self.assertIsNone(transport.get_protocol().timeout_keep_alive_task)

    def test_httptools_sends_a_small_answer_in_one_segment(self):
        """A count, not a time: uvicorn writes a response's head and its body
        apart, two TCP segments for a small answer; the layer joins them.
        The client's kernel counts the segments that brought it data."""
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="one_segment",
                                                http_protocol="httptools"))
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/")
        self.assertEqual(connection.getresponse().read()[:1], b"{")
        before = data_segments_received(connection.sock)
        for _ in range(5):
            connection.request("GET", "/")
            self.assertEqual(connection.getresponse().read()[:1], b"{")
        self.assertEqual(data_segments_received(connection.sock) - before, 5)

    def test_httptools_sends_a_head_whose_body_waits_at_once(self):
        """The head of an answer whose application awaits something before
        its body is not held back for the body: its client reads it first."""
        go_on = threading.Event()
        events: list[asyncio.Event] = []

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"4"), (b"x-head", b"first")]})
            body_may_come = asyncio.Event()
            events.append(body_may_come)
            go_on.set()
            await body_may_come.wait()
            await send({"type": "http.response.body", "body": b"body"})

        layer = set_up_by_hand(self, asgi.Layer(app, name="head_first", http_protocol="httptools"))
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/")
        self.assertTrue(go_on.wait(5))
        response = connection.getresponse()  # the head alone: the body is still to come
        self.assertEqual(response.getheader("x-head"), "first")
        layer["httpd"].loop.call_soon_threadsafe(events[0].set)
        self.assertEqual(response.read(), b"body")

    def test_curl_through_either_protocol(self):
        """What curl does that the Python clients above do not: HEAD, a
        chunked upload after ``Expect: 100-continue``, HTTP/1.0."""
        for protocol in ("httptools", "h11"):
            with self.subTest(protocol=protocol):
                layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name=f"curl_{protocol}",
                                                        http_protocol=protocol))
                url = layer["http_url"] + "upload"
                head = subprocess.run(["curl", "-sS", "-I", url], capture_output=True, timeout=10, check=True)
                self.assertTrue(head.stdout.startswith(b"HTTP/1.1 200 OK\r\n"), head.stdout)
                upload = subprocess.run(
                    ["curl", "-sS", "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue",
                     "--data-binary", "@-", url],
                    input=b"x" * 100_000, capture_output=True, timeout=10, check=True,
                )
                self.assertEqual(json.loads(upload.stdout)["body"], "x" * 100_000)
                old = subprocess.run(["curl", "-sS", "-0", "-i", url], capture_output=True, timeout=10, check=True)
                self.assertTrue(old.stdout.startswith(b"HTTP/1.1 200 OK\r\n"), old.stdout)
                # A body of no announced length goes chunked to an HTTP/1.1
                # client, and to an HTTP/1.0 client as it is, to the end of
                # the connection.
                streamed = layer["http_url"] + "streamed"
                for option, chunked in (("--http1.1", True), ("-0", False)):
                    answer = subprocess.run(["curl", "-sS", option, "-i", streamed], capture_output=True,
                                            timeout=10, check=True).stdout
                    self.assertEqual(b"transfer-encoding: chunked" in answer.lower(), chunked, answer)
                    self.assertTrue(answer.endswith(b"\r\n\r\nfirst part, second part"), answer)
                self.assertEqual([request.method for request in layer["http_requests"]],
                                 ["HEAD", "POST", "GET", "GET", "GET"])
                self.assertEqual(layer["http_requests"][1].body, b"x" * 100_000)


def data_segments_received(sock: socket.socket) -> int:
    """How many TCP segments carrying data ``sock`` received (Linux's
    ``tcpi_data_segs_in``, in ``struct tcp_info`` since Linux 4.6)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int.from_bytes(info[152:156], sys.byteorder)


def answers_as_told(clients: list[int]):
    """An application answering ``/<status>/<Content-Length or "none">/<body>``
    as its path says, without reading the request's body, and ``/next``
    with ``ok``; it notes each request's client port in ``clients``."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        clients.append(scope["client"][1])
        if scope["path"] == "/next":
            await respond(send, b"ok")
            return
        _, status, length, body = scope["path"].split("/")
        headers = [] if length == "none" else [(b"content-length", length.encode())]
        await send({"type": "http.response.start", "status": int(status), "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})

    return app


#: A head, up to the blank line that ends it.
HEAD = rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n(?:[^\r]+\r\n)*\r\n"


class ResponseFitTests(unittest.TestCase):
    """What a response may not carry never reaches its client, and fails
    the test that made the request, saying so, as on the wsgi layer: a
    body with a 204 or 304 is dropped (uvicorn's httptools protocol sent
    it, and the client read it as the next response), a 1xx status is
    refused (the client waited for a final response that never came).
    Each test tries both of uvicorn's protocols."""

    PROTOCOLS = ("httptools", "h11")

    def serve(self, protocol: str) -> tuple[asgi.Layer, list[int]]:
        clients: list[int] = []
        layer = asgi.Layer(answers_as_told(clients), name=f"asgi_fit_{protocol}_{self._testMethodName}",
                           http_protocol=protocol)
        return set_up_by_hand(self, layer), clients

    def exchange(self, layer, first: bytes) -> bytes:
        """Send ``first``, then ``GET /next`` on the same connection, and
        read until the answer to that (``ok``) or the end."""
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            sock.sendall(first + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while not received.endswith(b"\r\n\r\nok"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        return received

    def test_a_body_sent_with_204_or_304_never_reaches_the_client(self):
        for protocol in self.PROTOCOLS:
            layer, _ = self.serve(protocol)
            for request in (b"GET /204/5/HELLO", b"GET /204/none/HELLO", b"GET /304/5/HELLO",
                            b"GET /304/none/HELLO", b"GET /304/3/HELLO", b"PUT /204/5/HELLO"):
                with self.subTest(protocol=protocol, request=request):
                    upload = b"Content-Length: 4\r\n\r\ndata" if request.startswith(b"PUT") else b"\r\n"
                    received = self.exchange(layer, request + b" HTTP/1.1\r\nHost: x\r\n" + upload)
                    status = request.split(b"/")[1]
                    # The next answer on the connection right after the head.
                    self.assertRegex(received, b"^" + HEAD.replace(rb"(\d{3})", status) + HEAD + b"ok$")
                    method, path = request.decode().split()
                    self.assertEqual(layer.server_errors.take(), [
                        f"{method} {path}: the application sent a body with status"
                        f" {status.decode()}, which has none; it was dropped. Send no body with 204 and 304."
                    ])

    def test_real_clients_keep_their_connection_after_a_body_with_204(self):
        for protocol in self.PROTOCOLS:
            layer, clients = self.serve(protocol)
            url = layer["http_url"]
            for client in ("http.client", "httpx", "requests", "curl"):
                with self.subTest(protocol=protocol, client=client):
                    clients.clear()
                    if client == "http.client":
                        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
                        try:
                            connection.request("GET", "/204/5/HELLO")
                            first = connection.getresponse()
                            answers = [(first.status, first.read())]
                            connection.request("GET", "/next")
                            second = connection.getresponse()
                            answers.append((second.status, second.read()))
                        finally:
                            connection.close()
                    elif client == "httpx":
                        with httpx.Client(timeout=5) as session:
                            answers = [(answer.status_code, answer.content)
                                       for answer in (session.get(url + "204/5/HELLO"), session.get(url + "next"))]
                    elif client == "requests":
                        with requests.Session() as session:
                            answers = [(answer.status_code, answer.content) for answer in (
                                session.get(url + "204/5/HELLO", timeout=5), session.get(url + "next", timeout=5))]
                    else:  # two URLs: one connection, the second answer after the first
                        curl = subprocess.run(["curl", "-sS", "-w", "%{http_code} ", url + "204/5/HELLO", url + "next"],
                                              capture_output=True, timeout=10, check=False)
                        self.assertEqual(curl.stderr, b"")
                        answers = [(204, b""), (200, b"ok")] if curl.stdout == b"204 ok200 " else [curl.stdout]
                    self.assertEqual(answers, [(204, b""), (200, b"ok")])
                    self.assertEqual(len(set(clients)), 1, clients)  # one connection for both
                    [error] = layer.server_errors.take()
                    self.assertIn("GET /204/5/HELLO: the application sent a body with status 204", error)

    def test_the_test_that_sent_a_body_with_204_fails_saying_so(self):
        for protocol in self.PROTOCOLS:
            with self.subTest(protocol=protocol):
                layer = asgi.Layer(answers_as_told([]), name=f"asgi_fit_fails_{protocol}", http_protocol=protocol)
                layer.setUp()
                self.addCleanup(layer.tearDown)

                class Inner(unittest.TestCase):
                    served = layer

                    def test_deletes(self):
                        self.served.testSetUp()  # hands the end-of-test check to this test
                        answer = httpx.delete(self.served["http_url"] + "204/4/null", timeout=5)
                        self.assertEqual(answer.status_code, 204)
                        self.served.testTearDown()

                result = unittest.TestResult()
                Inner("test_deletes").run(result)
                self.assertEqual(result.errors, [])
                [(_, report)] = result.failures
                self.assertIn("ServerSideError", report)
                self.assertIn("DELETE /204/4/null: the application sent a body with status 204, which has none;"
                              " it was dropped. Send no body with 204 and 304.", report)

    def test_a_304_or_head_answer_may_announce_the_length_a_get_would_get(self):
        """RFC 9110 sections 8.6 and 9.3.2. uvicorn's httptools protocol took
        such a 304 for a body cut short, and closed the connection. The body
        of an answer to HEAD, uvicorn drops, as a client expects."""
        for protocol in self.PROTOCOLS:
            layer, clients = self.serve(protocol)
            for request in (b"GET /304/5/", b"HEAD /200/5/HELLO", b"HEAD /200/none/HELLO"):
                with self.subTest(protocol=protocol, request=request):
                    clients.clear()
                    received = self.exchange(layer, request + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                    self.assertRegex(received, b"^" + HEAD + HEAD + b"ok$")
                    self.assertEqual(len(set(clients)), 1, clients)
                    self.assertEqual(layer.server_errors.take(), [])

    def test_a_1xx_status_is_refused_and_the_client_gets_a_500(self):
        for protocol in self.PROTOCOLS:
            layer, _ = self.serve(protocol)
            for request in (b"GET /103/none/", b"GET /100/5/HELLO", b"GET /101/none/", b"POST /103/0/"):
                with self.subTest(protocol=protocol, request=request):
                    upload = b"Content-Length: 4\r\n\r\ndata" if request.startswith(b"POST") else b"\r\n"
                    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
                        sock.sendall(request + b" HTTP/1.1\r\nHost: x\r\n" + upload)
                        received = read_until_closed(sock)  # a 500 that closes, rather than a wait
                    self.assertTrue(received.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), received)
                    self.assertEqual(received.count(b"HTTP/1.1 "), 1, received)
                    method, path = request.decode().split()
                    [error] = layer.server_errors.take()
                    self.assertIn(f"Exception in ASGI application while serving {method} {path}\n", error)
                    self.assertIn(f"RuntimeError: the application started its response with status"
                                  f" {path.split('/')[1]}, an interim (1xx) status", error)

    def test_a_body_that_does_not_fit_its_content_length_fails_the_test_saying_so(self):
        """uvicorn refuses it already, and closes the connection: the client
        is not left waiting. The report says what to do about it."""
        for protocol in self.PROTOCOLS:
            layer, _ = self.serve(protocol)
            for path, words in (("/200/3/HELLO", "longer than|Too much"), ("/200/8/HELLO", "shorter than|Too little")):
                with self.subTest(protocol=protocol, path=path):
                    connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
                    try:
                        connection.request("GET", path)
                        with self.assertRaises(http.client.IncompleteRead):  # at once, not after the timeout
                            connection.getresponse().read()
                    finally:
                        connection.close()
                    [error] = layer.server_errors.take()
                    self.assertIn(f"Exception in ASGI application while serving GET {path}: the application's body"
                                  " did not fit the Content-Length header it sent; the client got no more of it than"
                                  " fit, and the connection closed. Send the body's length in bytes as"
                                  " Content-Length, or no Content-Length.\n", error)
                    self.assertRegex(error, f"({words}).* Content-Length$")


class AppSourceTests(unittest.TestCase):

    def test_app_from_class_attribute(self):
        class AppLayer(asgi.Layer):
            asgi_app = staticmethod(app_without_lifespan)

        layer = set_up_by_hand(self, AppLayer(name="asgi_app_attribute"))
        self.assertEqual(get_json(layer["http_url"] + "attr")["path"], "/attr")

    def test_a_class_attribute_function_not_wrapped_in_staticmethod_is_refused_saying_so(self):
        # Python binds it to the layer: uvicorn called app(layer, scope,
        # receive, send), setUp passed (the lifespan's TypeError taken for no
        # lifespan support), and every request got a 500 and "app() takes 3
        # positional arguments but 4 were given".
        class AppLayer(asgi.Layer):
            asgi_app = app_without_lifespan

        layer = AppLayer(name="asgi_app_attribute_unwrapped")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("Write asgi_app = staticmethod(app_without_lifespan) in the class", str(caught.exception))
        self.assertNotIn("http_port", layer)

    def test_a_method_of_the_layer_taking_scope_receive_and_send_is_served(self):
        class AppLayer(asgi.Layer):
            async def asgi_app(self, scope, receive, send):
                if scope["type"] == "http":
                    await respond(send, repr(self).encode())

        layer = set_up_by_hand(self, AppLayer(name="asgi_app_method"))
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), repr(layer).encode())

    def test_an_application_typed_with_typeddict_scopes_is_served_and_type_checks(self) -> None:
        # Quart and asgiref.typing type the scope and messages as TypedDicts;
        # an application typed so is an ASGI 3 application all the same, and
        # a user's `mypy --strict` must accept it for asgi.Layer (`mypy src`
        # checks this body).
        class HTTPScope(TypedDict):
            type: Literal["http"]
            path: str

        class Message(TypedDict):
            type: str

        async def typed_app(
            scope: HTTPScope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
        ) -> None:
            if scope["type"] == "http":
                await respond(send, scope["path"].encode())

        layer = set_up_by_hand(self, asgi.Layer(typed_app, name="asgi_typed_app"))
        with urllib.request.urlopen(layer["http_url"] + "typed", timeout=5) as response:
            self.assertEqual(response.read(), b"/typed")

    def test_asgi_app_resource_of_a_base_layer_wins(self):
        async def resource_app(scope, receive, send):
            if scope["type"] == "http":
                await respond(send, b"from the resource")

        provider = ResourceProvider("asgi_app", resource_app, name="asgi_app_provider")
        layer = asgi.Layer(app_without_lifespan, bases=(provider,), name="asgi_resource_wins")
        set_up_by_hand(self, provider)
        set_up_by_hand(self, layer)
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"from the resource")

    def test_no_application_says_how_to_give_one(self):
        layer = asgi.Layer(name="asgi_without_app")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn(repr(layer), message)
        self.assertIn("asgi.Layer(app)", message)
        self.assertIn("asgi_app resource of a base layer", message)
        self.assertNotIn("http_port", layer)

    def test_no_application_of_a_layer_set_up_without_its_bases_says_so(self):
        # `with` sets up the layer alone: the base that publishes asgi_app
        # in its setUp never ran, and the message told the user to give "an
        # asgi_app resource of a base layer", which the base does.
        provider = ResourceProvider("asgi_app", app_without_lifespan, name="asgi_provider_not_set_up")
        layer = asgi.Layer(bases=(provider,), name="asgi_bases_not_set_up")
        with self.assertRaises(ConfigurationError) as caught:
            with layer:
                pass
        message = str(caught.exception)
        self.assertIn(f"its base layers ({provider.__module__}.{provider.__name__})", message)
        self.assertIn("set up this layer alone", message)

    def test_uncallable_application(self):
        layer = asgi.Layer("not an app", name="asgi_uncallable")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("is not callable", str(caught.exception))

    def test_wsgi_application_is_refused_with_a_pointer_to_the_wsgi_layer(self):
        def wsgi_app(environ, start_response):
            return [b""]

        layer = asgi.Layer(wsgi_app, name="asgi_given_wsgi")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("no ASGI 3 application", str(caught.exception))
        self.assertIn("serverlayer.wsgi.Layer", str(caught.exception))

    def test_an_application_class_given_for_its_instance_is_refused_saying_so(self):
        # asgi.Layer(FastAPI) for asgi.Layer(FastAPI()): the class's __call__
        # is a coroutine function, but calling the class makes an instance.
        # It was served: its "lifespan" raised before receiving anything
        # (taken for no lifespan support), and every request got a 500 and
        # "FastAPI.__init__() takes 1 positional argument but 4 were given".
        from starlette.applications import Starlette

        class App:
            async def __call__(self, scope, receive, send):
                pass

        for app_class in (Starlette, App):
            layer = asgi.Layer(app_class, name=f"asgi_given_{app_class.__name__}_class")
            with self.assertRaises(ConfigurationError) as caught:
                layer.setUp()
            message = str(caught.exception)
            self.assertIn(f"is a class, not an application: give the layer an instance, {app_class.__name__}()",
                          message)
            self.assertNotIn("wsgi", message)
            self.assertNotIn("http_port", layer)

    def test_an_asgi_2_application_is_refused_saying_how_to_serve_it(self):
        # Made with the scope, then called with receive and send: uvicorn
        # serves it with its ASGI2Middleware. Told to give an instance, or to
        # serve it with the wsgi layer, its author would be led astray.
        class ASGI2App:
            def __init__(self, scope):
                self.scope = scope

            async def __call__(self, receive, send):
                await respond(send, b"asgi 2")

        layer = asgi.Layer(ASGI2App, name="asgi_given_asgi_2")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn("is an ASGI 2 application (made with the scope, then called with receive and send):"
                      " serve it as ASGI 3 with asgi.Layer(ASGI2Middleware(ASGI2App))"
                      " (from uvicorn.middleware.asgi2 import ASGI2Middleware)", message)
        from uvicorn.middleware.asgi2 import ASGI2Middleware

        layer = set_up_by_hand(self, asgi.Layer(ASGI2Middleware(ASGI2App), name="asgi_2_wrapped"))
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"asgi 2")

    def test_an_asgi_2_application_function_is_refused_saying_how_to_serve_it(self):
        # ASGI 2's own form: called with the scope, it returns the coroutine
        # function called with receive and send. No WSGI application takes
        # one argument: pointed at the wsgi layer, its author is led astray.
        def asgi2_app(scope):
            async def instance(receive, send):
                await respond(send, b"asgi 2 function")

            return instance

        layer = asgi.Layer(asgi2_app, name="asgi_given_asgi_2_function")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn("is an ASGI 2 application (called with the scope, then what it returns with receive and"
                      " send): serve it as ASGI 3 with asgi.Layer(ASGI2Middleware(asgi2_app))"
                      " (from uvicorn.middleware.asgi2 import ASGI2Middleware)", message)
        self.assertNotIn("wsgi", message)
        from uvicorn.middleware.asgi2 import ASGI2Middleware

        layer = set_up_by_hand(self, asgi.Layer(ASGI2Middleware(asgi2_app), name="asgi_2_function_wrapped"))
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"asgi 2 function")

    def test_an_application_factory_is_refused_saying_to_call_it(self):
        # uvicorn's --factory: a function of no arguments that makes the application.
        def create_app():
            return app_without_lifespan

        layer = asgi.Layer(create_app, name="asgi_given_a_factory")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn("takes no arguments: an application factory? Give the layer what it makes,"
                      " asgi.Layer(create_app())", message)
        self.assertNotIn("wsgi", message)

    def test_application_object_with_async_call(self):
        class App:
            async def __call__(self, scope, receive, send):
                if scope["type"] == "http":
                    await respond(send, b"object")

        layer = set_up_by_hand(self, asgi.Layer(App(), name="asgi_app_object"))
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"object")


class LifespanTests(unittest.TestCase):

    def test_startup_in_set_up_and_shutdown_in_tear_down(self):
        events: list[str] = []
        layer = asgi.Layer(lifespan_app(events), name="asgi_lifespan_order")
        layer.setUp()
        try:
            self.assertEqual(events, ["lifespan.startup"])
            layer.testSetUp()
            get_json(layer["http_url"] + "during")
            layer.testTearDown()
            self.assertEqual(events, ["lifespan.startup", "request /during"])
        finally:
            layer.tearDown()
        self.assertEqual(events, ["lifespan.startup", "request /during", "lifespan.shutdown"])

    def test_shutdown_runs_after_the_connections_are_closed(self):
        events: list[str] = []
        seen_by_shutdown: list[int] = []
        layer = asgi.Layer(name="asgi_shutdown_last")

        async def shutdown(send):
            seen_by_shutdown.append(len(layer_server.transports))

        layer.asgi_app = lifespan_app(events, shutdown=shutdown)
        layer.setUp()
        layer_server = layer["httpd"]
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            self.assertEqual(len(layer_server.transports), 1)
        finally:
            layer.tearDown()
            connection.close()
        self.assertEqual(seen_by_shutdown, [0])

    def test_requests_still_running_end_before_the_shutdown(self):
        events: list[str] = []
        entered = threading.Event()

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                await lifespan_app(events)(scope, receive, send)
                return
            entered.set()
            try:
                await asyncio.sleep(3600)
            finally:
                events.append("request ended")

        layer = asgi.Layer(app, name="asgi_requests_end_first")
        layer.setUp()
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        try:
            client.sendall(b"GET /forever HTTP/1.1\r\nHost: test\r\n\r\n")
            self.assertTrue(entered.wait(5))
        finally:
            layer.tearDown()
            client.close()
        self.assertEqual(events, ["lifespan.startup", "request ended", "lifespan.shutdown"])

    def test_startup_that_raises_fails_set_up_with_its_traceback(self):
        async def startup(send):
            raise RuntimeError("the database is not there")

        threads, descriptors = thread_names(), open_descriptors()
        layer = asgi.Layer(lifespan_app([], startup=startup), name="asgi_startup_raises")
        started = time.monotonic()
        with self.assertRaises(SetUpError) as caught:
            layer.setUp()
        self.assertLess(time.monotonic() - started, 1.0)
        message = str(caught.exception)
        self.assertIn(repr(layer), message)
        self.assertIn("lifespan startup failed", message)
        self.assertIn("Traceback (most recent call last)", message)
        self.assertIn("RuntimeError: the database is not there", message)
        self.assertEqual(layer._resources, {})
        self.assertEqual(thread_names(), threads)
        self.assertEqual(open_descriptors(), descriptors)
        layer.tearDown()  # harmless after a failed setUp

    def test_startup_that_never_finishes_fails_set_up_saying_so(self):
        async def startup(send):
            await asyncio.Event().wait()  # something that never comes

        threads = thread_names()
        layer = asgi.Layer(lifespan_app([], startup=startup), name="asgi_startup_hangs")
        with mock.patch("serverlayer.server.READY_TIMEOUT", 0.2), self.assertRaises(SetUpError) as caught:
            layer.setUp()
        self.assertIn(
            "did not start serving within 0.2 seconds: the application's lifespan startup has not finished:"
            " it received lifespan.startup and sent no lifespan.startup.complete", str(caught.exception))
        self.assertEqual(thread_names(), threads)
        layer.tearDown()

    def test_a_startup_that_waits_for_ever_fails_set_up_saying_where_it_waits(self):
        # FastAPI's and Starlette's lifespan: an async context manager, whose
        # generator the chain of awaits reaches only through contextlib's
        # frame. "It sent no lifespan.startup.complete" says nothing of
        # which of the startup's awaits never finishes.
        from starlette.applications import Starlette

        async def connect_to_the_database():
            await asyncio.Event().wait()  # a server that accepts and never answers

        @contextlib.asynccontextmanager
        async def lifespan(app):
            await connect_to_the_database()
            yield

        threads = thread_names()
        layer = asgi.Layer(Starlette(lifespan=lifespan), name="asgi_startup_waits")
        with mock.patch("serverlayer.server.READY_TIMEOUT", 0.2), self.assertRaises(SetUpError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn("sent no lifespan.startup.complete, and it waits at:\n", message)
        self.assertIn(", in lifespan\n    await connect_to_the_database()\n", message)
        self.assertIn(", in connect_to_the_database\n    await asyncio.Event().wait()", message)
        self.assertEqual(thread_names(), threads)
        layer.tearDown()

    def test_a_startup_that_holds_the_event_loop_fails_set_up_saying_where_and_leaves_nothing(self):
        # A blocking call in the lifespan startup (a synchronous database
        # connect) holds the loop past the wait for the start: setUp said
        # only that the startup had not finished; and when the call returned
        # at last, asyncio's callback stopping the loop for the start, left
        # pending, stopped the shut-down at once: the loop was never closed
        # (ResourceWarnings for it and its sockets at garbage collection).
        entered, release = threading.Event(), threading.Event()

        async def startup(send):
            entered.set()
            release.wait(10)  # synchronous: nothing else runs on the loop meanwhile

        servers: list[asgi.UvicornServer] = []

        class Layer(asgi.Layer):
            def _server(self, sockets, ssl_context):
                servers.append(super()._server(sockets, ssl_context))
                return servers[-1]

        name = "asgi_startup_holds_the_loop"
        threads = thread_names()
        layer = Layer(lifespan_app([], startup=startup), name=name)
        self.addCleanup(release.set)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with mock.patch("serverlayer.server.READY_TIMEOUT", 0.2), self.assertRaises(SetUpError) as refused:
                layer.setUp()
            self.assertTrue(entered.is_set())
            message = str(refused.exception)
            self.assertIn("the application's lifespan startup has not finished", message)
            self.assertIn("synchronous code of the application holds the event loop", message)
            self.assertIn("in startup\n    release.wait(10)", message)  # where the loop's thread is
            [server_thread] = [thread for thread in threading.enumerate() if thread.name.endswith(name)]
            release.set()
            server_thread.join(10)
            self.assertFalse(server_thread.is_alive())
            [server] = servers
            self.assertTrue(server.loop.is_closed())
            del server, servers[:]
            gc.collect()
        self.assertEqual([str(warning.message) for warning in caught], [])
        self.assertEqual(thread_names(), threads)

    def test_startup_failed_message_fails_set_up(self):
        async def startup(send):
            await send({"type": "lifespan.startup.failed", "message": "no configuration found"})

        layer = asgi.Layer(lifespan_app([], startup=startup), name="asgi_startup_failed")
        with self.assertRaises(asgi.LifespanStartupError) as caught:
            layer.setUp()
        self.assertIn("no configuration found", str(caught.exception))
        self.assertNotIn("http_port", layer)

    def test_application_without_lifespan_is_served_quietly(self):
        stderr = io.StringIO()
        with redirect_stderr(stderr), mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            os.environ.pop("GOCEPT_HTTP_VERBOSE_LOGGING", None)
            layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="asgi_no_lifespan"))
            self.assertEqual(get_json(layer["http_url"] + "plain")["path"], "/plain")
            layer.check_server_errors()
            layer.tearDown()
        self.assertEqual(stderr.getvalue(), "")
        self.assertEqual(layer.server_errors.take(), [])

    def test_application_that_returns_from_its_lifespan_is_served(self):
        async def ignores_lifespan(scope, receive, send):
            if scope["type"] == "lifespan":
                return  # the other common way of not supporting it
            await http_echo(scope, receive, send)

        layer = asgi.Layer(ignores_lifespan, name="asgi_returns_from_lifespan")
        set_up_by_hand(self, layer)
        self.assertEqual(get_json(layer["http_url"])["path"], "/")
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)

    def test_shutdown_that_hangs_is_cut_off_within_the_stop_timeout(self):
        async def shutdown(send):
            await asyncio.sleep(3600)

        layer = asgi.Layer(lifespan_app([], shutdown=shutdown), name="asgi_shutdown_hangs")
        layer.stop_timeout = 0.5
        threads = thread_names()
        layer.setUp()
        started = time.monotonic()
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        # Cut off, not waited for (an hour): the budget is 0.4 s, and the
        # bound leaves room for a busy machine.
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertIn("lifespan shutdown failed", str(caught.exception))
        # Within what was left of its 0.4 s when the shutdown began.
        self.assertRegex(str(caught.exception), r"did not finish within 0\.[0-4]\d seconds")
        self.assertIn("stop_timeout (0.5 seconds)", str(caught.exception))
        self.assertEqual(thread_names(), threads)

    def test_a_shutdown_that_hangs_says_where_it_waits(self):
        from starlette.applications import Starlette

        async def flush_the_queue():
            await asyncio.Event().wait()  # a consumer that is gone

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            await flush_the_queue()

        layer = asgi.Layer(Starlette(lifespan=lifespan), name="asgi_shutdown_waits", stop_timeout=0.5)
        layer.setUp()
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        message = str(caught.exception)
        self.assertRegex(message, r"did not finish within 0\.[0-4]\d seconds; the layer's stop_timeout"
                                  r" \(0\.5 seconds\) bounds it\. It waits at:\n")
        self.assertIn(", in lifespan\n    await flush_the_queue()\n", message)
        self.assertIn(", in flush_the_queue\n    await asyncio.Event().wait()", message)

    def test_shutdown_left_no_time_says_so(self):
        """A stop that spent its whole time ending connections (a flood of
        them, say) does not blame the application's shutdown."""
        events: list[str] = []
        layer = asgi.Layer(lifespan_app(events), name="asgi_shutdown_no_time")
        layer.setUp()

        class Spent:
            def __init__(self, seconds: float) -> None:
                pass

            def remaining(self) -> float:
                return 0.0

        with mock.patch.object(asgi, "Deadline", Spent), self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        self.assertIn("lifespan shutdown failed", str(caught.exception))
        self.assertIn("it did not run: ending the server's connections and requests took", str(caught.exception))
        self.assertIn("raise stop_timeout", str(caught.exception))
        self.assertNotIn("lifespan.shutdown", events)

    def test_shutdown_that_raises_fails_tear_down(self):
        async def shutdown(send):
            raise RuntimeError("could not flush the cache")

        layer = asgi.Layer(lifespan_app([], shutdown=shutdown), name="asgi_shutdown_raises")
        layer.setUp()
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        self.assertIn("lifespan shutdown failed", str(caught.exception))
        self.assertIn("RuntimeError: could not flush the cache", str(caught.exception))
        self.assertEqual(layer._resources, {})
        with self.assertRaises(ResourceError) as missing:  # under zope.pytestlayer, the next test's
            layer["http_url"]
        self.assertIn("was torn down, so it has no 'http_url' resource any more. Its tearDown raised",
                      str(missing.exception))
        layer.tearDown()  # the failure was reported once

    @unittest.skipIf(sys.version_info < (3, 11), "Python 3.10 cannot tell it from the task's own cancellation")
    def test_a_cancelled_error_the_shutdown_raises_itself_fails_tear_down(self):
        events: list[str] = []
        workers: list[asyncio.Task] = []

        async def startup(send):
            workers.append(asyncio.create_task(asyncio.Event().wait()))

        async def shutdown(send):
            worker = workers[0]
            worker.cancel()
            await worker  # raises the worker's CancelledError here
            events.append("database closed")

        layer = asgi.Layer(lifespan_app(events, startup=startup, shutdown=shutdown), name="asgi_shutdown_cancelled")
        layer.setUp()
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()  # before: taken for the server's cancellation, the failure unsaid
        self.assertIn("the application's lifespan shutdown failed", str(caught.exception))
        self.assertIn("await worker", str(caught.exception))
        self.assertIn("asyncio.exceptions.CancelledError", str(caught.exception))
        self.assertEqual(events, ["lifespan.startup", "lifespan.shutdown"])

    def test_a_shutdown_failure_with_a_message_is_reported_once(self):
        # Starlette and FastAPI send lifespan.shutdown.failed with the
        # traceback as its message, and uvicorn logs it as an error.
        async def shutdown(send):
            await send({"type": "lifespan.shutdown.failed", "message": "Traceback ...\nOSError: disk full"})

        layer = asgi.Layer(lifespan_app([], shutdown=shutdown), name="asgi_shutdown_message")
        stderr = io.StringIO()
        with redirect_stderr(stderr), mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            layer.setUp()
            with self.assertRaises(ServerSideError) as caught:
                layer.tearDown()
        self.assertEqual(stderr.getvalue(), "")  # said once, in the failure
        self.assertIn("the application's lifespan shutdown failed", str(caught.exception))
        self.assertIn("OSError: disk full", str(caught.exception))
        self.assertIsNone(caught.exception.__context__)  # not raised while another error was


def writer_app(events: list[str]):
    """An application whose lifespan starts a writer task that holds what
    the requests post until it is told to stop, then writes it out at once,
    as a batching writer does; each request starts a task too, which
    confirms its item once written. The lifespan shutdown stops the writer
    and awaits both, as applications do."""

    async def app(scope, receive, send):
        state = scope["state"]
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            stop, written = asyncio.Event(), asyncio.Event()
            held: list[str] = []

            async def writer():
                await stop.wait()
                events.append(f"wrote {held}")
                written.set()

            state.update(held=held, written=written, confirmations=set())
            task = asyncio.create_task(writer())
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            stop.set()
            await task
            await asyncio.gather(*state["confirmations"])
            events.append("shut down")
            await send({"type": "lifespan.shutdown.complete"})
            return
        item = (await read_body(receive)).decode()
        state["held"].append(item)

        async def confirm():
            await state["written"].wait()
            events.append(f"confirmed {item}")

        state["confirmations"].add(asyncio.create_task(confirm()))
        await respond(send, b"held")

    return app


def app_with_a_poller(events: list[str], poll):
    """``lifespan_app`` whose startup starts ``poll()`` in a task, which its
    shutdown leaves running (as many applications do: the loop's end ends it)."""
    pollers = []

    async def startup(send):
        pollers.append(asyncio.create_task(poll()))

    return lifespan_app(events, startup=startup)


class ApplicationTaskTests(unittest.TestCase):
    """The application's own tasks (started by its lifespan or its requests)
    run on through its lifespan shutdown, as under uvicorn; those still
    running after it are ended before ``tearDown`` returns."""

    def test_the_shutdown_finds_the_applications_tasks_running_and_stops_them_itself(self):
        for tls in (False, True):
            with self.subTest(tls=tls):
                events: list[str] = []
                layer = asgi.Layer(writer_app(events), name=f"asgi_app_tasks_tls_{tls}", tls=tls)
                layer.setUp()
                try:
                    with httpx.Client(verify=layer["ssl_context"] if tls else True, timeout=5) as client:
                        for item in ("first", "second"):
                            self.assertEqual(client.post(layer["http_url"], content=item).text, "held")
                finally:
                    layer.tearDown()
                # Before, the layer cancelled both tasks ahead of the shutdown:
                # nothing was written, and the shutdown ended in CancelledError.
                self.assertEqual(events, ["wrote ['first', 'second']", "confirmed first", "confirmed second",
                                          "shut down"])

    def test_a_starlette_shutdown_that_awaits_its_queue_gets_it_done(self):
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        delivered: list[bytes] = []

        @contextlib.asynccontextmanager
        async def lifespan(app):
            outbox: asyncio.Queue[bytes] = asyncio.Queue()
            flush = asyncio.Event()

            async def deliver():
                await flush.wait()  # in batches: the shutdown asks for the last one
                while True:
                    delivered.append(await outbox.get())
                    outbox.task_done()

            deliverer = asyncio.create_task(deliver())
            yield {"outbox": outbox}
            flush.set()
            await outbox.join()
            deliverer.cancel()  # not awaited: the layer ends it

        async def send_mail(request):
            request.state.outbox.put_nowait(await request.body())
            return Response(status_code=202)

        app = Starlette(routes=[Route("/mail", send_mail, methods=["POST"])], lifespan=lifespan)
        for tls in (False, True):
            with self.subTest(tls=tls):
                delivered.clear()
                layer = asgi.Layer(app, name=f"asgi_starlette_queue_tls_{tls}", tls=tls)
                layer.setUp()
                try:
                    with httpx.Client(verify=layer["ssl_context"] if tls else True, timeout=5) as client:
                        for mail in (b"one", b"two"):
                            self.assertEqual(client.post(layer["http_url"] + "mail", content=mail).status_code, 202)
                finally:
                    started = time.monotonic()
                    layer.tearDown()  # before: "did not finish within 0.80 seconds", the mail undelivered
                self.assertLess(time.monotonic() - started, 0.5)
                self.assertEqual(delivered, [b"one", b"two"])

    def test_tasks_left_running_are_ended_after_the_shutdown_and_before_tear_down_returns(self):
        events: list[str] = []

        async def poll():
            try:
                await asyncio.Event().wait()  # for news, which never comes
            finally:
                await asyncio.sleep(0)  # a goodbye that takes a turn of the loop, as closing a connection does
                events.append("poller ended")

        threads = thread_names()
        layer = asgi.Layer(app_with_a_poller(events, poll), name="asgi_tasks_left_running")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer.setUp()
            started = time.monotonic()
            layer.tearDown()
            elapsed = time.monotonic() - started
            gc.collect()  # a task left pending would say so now
        self.assertEqual(events, ["lifespan.startup", "lifespan.shutdown", "poller ended"])
        self.assertLess(elapsed, 0.5)
        self.assertEqual([str(warning.message) for warning in caught], [])
        self.assertEqual(layer.server_errors.take(), [])
        self.assertEqual(thread_names(), threads)

    def test_what_a_task_left_running_raises_as_it_ends_fails_tear_down(self):
        async def poll():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise RuntimeError("could not say goodbye to the feed") from None

        layer = asgi.Layer(app_with_a_poller([], poll), name="asgi_task_left_raises")
        layer.setUp()
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()  # before: swallowed
        self.assertIn("a task left running when the application had shut down raised as it was cancelled",
                      str(caught.exception))
        self.assertIn("RuntimeError: could not say goodbye to the feed", str(caught.exception))

    def test_a_task_that_will_not_end_fails_tear_down_and_is_left_behind(self):
        refused: list[str] = []
        started_tasks: list[asyncio.Task] = []
        set_ups: list[bool] = []

        async def stubborn():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    refused.append("cancellation")  # and goes on

        async def startup(send):
            set_ups.append(True)
            if len(set_ups) == 1:
                started_tasks.append(asyncio.create_task(stubborn()))

        threads = thread_names()
        layer = asgi.Layer(lifespan_app([], startup=startup), name="asgi_task_will_not_end", stop_timeout=0.5)
        layer.setUp()
        started = time.monotonic()
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()  # before: no error, and the server's thread waited for it for ever
        self.assertLess(time.monotonic() - started, 5.0)  # about 0.4 s; room for a busy machine
        message = str(caught.exception)
        self.assertIn("the application's lifespan shutdown failed", message)
        self.assertRegex(message, r"it left 1 task running that did not end within 0\.\d\d seconds of being"
                                  r" cancelled \(caught the cancellation and went on\), left behind:"
                                  r" <Task \w+ name='[^']+' coro=<.*stubborn\(\) running at ")
        self.assertEqual(refused, ["cancellation"])
        self.assertEqual(thread_names(), threads)
        # The task goes with its server, which the layer's next set-up
        # replaces: that it was destroyed pending was said already, and is
        # no error of the next server's tests.
        task = weakref.ref(started_tasks[0])
        del caught, started_tasks[:]  # the error's traceback holds the server
        layer.setUp()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            gc.collect()
        self.assertIsNone(task())
        self.assertEqual([str(warning.message) for warning in warned], [])
        self.assertEqual(layer.server_errors.take(), [])
        layer.tearDown()

    def test_tls_connections_accepted_in_the_loops_last_turn_end_before_the_shutdown(self):
        """asyncio makes each TLS connection it accepts (the handshake
        included) in a task of its own, which starts a turn after the
        accept. Here the loop stops in the turn that accepts three clients,
        which never shake hands: their tasks end before the application's
        shutdown, which finds its own task running, and nothing is left
        for the garbage collector."""
        events: list[str] = []
        workers: list[tuple[asyncio.Event, asyncio.Task]] = []

        async def startup(send):
            stop = asyncio.Event()

            async def work():
                await stop.wait()
                events.append("worker stopped")

            workers.append((stop, asyncio.create_task(work())))

        async def shutdown(send):
            handshakes = [task for task in asyncio.all_tasks() if "_accept_connection" in repr(task)]
            events.append(f"{len(handshakes)} handshakes under way")
            stop, worker = workers[0]
            stop.set()
            await worker

        layer = asgi.Layer(lifespan_app(events, startup=startup, shutdown=shutdown), name="asgi_tls_last_turn",
                           tls=True)
        layer.setUp()
        server, thread = layer["httpd"], layer["httpd_thread"]
        paused, resume = threading.Event(), threading.Event()
        clients: list[socket.socket] = []

        def pause() -> None:
            paused.set()
            resume.wait(5)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            try:
                server.loop.call_soon_threadsafe(pause)
                self.assertTrue(paused.wait(5))
                for _ in range(3):  # the system completes their connections while the loop is held
                    clients.append(socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5))
                # First in the loop's next turn, before that turn's accepts
                # (request_stop would have the listening sockets refuse them).
                server.loop.call_soon_threadsafe(server.loop.stop)
            finally:
                resume.set()
            thread.join(5)
            layer.tearDown()
            gc.collect()  # what was left for the collector warns now
        self.assertEqual(events, ["lifespan.startup", "lifespan.shutdown", "0 handshakes under way", "worker stopped"])
        self.assertEqual([str(warning.message) for warning in caught], [])
        self.assertEqual(server.accepting, set())
        for client in clients:
            with client:
                try:
                    self.assertEqual(client.recv(1), b"")
                except ConnectionResetError:
                    pass


class ServerErrorTests(unittest.TestCase):

    def test_application_error_fails_the_test_that_caused_it(self):
        layer = asgi.Layer(app_without_lifespan, name="asgi_raises")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        statuses = []

        class Inner(unittest.TestCase):
            def test_provokes(self):
                layer.testSetUp()  # hands the end-of-test check to this test
                try:
                    with urllib.request.urlopen(layer["http_url"] + "raise", timeout=5):
                        pass
                except urllib.error.HTTPError as error:
                    statuses.append(error.code)
                    error.close()
                layer.testTearDown()

        result = unittest.TestResult()
        Inner("test_provokes").run(result)
        self.assertEqual(statuses, [500])
        self.assertEqual(result.errors, [])
        [(_, report)] = result.failures
        self.assertIn("ServerSideError", report)
        self.assertIn("Exception in ASGI application while serving GET /raise", report)
        self.assertIn("RuntimeError: raised on purpose by the application", report)
        self.assertIn('in http_echo\n    raise RuntimeError("raised on purpose by the application")', report)

    def test_take_finds_an_error_raised_after_the_answer(self):
        # Starlette and FastAPI answer 500 first, then raise: the error comes
        # after the client has the answer, and take() waits for it.
        async def answers_then_raises(scope, receive, send):
            if scope["type"] != "http":
                raise RuntimeError("no lifespan here")
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"oops"})
            await asyncio.sleep(0)  # as a middleware's re-raise does, one turn later
            raise ValueError("raised after answering")

        layer = set_up_by_hand(self, asgi.Layer(answers_then_raises, name="asgi_raises_after_answering"))
        with httpx.Client() as client:
            for _ in range(50):
                self.assertEqual(client.get(layer["http_url"]).status_code, 500)
                [error] = layer.server_errors.take()
                self.assertIn("ValueError: raised after answering", error)
            client.get(layer["http_url"])
            layer.server_errors.clear()  # waits too: nothing comes later to fail the test

    def test_websocket_application_error_is_reported(self):
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="asgi_ws_raises"))
        with ws_connect(layer["ws_url"], open_timeout=5) as websocket:
            websocket.send("raise")
            with self.assertRaises(websockets.exceptions.ConnectionClosed):
                websocket.recv(timeout=5)
        with self.assertRaises(ServerSideError) as caught:
            layer.check_server_errors()
        self.assertIn("RuntimeError: raised on purpose in a WebSocket", str(caught.exception))
        self.assertIn("Exception in ASGI application while serving WebSocket /", str(caught.exception))

    def test_a_websocket_application_returning_without_a_handshake_is_told_where_and_what_to_do(self):
        # uvicorn says only "ASGI callable returned without completing
        # handshake.": not which WebSocket, nor what the application should send.
        async def forgets_to_accept(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()  # websocket.connect, then returns

        layer = set_up_by_hand(self, asgi.Layer(forgets_to_accept, name="asgi_ws_no_handshake"))
        with self.assertRaises(websockets.exceptions.InvalidStatus) as refused:
            ws_connect(layer["ws_url"] + "feed?room=1", open_timeout=5)
        self.assertEqual(refused.exception.response.status_code, 500)
        with self.assertRaises(ServerSideError) as caught:
            layer.check_server_errors()
        self.assertIn(
            "The application returned without accepting or refusing WebSocket /feed, so its client got a 500:"
            " send websocket.accept to accept it (Starlette's websocket.accept()), or websocket.close to"
            " refuse it (a 403)", str(caught.exception))

    def test_websocket_error_after_its_client_left_is_reported_in_the_same_test(self):
        """The client closed its WebSocket before the application raised."""
        async def raises_after_close(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                await receive()  # the client's message
                await asyncio.sleep(0.05)
                raise RuntimeError("raised after the client left")

        layer = set_up_by_hand(self, asgi.Layer(raises_after_close, name="asgi_ws_raises_late"))
        with ws_connect(layer["ws_url"], open_timeout=5) as websocket:
            websocket.send("go")
        with self.assertRaises(ServerSideError) as caught:
            layer.check_server_errors()
        self.assertIn("RuntimeError: raised after the client left", str(caught.exception))

    def test_an_error_of_a_websocket_a_test_left_running_names_that_test(self):
        go = asyncio.Event()

        async def goes_on_after_its_client(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                while (await receive())["type"] != "websocket.disconnect":
                    pass
                await go.wait()
                raise RuntimeError("raised after its test ended")

        layer = set_up_by_hand(self, asgi.Layer(goes_on_after_its_client, name="asgi_ws_left_running"))
        layer.quiet_timeout = 0.1
        with ws_connect(layer["ws_url"], open_timeout=5):
            pass
        layer.check_after_test()  # this test's end waits for it in vain, and gives up on it
        layer.testTearDown()
        layer.testSetUp()  # the next test
        layer["httpd"].loop.call_soon_threadsafe(go.set)
        with self.assertRaises(ServerSideError) as caught:
            deadline = time.monotonic() + 5
            while not layer.server_errors._errors and time.monotonic() < deadline:
                time.sleep(0.01)
            layer.server_errors.check()
        self.assertIn(f"raised by a request that an earlier test, {self.id()}, left running", str(caught.exception))

    def test_a_websocket_application_going_on_without_its_client_holds_up_one_test_end_only(self):
        async def never_reads_again(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                await asyncio.Event().wait()  # pushes nothing, reads nothing, ends never

        layer = set_up_by_hand(self, asgi.Layer(never_reads_again, name="asgi_ws_goes_on"))
        with ws_connect(layer["ws_url"], open_timeout=5):
            pass
        server = layer["httpd"]
        deadline = time.monotonic() + 5
        while not any(protocol.over() for protocol in server.websocket_protocols.values()):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        self.assertEqual([server.wait_quiet(0.2), server.wait_quiet(0.2)], [False, True])


        async def refuses(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "websocket.http.response.body", "body": b"no token"})

        layer = set_up_by_hand(self, asgi.Layer(refuses, name="asgi_ws_denied"))
        with self.assertRaises(websockets.exceptions.InvalidStatus) as caught:
            ws_connect(layer["ws_url"], open_timeout=5)
        self.assertEqual(caught.exception.response.status_code, 401)
        self.assertEqual(caught.exception.response.body, b"no token")
        layer.check_server_errors()  # no "returned without completing handshake"

    def test_error_after_the_response_is_reported_in_the_same_test(self):
        """The client has its whole answer before the application raises."""
        async def raises_after_answering(scope, receive, send):
            if scope["type"] == "http":
                await respond(send, b"done")
                await asyncio.sleep(0.05)
                raise RuntimeError("raised after answering")

        layer = set_up_by_hand(self, asgi.Layer(raises_after_answering, name="asgi_raises_late"))
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            self.assertEqual(response.read(), b"done")
        with self.assertRaises(ServerSideError) as caught:
            layer.check_server_errors()
        self.assertIn("RuntimeError: raised after answering", str(caught.exception))

    def exercise(self):
        layer = asgi.Layer(app_without_lifespan, name=f"asgi_quiet_{self._testMethodName}")
        stderr = io.StringIO()
        # A handler of the process's own (pytest's log capture, a project's
        # logging set-up) hears nothing from the layer.
        root_handler = logging.handlers.BufferingHandler(1000)
        logging.getLogger().addHandler(root_handler)
        self.addCleanup(logging.getLogger().removeHandler, root_handler)
        self.addCleanup(lambda: self.assertEqual([record.getMessage() for record in root_handler.buffer], []))
        with redirect_stderr(stderr):
            set_up_by_hand(self, layer)
            with self.assertRaises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(layer["http_url"] + "raise", timeout=5)
            caught.exception.close()
            [error] = layer.server_errors.take()  # provoked: reported, not printed
            self.assertIn("RuntimeError: raised on purpose", error)
            layer.tearDown()
        return stderr.getvalue()

    def test_nothing_reaches_the_terminal_by_default(self):
        with mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            os.environ.pop("GOCEPT_HTTP_VERBOSE_LOGGING", None)
            self.assertEqual(self.exercise(), "")

    def test_verbose_variable_logs_requests_and_errors(self):
        with mock.patch.dict(os.environ, {"SERVERLAYER_VERBOSE": "1"}):
            output = self.exercise()
        self.assertIn('"GET /raise HTTP/1.1" 500', output)
        self.assertIn("RuntimeError: raised on purpose", output)


class CountedTurns:
    """Counts the turns of a server's asyncio loop: each waits in its selector once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count = 0
        self.selector = loop._selector  # type: ignore[attr-defined]
        self.select = self.selector.select

    def __enter__(self) -> CountedTurns:
        def select(timeout=None):
            self.count += 1
            return self.select(timeout)

        self.selector.select = select
        return self

    def __exit__(self, *exc_info: object) -> None:
        del self.selector.select


class AcceptingTests(unittest.TestCase):
    """Plain connections are accepted without asyncio's task per connection."""

    def setUp(self):
        self.turns_at_request: list[int] = []

        async def app(scope, receive, send):
            if scope["type"] == "http":
                self.turns_at_request.append(self.turns.count)
                await respond(send, b"counted")

        self.layer = set_up_by_hand(self, asgi.Layer(app, name=f"asgi_accepting_{self._testMethodName}"))
        self.address = (self.layer["http_host"], self.layer["http_port"])
        self.server = self.layer._running.server
        self.turns = CountedTurns(self.server.loop)

    def test_a_request_sent_with_its_connection_reaches_the_application_in_the_third_turn(self):
        """The turn that accepts, the one that reads what came with the
        connection, the one that runs the application. Reading a turn later
        it would be the fourth; asyncio's create_server (a task that waits
        a turn for the transport, and another for its connection_made)
        made it the fifth. The loop is held while the client connects and
        sends, so that the request is there when the connection is accepted."""
        paused, resume = threading.Event(), threading.Event()

        def pause() -> None:
            paused.set()
            resume.wait(5)

        with self.turns:
            for _ in range(3):  # the Date header's timer may take a turn of one
                paused.clear()
                resume.clear()
                self.server.loop.call_soon_threadsafe(pause)
                self.assertTrue(paused.wait(5))
                try:
                    client = socket.create_connection(self.address, timeout=5)
                    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    self.turns.count = 0
                finally:
                    resume.set()
                with client:
                    self.assertTrue(read_until_closed(client).endswith(b"\r\n\r\ncounted"))
        self.assertEqual(min(self.turns_at_request), 3, self.turns_at_request)

    def test_running_out_of_descriptors_fails_the_test_and_pauses_accepting(self):
        """The error reaches the test, and the loop does not spin on a
        socket it cannot accept from (asyncio's create_server tries again
        up to its backlog, reporting each); it tries again a moment later."""
        [listening] = self.server.sockets
        out_of_descriptors = OSError(errno.EMFILE, "Too many open files")
        with mock.patch.object(asyncio.constants, "ACCEPT_RETRY_DELAY", 0.2):
            with mock.patch.object(listening, "accept", side_effect=out_of_descriptors) as accept:
                with CountedTurns(self.server.loop) as turns:
                    client = socket.create_connection(self.address, timeout=5)
                    deadline = time.monotonic() + 5
                    while not accept.called and time.monotonic() < deadline:
                        time.sleep(0.01)
                    time.sleep(0.1)  # within the retry delay: the loop must be waiting, not spinning
                    spun = turns.count
            with client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                self.assertTrue(read_until_closed(client).endswith(b"\r\n\r\ncounted"))
        self.assertEqual(accept.call_count, 1)
        self.assertLessEqual(spun, 3)
        [error] = self.layer.server_errors.take()
        self.assertIn("out of file descriptors", error)
        self.assertIn("Too many open files", error)


class PlainAcceptingTests(unittest.TestCase):
    """serverlayer.server.PlainAccepting with protocols other than uvicorn's."""

    def serve(self, protocol_factory, backlog: int = 100):
        """Accept on a listening socket as the layers make it (``remembering``)."""
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        listening = remembering(socket.create_server(("127.0.0.1", 0), backlog=backlog))
        self.addCleanup(listening.close)
        transports: set[asyncio.Transport] = set()
        accepting = PlainAccepting(loop, listening, protocol_factory, transports)

        def stop() -> None:
            accepting.close()
            for transport in transports:
                transport.abort()
            loop.run_until_complete(asyncio.sleep(0))  # their connection_lost

        self.addCleanup(stop)
        return loop, accepting, transports

    def test_the_first_read_skips_a_transport_its_protocol_paused_as_it_was_made(self):
        received: list[bytes] = []

        class Pausing(asyncio.Protocol):
            def connection_made(self, transport):
                transport.pause_reading()

            def data_received(self, data):
                received.append(data)

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        served, client = socket.socketpair()
        self.addCleanup(client.close)
        served.setblocking(False)
        client.sendall(b"sent with the connection")
        transport = loop._make_socket_transport(served, Pausing())  # as PlainAccepting makes it
        loop.call_soon(loop.stop)
        loop.run_forever()  # one turn: connection_made, and asyncio's start of reading
        try:
            _first_read(transport)
            self.assertEqual(received, [])
        finally:
            transport.abort()
            loop.call_soon(loop.stop)
            loop.run_forever()  # connection_lost

    def test_a_protocol_that_closes_as_it_is_made_is_not_read(self):
        errors: list[dict] = []
        closed = asyncio.Event()

        class Closing(asyncio.Protocol):
            def connection_made(self, transport):
                transport.write(b"bye")
                transport.close()

            def connection_lost(self, exc):
                closed.set()

        loop, accepting, transports = self.serve(Closing)
        address = accepting.sock.getsockname()
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        with socket.create_connection(address, timeout=5) as client:
            client.sendall(b"sent with the connection")
            loop.run_until_complete(asyncio.wait_for(closed.wait(), 5))
            self.assertEqual(client.recv(10), b"bye")
        self.assertEqual(errors, [])

    def test_a_flood_of_clients_is_accepted_a_hundred_a_turn(self):
        """So that a stop, or the connections already served, wait for one
        batch at most (the whole backlog, a thousand under -X dev, took a
        quarter of a second)."""
        made: list[asyncio.Protocol] = []

        def protocol() -> asyncio.Protocol:
            made.append(asyncio.Protocol())
            return made[-1]

        _, accepting, _ = self.serve(protocol, backlog=200)
        listening = accepting.sock
        clients = [socket.create_connection(listening.getsockname(), timeout=5) for _ in range(150)]
        try:
            accepting._accept()  # what the loop calls when the socket is readable
            self.assertEqual(len(made), 100)
            accepting._accept()
            self.assertEqual(len(made), 150)
            listening.stopping = True
            clients.append(socket.create_connection(listening.getsockname(), timeout=5))
            accepting._accept()
            self.assertEqual(len(made), 150)
        finally:
            for client in clients:
                client.close()

    def test_a_listening_socket_says_none_waits_after_a_hundred_in_a_row_or_once_stopping(self):
        """What bounds asyncio's create_server (the smtp layer, the TLS
        front), which accepts until told that none waits."""
        listening = remembering(socket.create_server(("127.0.0.1", 0), backlog=300))
        self.addCleanup(listening.close)
        listening.setblocking(False)
        clients = [socket.create_connection(listening.getsockname(), timeout=5) for _ in range(250)]
        accepted: list[socket.socket] = []

        def accept_until_none_waits() -> int:
            count = 0
            while True:
                try:
                    accepted.append(listening.accept()[0])
                except BlockingIOError:
                    return count
                count += 1

        try:
            self.assertEqual(accept_until_none_waits(), 100)
            self.assertEqual(accept_until_none_waits(), 100)
            listening.stopping = True
            self.assertEqual(accept_until_none_waits(), 0)
            listening.stopping = False
            self.assertEqual(accept_until_none_waits(), 50)
        finally:
            for sock in clients + accepted:
                sock.close()

    def test_new_clients_are_refused_once_the_server_stops(self):
        """Not left in the listening socket's backlog while the
        application shuts down, to be reset later."""
        shutting, release = threading.Event(), threading.Event()

        async def slow_shutdown(send):
            shutting.set()
            release.wait(5)  # holds the loop: the kernel alone answers the client

        layer = asgi.Layer(lifespan_app([], shutdown=slow_shutdown), name="asgi_refuses_when_stopping")
        layer.setUp()
        address = (layer["http_host"], layer["http_port"])
        stopping = threading.Thread(target=layer.tearDown)
        stopping.start()
        try:
            self.assertTrue(shutting.wait(5))
            with self.assertRaises(ConnectionRefusedError):
                socket.create_connection(address, timeout=5).close()
        finally:
            release.set()
            stopping.join(10)


class StopTests(unittest.TestCase):

    def test_connections_accepted_in_the_loops_last_round_are_closed(self):
        """Their tasks must not start once the servers are closed: asyncio
        would fail to make their transports, and leave them open."""
        layer = asgi.Layer(lifespan_app([]), name="asgi_last_round")
        layer.setUp()
        stop_in_the_round_that_accepts(self, layer, (layer["http_host"], layer["http_port"]))

    def test_a_stop_asked_again_once_the_serving_ended_leaves_nothing_open(self):
        layer = asgi.Layer(lifespan_app([]), name="asgi_stop_twice")
        layer.setUp()
        stop_asked_again_as_the_serving_ends(self, layer)

    def test_a_shut_down_that_fails_fails_tear_down(self):
        layer = asgi.Layer(lifespan_app([]), name="asgi_shut_down_fails")
        layer.setUp()
        server = layer._running.server

        def failing_shut_down(servers):
            try:
                type(server)._shut_down(server, servers)
            finally:
                raise RuntimeError("the shut-down failed")

        server._shut_down = failing_shut_down
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        self.assertIn("The serving loop died", str(caught.exception))
        self.assertIn("RuntimeError: the shut-down failed", str(caught.exception))

    def test_tear_down_is_fast_with_idle_keep_alive_and_websocket_clients(self):
        layer = asgi.Layer(lifespan_app([]), name="asgi_fast_stop")
        layer.setUp()
        try:
            layer.testSetUp()
            keep_alive = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
            self.addCleanup(keep_alive.close)
            keep_alive.request("GET", "/")
            response = keep_alive.getresponse()
            self.assertEqual(json.loads(response.read())["path"], "/")
            self.assertFalse(response.will_close)
            websocket = ws_connect(layer["ws_url"], open_timeout=5).__enter__()
            self.addCleanup(websocket.close)
            websocket.send("still here")
            self.assertEqual(websocket.recv(timeout=5), "echo: still here")
            layer.testTearDown()
        finally:
            started = time.monotonic()
            layer.tearDown()
            elapsed = time.monotonic() - started
        self.assertLess(elapsed, 0.5)
        self.assertEqual(keep_alive.sock.recv(1), b"")  # the server closed the idle connection
        with self.assertRaises(websockets.exceptions.ConnectionClosed) as caught:
            websocket.recv(timeout=5)
        self.assertEqual(caught.exception.rcvd.code, 1001)  # going away (uvicorn says 1012, service restart)

    def serve_starlette_feed(
        self, events: list, *, hang_after_disconnect: bool = False, stop_timeout: float = 5.0, cleanup: float = 0
    ):
        """A Starlette application whose WebSocket ``/feed`` answers in capitals
        and, once its client is gone, cleans up (taking ``cleanup`` seconds);
        its lifespan notes its end."""
        from starlette.applications import Starlette
        from starlette.routing import WebSocketRoute
        from starlette.websockets import WebSocketDisconnect

        async def feed(websocket):
            await websocket.accept()
            try:
                while True:
                    await websocket.send_text((await websocket.receive_text()).upper())
            except WebSocketDisconnect as disconnect:
                events.append(("disconnect", disconnect.code))
                try:
                    # As removing a subscriber from a broker does; one that hangs, never to finish.
                    await (asyncio.Event().wait() if hang_after_disconnect else asyncio.sleep(cleanup))
                except asyncio.CancelledError:
                    events.append("cancelled")
                    raise
                events.append("cleaned up")

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            events.append("lifespan shutdown")

        app = Starlette(routes=[WebSocketRoute("/feed", feed)], lifespan=lifespan)
        layer = asgi.Layer(app, name=f"asgi_{self._testMethodName}", stop_timeout=stop_timeout)
        layer.setUp()
        self.addCleanup(layer.tearDown)  # does nothing once torn down
        layer.testSetUp()
        websocket = ws_connect(layer["ws_url"] + "feed", open_timeout=5).__enter__()
        self.addCleanup(websocket.close)
        websocket.send("hi")
        self.assertEqual(websocket.recv(timeout=5), "HI")
        return layer, websocket

    def test_tear_down_closes_an_open_websocket_with_1001_and_its_application_cleans_up(self):
        threads = thread_names()
        events: list = []
        with warnings.catch_warnings(record=True) as caught_warnings:
            warnings.simplefilter("always", ResourceWarning)
            layer, websocket = self.serve_starlette_feed(events)
            # The test's end leaves an open WebSocket alone: it neither waits
            # for its application nor ends it, and the client goes on.
            layer.check_after_test()
            layer.testTearDown()
            self.assertEqual(events, [])
            websocket.send("still here")
            self.assertEqual(websocket.recv(timeout=5), "STILL HERE")
            started = time.monotonic()
            layer.tearDown()  # no error: the application ended as it does when its client leaves
            elapsed = time.monotonic() - started
            with self.assertRaises(websockets.exceptions.ConnectionClosed) as caught:
                websocket.recv(timeout=5)
            websocket.close()
            gc.collect()
        self.assertLess(elapsed, 0.5)  # not the 2 s that stop_timeout=5 would let it wait
        self.assertEqual(events, [("disconnect", 1001), "cleaned up", "lifespan shutdown"])
        self.assertEqual((caught.exception.rcvd.code, caught.exception.rcvd.reason), (1001, "the server is stopping"))
        self.assertEqual([str(warning.message) for warning in caught_warnings], [])
        self.assertEqual(thread_names(), threads)

    def test_a_websocket_cleanup_that_awaits_is_waited_for_at_tear_down(self):
        """A cleanup that awaits something (a broker told the subscriber is
        gone) finishes: the close the stop sends ends the connection at
        once, and uvicorn then queues a second disconnect (1005) for it,
        which is no sign that the application is not reading."""
        events: list = []
        layer, websocket = self.serve_starlette_feed(events, cleanup=0.1)
        layer.testTearDown()
        started = time.monotonic()
        layer.tearDown()
        elapsed = time.monotonic() - started
        self.assertEqual(events, [("disconnect", 1001), "cleaned up", "lifespan shutdown"])
        self.assertLess(elapsed, 1.5)  # the cleanup's 0.1 s, not the 2 s that stop_timeout=5 would let it wait

    def test_what_a_websocket_application_raises_cleaning_up_at_tear_down_fails_it(self):
        async def raises_when_told(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                told = await receive()
                raise RuntimeError(f"cleaning up after {told['type']} {told['code']}")

        layer = asgi.Layer(raises_when_told, name="asgi_ws_cleanup_raises")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        with ws_connect(layer["ws_url"], open_timeout=5), self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        self.assertIn("after the layer's last test ended", str(caught.exception))
        self.assertIn("Exception in ASGI application while serving WebSocket /\n", str(caught.exception))
        self.assertIn("RuntimeError: cleaning up after websocket.disconnect 1001", str(caught.exception))

    def test_a_websocket_application_that_does_not_finish_is_cancelled_within_the_stop_timeout(self):
        events: list = []
        layer, websocket = self.serve_starlette_feed(events, hang_after_disconnect=True, stop_timeout=0.5)
        layer.testTearDown()
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(events, [("disconnect", 1001), "cancelled", "lifespan shutdown"])
        with self.assertRaises(websockets.exceptions.ConnectionClosed) as caught:
            websocket.recv(timeout=5)
        self.assertEqual(caught.exception.rcvd.code, 1001)

    def test_a_websocket_application_that_is_not_reading_is_not_waited_for(self):
        """One that only pushes (here: waits for something to push) would
        learn of the close only when it next sends: waiting for it would
        take up to half of ``stop_timeout`` for nothing."""
        events: list = []

        async def pushes_only(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                try:
                    await asyncio.Event().wait()  # for news to push, which never comes
                except asyncio.CancelledError:
                    events.append("cancelled")
                    raise

        layer = asgi.Layer(pushes_only, name="asgi_ws_pushes_only", stop_timeout=10.0)
        layer.setUp()
        self.addCleanup(layer.tearDown)
        with ws_connect(layer["ws_url"], open_timeout=5) as websocket:
            started = time.monotonic()
            layer.tearDown()
            elapsed = time.monotonic() - started
            with self.assertRaises(websockets.exceptions.ConnectionClosed) as caught:
                websocket.recv(timeout=5)
        self.assertLess(elapsed, 1.0)  # not the 4 s that stop_timeout=10 would let it wait
        self.assertEqual(events, ["cancelled"])
        self.assertEqual(caught.exception.rcvd.code, 1001)

    def serve_endless_stream(self, events: list, app, *, stop_timeout: float = 5.0, http_protocol: str = "auto"):
        """Set up ``app`` and read the first line of its endless stream at ``/``,
        the stream left open; return the layer."""
        name = f"asgi_{self._testMethodName}_{http_protocol}"
        layer = asgi.Layer(app, name=name, stop_timeout=stop_timeout, http_protocol=http_protocol)
        layer.setUp()
        self.addCleanup(layer.tearDown)  # does nothing once torn down
        client = httpx.Client(timeout=5)
        self.addCleanup(client.close)
        stream = client.stream("GET", layer["http_url"])
        response = stream.__enter__()
        self.addCleanup(stream.__exit__, None, None, None)
        # Kept: a line iterator that goes away closes the connection.
        self.lines = response.iter_lines()
        self.assertEqual(next(self.lines), "data: 0")
        return layer

    def test_tear_down_tells_a_stream_listening_for_the_disconnect_that_its_client_is_gone(self):
        """As when its client leaves: it ends by itself, and what follows
        the stream runs (uvicorn cancels it with the rest)."""
        events: list = []

        async def listens(scope, receive, send):
            if scope["type"] != "http":
                return
            gone = asyncio.Event()

            async def listen():
                while (await receive())["type"] != "http.disconnect":
                    pass
                events.append("disconnect")
                gone.set()

            listener = asyncio.ensure_future(listen())
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                number = 0
                while not gone.is_set():
                    await send({"type": "http.response.body", "body": b"data: %d\n\n" % number, "more_body": True})
                    number += 1
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(gone.wait(), 0.05)
                events.append("ended")
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
            finally:
                listener.cancel()

        for http_protocol in ("auto", "h11"):
            with self.subTest(http_protocol=http_protocol):
                events.clear()
                layer = self.serve_endless_stream(events, listens, http_protocol=http_protocol)
                self.assertEqual(events, [])
                started = time.monotonic()
                layer.tearDown()
                self.assertLess(time.monotonic() - started, 0.5)
                self.assertEqual(events, ["disconnect", "ended"])

    def test_tear_down_lets_a_starlette_stream_end_and_its_background_task_run(self):
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        events: list = []

        async def feed(request):
            async def lines():
                number = 0
                try:
                    while True:
                        yield f"data: {number}\n\n"
                        number += 1
                        await asyncio.sleep(0.05)
                finally:
                    events.append("stream closed")

            return StreamingResponse(
                lines(), media_type="text/event-stream", background=BackgroundTask(events.append, "background ran")
            )

        layer = self.serve_endless_stream(events, Starlette(routes=[Route("/", feed)]))
        self.assertEqual(events, [])
        layer.tearDown()
        self.assertEqual(events, ["stream closed", "background ran"])

    def test_tear_down_waits_for_the_thread_a_background_task_ran_on(self):
        # anyio tells it to end as the request's task ends, and does not
        # wait for it: the test ended now and then with it still there.
        from anyio._backends._asyncio import WorkerThread
        from starlette.applications import Starlette
        from starlette.background import BackgroundTask
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        ran: list[str] = []

        async def page(request):
            return PlainTextResponse("page", background=BackgroundTask(ran.append, "background ran"))

        run = WorkerThread.run

        def run_then_linger(thread):
            run(thread)
            time.sleep(0.2)  # widens the moment between its end and its thread's

        layer = asgi.Layer(Starlette(routes=[Route("/", page)]), name="asgi_worker_thread")
        layer.setUp()
        self.addCleanup(layer.tearDown)  # does nothing once torn down
        with mock.patch.object(WorkerThread, "run", run_then_linger):
            self.assertEqual(httpx.get(layer["http_url"]).text, "page")
            self.assertTrue(until(lambda: ran))  # after the answer; its thread then waits for more
            layer.tearDown()
        self.assertEqual(ran, ["background ran"])
        self.assertEqual([thread for thread in threading.enumerate() if isinstance(thread, WorkerThread)], [])

    def test_a_stream_that_goes_on_after_the_disconnect_is_cancelled_within_the_stop_timeout(self):
        events: list = []

        async def deaf(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            events.append("disconnect")  # and goes on as if nothing happened
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                events.append("cancelled")
                raise

        layer = self.serve_endless_stream(events, deaf, stop_timeout=1.0)
        self.assertEqual(events, [])
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(events, ["disconnect", "cancelled"])

    def test_a_stream_that_is_not_reading_is_not_waited_for(self):
        """One that only pushes would learn of the stop only when it next
        sends: waiting for it would take up to 40 % of ``stop_timeout``."""
        events: list = []

        async def pushes_only(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
            try:
                await asyncio.Event().wait()  # for news to push, which never comes
            except asyncio.CancelledError:
                events.append("cancelled")
                raise

        layer = self.serve_endless_stream(events, pushes_only, stop_timeout=10.0)
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 1.0)  # not the 4 s that stop_timeout=10 would let it wait
        self.assertEqual(events, ["cancelled"])

    def test_open_websocket_neither_delays_the_end_of_test_check_nor_stays_registered(self):
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="asgi_ws_quiet"))
        server = layer["httpd"]
        with ws_connect(layer["ws_url"], open_timeout=5) as websocket:
            websocket.send("x")
            websocket.recv(timeout=5)
            self.assertEqual(len(server.transports), 1)
            started = time.monotonic()
            layer.check_server_errors()
            self.assertLess(time.monotonic() - started, 0.5)  # less than quiet_timeout: it did not wait
        deadline = time.monotonic() + 5
        while server.transports and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(server.transports, set())  # the server forgot the connection the client closed

    def test_request_that_never_ends_does_not_hang_tear_down(self):
        entered = threading.Event()

        async def never_answers(scope, receive, send):
            if scope["type"] == "http":
                entered.set()
                await asyncio.sleep(3600)

        layer = asgi.Layer(never_answers, name="asgi_never_answers")
        layer.setUp()
        outcome = []

        def fetch():
            try:
                with httpx.Client(timeout=10) as client:
                    outcome.append(client.get(layer["http_url"]))
            except httpx.HTTPError as error:
                outcome.append(error)

        client = threading.Thread(target=fetch)
        client.start()
        self.assertTrue(entered.wait(5))
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)
        client.join(5)
        [error] = outcome
        self.assertIsInstance(error, httpx.RemoteProtocolError)  # the connection was closed unanswered
        self.assertEqual(layer.server_errors.take(), [])  # a request the server cancelled is no error

    def test_an_application_holding_the_event_loop_fails_tear_down_saying_where(self):
        # A synchronous call in an async endpoint (time.sleep, requests, a
        # blocking database driver) holds the loop: tearDown returned after
        # stop_timeout with the server's thread still running, the lifespan
        # shutdown not run, and not a word.
        entered, release = threading.Event(), threading.Event()
        events: list[str] = []
        lifespan = lifespan_app(events)

        async def blocks_the_loop(scope, receive, send):
            if scope["type"] == "http":
                entered.set()
                release.wait(10)  # synchronous: nothing else runs on the loop meanwhile
                await respond(send, b"late")
            else:
                await lifespan(scope, receive, send)

        layer = asgi.Layer(blocks_the_loop, name="asgi_blocks_the_loop", stop_timeout=0.2)
        layer.setUp()
        thread = layer["httpd_thread"]

        def fetch():
            with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=10) as client:
                client.get(layer["http_url"])

        client = threading.Thread(target=fetch)
        client.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(client.join, 10)
        self.addCleanup(release.set)  # first: cleanups run last added first
        self.assertTrue(entered.wait(5))
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        message = str(caught.exception)
        self.assertIn(
            "the server's event loop did not stop within the layer's stop_timeout (0.2 seconds):"
            " synchronous code of the application holds it", message)
        self.assertIn("its lifespan shutdown has not run", message)
        self.assertIn("in blocks_the_loop\n    release.wait(10)", message)  # where the loop's thread is
        self.assertEqual(events, ["lifespan.startup"])
        release.set()
        thread.join(10)
        self.assertFalse(thread.is_alive())

    def test_no_thread_descriptor_or_unclosed_resource_is_left(self):
        set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="asgi_ca_first", tls=True))  # the CA exists
        threads, descriptors = thread_names(), open_descriptors()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for tls in (False, True):
                layer = asgi.Layer(lifespan_app([]), name=f"asgi_leaks_{tls}", tls=tls)
                layer.setUp()
                context = layer.get("ssl_context")
                with httpx.Client(timeout=5, verify=context or True) as client:
                    client.get(layer["http_url"])
                    websocket = ws_connect(layer["ws_url"], open_timeout=5, ssl=context).__enter__()
                    websocket.send("x")
                    websocket.recv(timeout=5)
                    layer.tearDown()  # with both clients still connected
                    websocket.close()
                # A client that is still shaking hands when the server stops.
                layer.setUp()
                half_open = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
                time.sleep(0.05)
                layer.tearDown()
                half_open.close()
            gc.collect()
        self.assertEqual([str(warning.message) for warning in caught], [])
        self.assertEqual(thread_names(), threads)
        self.assertEqual(open_descriptors(), descriptors)

    def test_a_tls_client_that_has_not_closed_its_ended_connection_leaves_nothing_unclosed(self):
        """The server ended the connection (an answer with Connection:
        close, a WebSocket it closed as it stops) and waits for the client's
        TLS close_notify when the layer is torn down. uvicorn closed such a
        connection a second time, after which asyncio's TLS transport no
        longer ends it (Python 3.11 and later): it was collected unclosed,
        a ResourceWarning, whenever the client was slow to close."""
        for kind in ("http", "websocket"):
            with self.subTest(kind=kind), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                layer = asgi.Layer(lifespan_app([]), name=f"asgi_tls_unclosed_{kind}", tls=True)
                layer.setUp()
                self.addCleanup(layer.tearDown)
                raw = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
                with layer["ssl_context"].wrap_socket(raw, server_hostname=layer["http_host"]) as client:
                    if kind == "http":
                        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    else:
                        client.sendall(
                            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        )
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += client.recv(4096)
                    self.assertRegex(head, rb"^HTTP/1.1 (200|101) ")
                    layer.tearDown()  # the client has read its answer, and not closed
                gc.collect()
            self.assertEqual([str(warning.message) for warning in caught], [])

    def test_one_layer_survives_many_cycles(self):
        events: list[str] = []
        layer = asgi.Layer(lifespan_app(events), name="asgi_cycles")
        for _ in range(3):
            layer.setUp()
            try:
                self.assertEqual(get_json(layer["http_url"])["path"], "/")
            finally:
                layer.tearDown()
        self.assertEqual(events.count("lifespan.startup"), 3)
        self.assertEqual(events.count("lifespan.shutdown"), 3)


ASGI_TLS_LAYER = asgi.Layer(lifespan_app([]), name="ASGI_TLS_LAYER", tls=True)


class TLSTests(unittest.TestCase):
    layer = ASGI_TLS_LAYER

    def test_publishes_https_and_wss_urls_and_the_ca(self):
        port = self.layer["http_port"]
        self.assertEqual(self.layer["http_url"], f"https://127.0.0.1:{port}/")
        self.assertEqual(self.layer["ws_url"], f"wss://127.0.0.1:{port}/")
        self.assertTrue(os.path.exists(self.layer["ca_bundle"]))
        self.assertIsInstance(self.layer["httpd"], asgi.UvicornServer)

    def test_https_with_the_real_client_and_scheme(self):
        with httpx.Client(verify=self.layer["ssl_context"], timeout=5) as client:
            response = client.get(self.layer["http_url"] + "secure")
            answer = response.json()
            # the connection's local port, as httpx's pool holds it
            [connection] = client._transport._pool.connections
            client_port = connection._connection._network_stream.get_extra_info("socket").getsockname()[1]
        self.assertEqual(answer["scheme"], "https")
        self.assertEqual(answer["client"], ["127.0.0.1", client_port])
        self.assertEqual(answer["path"], "/secure")

    def test_urllib_with_ssl_context(self):
        self.assertEqual(get_json(self.layer["http_url"], context=self.layer["ssl_context"])["scheme"], "https")

    def test_verification_fails_without_the_ca(self):
        import ssl

        with self.assertRaises(urllib.error.URLError) as caught:
            get_json(self.layer["http_url"], context=ssl.create_default_context())
        self.assertIsInstance(caught.exception.reason, ssl.SSLCertVerificationError)

    def test_a_client_leaving_with_requests_pipelined_is_no_error(self):
        for protocol in ("httptools", "h11"):
            layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name=f"asgi_tls_leaving_{protocol}",
                                                    http_protocol=protocol, tls=True))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                for _ in range(3):
                    plain = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
                    with layer["ssl_context"].wrap_socket(plain, server_hostname=layer["http_host"]) as sock:
                        sock.sendall(3 * b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")  # the first answered after a while
                self.assertTrue(layer["httpd"].wait_quiet(10))
                gc.collect()
            self.assertEqual(layer.server_errors.take(), [], protocol)
            # Python 3.10's TLS transport, never closed, warned as it was collected.
            self.assertEqual([str(warning.message) for warning in caught], [], protocol)

    def test_over_tls_the_end_of_the_client_side_ends_the_connection(self):
        # asyncio's TLS ends it anyway, and warns if the protocol asks to keep it.
        layer = self.layer
        plain = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        with layer["ssl_context"].wrap_socket(plain, server_hostname=layer["http_host"]) as sock:
            sock.sendall(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")  # answered after a while
            server = layer["httpd"]
            deadline = time.monotonic() + 5
            while not [each for each in list(server.transports) if getattr(each.get_protocol(), "cycle", None)]:
                self.assertLess(time.monotonic(), deadline, "the request was never read")
                time.sleep(0.01)
            [transport] = [each for each in list(server.transports) if each.get_protocol().cycle]

            async def end_of_client_side():
                return transport.get_protocol().eof_received()

            answer = asyncio.run_coroutine_threadsafe(end_of_client_side(), server.loop).result(5)
        self.assertIsNone(answer)
        self.assertTrue(server.wait_quiet(5))

    def test_wss_echo_with_wss_scheme(self):
        seen = []

        async def scheme_of_websocket(scope, receive, send):
            if scope["type"] == "websocket":
                seen.append((scope["scheme"], scope["client"]))
                await websocket_echo(receive, send)

        layer = set_up_by_hand(self, asgi.Layer(scheme_of_websocket, name="asgi_wss", tls=True))
        with ws_connect(layer["ws_url"], ssl=layer["ssl_context"], open_timeout=5) as websocket:
            websocket.send("secret")
            self.assertEqual(websocket.recv(timeout=5), "echo: secret")
            local = websocket.socket.getsockname()
        self.assertEqual(seen, [("wss", ("127.0.0.1", local[1]))])

    def test_plain_http_to_the_tls_port_does_not_hurt_the_server(self):
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                plain.recv(100)
            except ConnectionResetError:
                pass
        self.assertEqual(get_json(self.layer["http_url"], context=self.layer["ssl_context"])["path"], "/")


class AddressTests(unittest.TestCase):

    def setUp(self):
        without_host_variables(self)

    def test_ipv6_loopback(self):
        try:
            socket.socket(socket.AF_INET6).close()
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("this machine has no ::1")
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="asgi_ipv6", host="::1"))
        port = layer["http_port"]
        self.assertEqual(layer["http_url"], f"http://[::1]:{port}/")
        self.assertEqual(layer["ws_url"], f"ws://[::1]:{port}/")
        self.assertEqual(get_json(layer["http_url"])["client"][0], "::1")
        with ws_connect(layer["ws_url"], open_timeout=5) as websocket:
            websocket.send("six")
            self.assertEqual(websocket.recv(timeout=5), "echo: six")

    def test_every_address_of_a_name(self):
        addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="asgi_localhost", host="localhost"))
        self.assertEqual({sock.getsockname()[0] for sock in layer["httpd"].sockets}, addresses)
        for address in addresses:
            host = f"[{address}]" if ":" in address else address
            self.assertEqual(get_json(f"http://{host}:{layer['http_port']}/")["client"][0], address)


class NoDelayTests(unittest.TestCase):
    """Every accepted connection sends small writes at once."""

    def serve_on(self, sock: socket.socket) -> asgi.UvicornServer:
        server = asgi.UvicornServer(
            app_without_lifespan, [sock], errors=ErrorLog("nodelay"), requests=RequestLog(),
            thread_name="serverlayer nodelay test",
        )
        running = ServerThread(server, name="serverlayer nodelay test")
        running.start(owner="nodelay test")
        self.addCleanup(running.stop, timeout=1.0)
        self.addCleanup(server.errors.check)
        return server

    def protocol_zero_socket(self) -> socket.socket:
        """A listening socket as uvicorn's own ``bind_socket`` makes it, with
        ``proto`` 0: asyncio leaves Nagle on for what it accepts."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.assertEqual(sock.proto, 0)
        return sock

    def test_set_on_the_server_side_of_each_connection(self):
        for sock in (self.protocol_zero_socket(), socket.create_server(("127.0.0.1", 0))):
            with self.subTest(proto=sock.proto):
                server = self.serve_on(sock)
                with httpx.Client(timeout=5) as client:
                    client.get(f"http://127.0.0.1:{server.socket.getsockname()[1]}/")
                    [transport] = server.transports
                    accepted = transport.get_extra_info("socket")
                    self.assertEqual(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)


class WebSocketReadingTests(unittest.TestCase):
    """A WebSocket's connection goes on reading while its application keeps
    up, and stops once it falls behind by ``UNREAD_MESSAGES`` messages."""

    def test_an_echo_conversation_never_pauses_reading(self):
        layer = set_up_by_hand(self, asgi.Layer(app_without_lifespan, name="ws_reading"))
        with ws_connect(layer["ws_url"], open_timeout=5) as websocket:
            websocket.send("first")
            self.assertEqual(websocket.recv(timeout=5), "echo: first")
            [transport] = layer["httpd"].transports
            with mock.patch.object(transport, "pause_reading", wraps=transport.pause_reading) as pause_reading:
                for number in range(50):
                    websocket.send(str(number))
                    self.assertEqual(websocket.recv(timeout=5), f"echo: {number}")
            self.assertEqual(pause_reading.call_count, 0)

    def test_a_client_faster_than_its_application_is_held_back_and_loses_nothing(self):
        go_on = asyncio.Event()

        async def app(scope, receive, send):
            if scope["type"] != "websocket":
                return
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await go_on.wait()  # falls behind
            while (message := await receive())["type"] == "websocket.receive":
                await send({"type": "websocket.send", "text": str(len(message["bytes"]))})

        layer = set_up_by_hand(self, asgi.Layer(app, name="ws_held_back"))
        server = layer["httpd"]

        def let_it_go_on() -> None:
            server.loop.call_soon_threadsafe(go_on.set)

        sizes = [100 + number for number in range(asgi.UNREAD_MESSAGES + 4)]
        with ws_connect(layer["ws_url"], open_timeout=5) as websocket, contextlib.ExitStack() as failing:
            failing.callback(let_it_go_on)  # before the client's closing handshake, which the application answers
            until(lambda: server.websocket_protocols)
            [protocol] = server.websocket_protocols.values()
            for number, size in enumerate(sizes[:asgi.UNREAD_MESSAGES]):
                self.assertTrue(protocol.own_transport.is_reading(), f"paused at {number} unread messages")
                websocket.send(b"x" * size)
                self.assertTrue(until(lambda count=number + 1: protocol.queue.qsize() == count))
            self.assertFalse(protocol.own_transport.is_reading())
            for size in sizes[asgi.UNREAD_MESSAGES:]:  # wait in the kernel's buffers
                websocket.send(b"x" * size)
            let_it_go_on()
            self.assertEqual([int(websocket.recv(timeout=5)) for _ in sizes], sizes)


class LeavingClientTests(unittest.TestCase):
    """What asyncio's transports meet with clients stays out of the test
    run's output: a client that leaves while the application still sends
    made asyncio print "socket.send() raised exception." to stderr."""

    def test_a_client_leaving_mid_stream_prints_nothing(self):
        async def endless(scope, receive, send):
            if scope["type"] != "http":
                raise RuntimeError("no lifespan here")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(200):
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        layer = set_up_by_hand(self, asgi.Layer(endless, name="asgi_leaving_clients"))
        printed = io.StringIO()
        # As under python -m unittest, with no handler at all: zope.testrunner
        # gives the root logger one, which keeps Python's last resort quiet.
        with redirect_stderr(printed), mock.patch.object(logging.getLogger(), "handlers", []):
            for _ in range(5):
                with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    self.assertTrue(sock.recv(1000).startswith(b"HTTP/1.1 200 OK"))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # reset
            self.assertTrue(layer["httpd"].wait_quiet(10))
        self.assertEqual(printed.getvalue(), "")
