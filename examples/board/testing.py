"""The test layers of the message board.

Two layers, stacked:

``BOARD_APP`` creates the application once, in ``setUp``, with its database
in a temporary directory, and publishes it as the ``asgi_app`` resource and
the database's path as ``database``. Its ``testSetUp`` empties the board
through a connection of its own, so every test starts with no messages.

``BOARD_HTTP`` is a ``serverlayer.asgi.Layer`` based on ``BOARD_APP``. It
serves the ``asgi_app`` resource with uvicorn and runs the application's
lifespan: the startup, which opens the database, in its ``setUp``; the
shutdown, which closes it, in its ``tearDown``. It publishes ``http_url``
for HTTP clients and ``ws_url`` for WebSocket clients, and records every
request and WebSocket handshake in ``http_requests``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile

import plone.testing

import serverlayer.asgi
from board.app import make_app


class BoardAppLayer(plone.testing.Layer):
    """Provides the board as ``asgi_app``, its database emptied before each test."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="board-")
        self["database"] = os.path.join(self.directory, "board.sqlite")
        self["asgi_app"] = make_app(self["database"])

    def testSetUp(self) -> None:
        # The application's lifespan created the table when BOARD_HTTP set up.
        with contextlib.closing(sqlite3.connect(self["database"])) as database, database:
            database.execute("DELETE FROM messages")

    def tearDown(self) -> None:
        del self["asgi_app"]
        del self["database"]
        shutil.rmtree(self.directory)


BOARD_APP = BoardAppLayer(name="BOARD_APP")
BOARD_HTTP = serverlayer.asgi.Layer(bases=(BOARD_APP,), name="BOARD_HTTP")
