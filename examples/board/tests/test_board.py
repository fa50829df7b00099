"""The message board served by ``BOARD_HTTP``, over real HTTP and WebSocket.

httpx talks HTTP to it, websockets' synchronous client the WebSocket
protocol; nothing here calls the application directly. Several tests
assert the exact messages and their ids: they pass in any order only
because ``BOARD_APP`` empties the board before each test.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import unittest
from typing import Any

import httpx
from websockets.sync.client import connect

from board.testing import BOARD_HTTP

#: Seconds a request or a WebSocket message may take before the test fails
#: instead of hanging.
TIMEOUT = 10


class BoardTests(unittest.TestCase):
    layer = BOARD_HTTP

    def setUp(self) -> None:
        self.http = httpx.Client(base_url=self.layer["http_url"], timeout=TIMEOUT)
        self.addCleanup(self.http.close)

    def post(self, author: str, text: str) -> dict[str, Any]:
        response = self.http.post("/messages", json={"author": author, "text": text})
        self.assertEqual(response.status_code, 201, response.text)
        message: dict[str, Any] = response.json()
        return message

    def receive(self, websocket: Any) -> Any:
        """The next JSON message from ``websocket``; fails after TIMEOUT."""
        return json.loads(websocket.recv(timeout=TIMEOUT))

    def test_board_starts_empty(self) -> None:
        response = self.http.get("/messages")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertEqual(response.json(), [])

    def test_posted_message_is_listed_and_stored_in_the_database(self) -> None:
        message = self.post("Ann", "  Hello, board! Grüße ☕ ")
        self.assertEqual(message, {"id": 1, "author": "Ann", "text": "Hello, board! Grüße ☕"})
        self.assertEqual(self.http.get("/messages").json(), [message])
        # The lifespan opened the database the layer gave the application.
        with contextlib.closing(sqlite3.connect(self.layer["database"])) as database:
            rows = database.execute("SELECT id, author, text FROM messages").fetchall()
        self.assertEqual(rows, [(1, "Ann", "Hello, board! Grüße ☕")])

    def test_a_message_without_text_or_in_no_json_is_refused(self) -> None:
        response = self.http.post("/messages", json={"author": "Ann"})
        self.assertEqual(response.status_code, 400)
        self.assertEqual(response.json(), {"error": "a message needs an author and a text"})
        response = self.http.post("/messages", content=b"{not json", headers={"Content-Type": "application/json"})
        self.assertEqual(response.status_code, 400)
        self.assertEqual(response.json(), {"error": "not JSON"})
        self.assertEqual(self.http.get("/messages").json(), [])

    def test_live_feed_sends_the_history_then_each_new_message(self) -> None:
        first = self.post("Ann", "first")
        with connect(self.layer["ws_url"] + "live", open_timeout=TIMEOUT, ping_interval=None) as websocket:
            self.assertEqual(self.receive(websocket), {"history": [first]})
            second = self.post("Bob", "second")
            self.assertEqual(self.receive(websocket), second)
        self.assertEqual(second["id"], 2)

        # The layer recorded the WebSocket handshake among the requests.
        [handshake] = [request for request in self.layer["http_requests"] if request.path == "/live"]
        self.assertEqual(str(handshake), "GET /live")
        self.assertEqual(handshake.headers["Upgrade"], "websocket")

    def test_message_sent_over_a_websocket_reaches_every_client_and_the_list(self) -> None:
        with connect(self.layer["ws_url"] + "live", open_timeout=TIMEOUT, ping_interval=None) as ann, \
                connect(self.layer["ws_url"] + "live", open_timeout=TIMEOUT, ping_interval=None) as bob:
            self.assertEqual(self.receive(ann), {"history": []})
            self.assertEqual(self.receive(bob), {"history": []})
            ann.send(json.dumps({"author": "Ann", "text": "hi Bob"}))
            expected = {"id": 1, "author": "Ann", "text": "hi Bob"}
            self.assertEqual(self.receive(bob), expected)
            self.assertEqual(self.receive(ann), expected)  # the sender sees it too
        self.assertEqual(self.http.get("/messages").json(), [expected])

    def test_a_websocket_client_is_told_what_was_wrong_and_stays_connected(self) -> None:
        with connect(self.layer["ws_url"] + "live", open_timeout=TIMEOUT, ping_interval=None) as websocket:
            self.receive(websocket)  # the history
            websocket.send(json.dumps({"text": "who am I?"}))
            self.assertEqual(self.receive(websocket), {"error": "a message needs an author and a text"})
            websocket.send("{not json")
            self.assertEqual(self.receive(websocket), {"error": "not JSON"})
            websocket.send(json.dumps({"author": "Ann", "text": "now right"}))
            self.assertEqual(self.receive(websocket), {"id": 1, "author": "Ann", "text": "now right"})
