"""A small Starlette application: a message board with a live feed.

- The lifespan opens the board's SQLite database (the file given to
  ``make_app``), creating its table, and closes it on shutdown.
- ``GET /messages`` returns the messages as JSON, oldest first.
- ``POST /messages`` takes ``{"author": ..., "text": ...}``, stores the
  message and answers ``201 Created`` with it, id included; a message
  without both is a ``400``.
- ``/live`` is a WebSocket: it first sends ``{"history": [...]}``, the
  messages so far, then every new message as it is posted, from HTTP or
  from any WebSocket client. A client posts by sending the same JSON as
  ``POST /messages`` takes.

The database calls block the event loop for a moment; for a local SQLite
file that is fine, and it keeps the example short.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

SCHEMA = "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, author TEXT NOT NULL, text TEXT NOT NULL)"


class InvalidMessage(ValueError):
    """What a client posted is not a message."""


class Board:
    """The messages in the database, and the WebSocket clients to tell about new ones."""

    def __init__(self, database: sqlite3.Connection) -> None:
        self.database = database
        self.listeners: set[WebSocket] = set()

    def messages(self) -> list[dict[str, Any]]:
        rows = self.database.execute("SELECT id, author, text FROM messages ORDER BY id")
        return [{"id": number, "author": author, "text": text} for number, author, text in rows]

    async def post(self, data: Any) -> dict[str, Any]:
        """Store the message ``data`` and send it to every listener."""
        author, text = (data.get(name) if isinstance(data, dict) else None for name in ("author", "text"))
        if not (isinstance(author, str) and author.strip() and isinstance(text, str) and text.strip()):
            raise InvalidMessage("a message needs an author and a text")
        author, text = author.strip(), text.strip()
        with self.database:  # commits
            cursor = self.database.execute("INSERT INTO messages (author, text) VALUES (?, ?)", (author, text))
        message = {"id": cursor.lastrowid, "author": author, "text": text}
        for listener in list(self.listeners):
            with contextlib.suppress(Exception):  # a listener that went away meanwhile
                await listener.send_json(message)
        return message


async def list_messages(request: Request) -> JSONResponse:
    board: Board = request.state.board
    return JSONResponse(board.messages())


async def post_message(request: Request) -> JSONResponse:
    board: Board = request.state.board
    try:
        message = await board.post(await request.json())
    except ValueError as error:  # InvalidMessage, or json's JSONDecodeError
        return JSONResponse({"error": str(error) if isinstance(error, InvalidMessage) else "not JSON"}, 400)
    return JSONResponse(message, 201)


async def live(websocket: WebSocket) -> None:
    board: Board = websocket.state.board
    await websocket.accept()
    # Listening before the history goes out: a client that has the history
    # gets every message posted after it.
    board.listeners.add(websocket)
    try:
        await websocket.send_json({"history": board.messages()})
        while True:
            try:
                await board.post(await websocket.receive_json())
            except ValueError as error:  # InvalidMessage, or json's JSONDecodeError
                await websocket.send_json({"error": str(error) if isinstance(error, InvalidMessage) else "not JSON"})
    except WebSocketDisconnect:
        pass
    finally:
        board.listeners.discard(websocket)


def make_app(database_path: str) -> Starlette:
    """The board, keeping its messages in the SQLite file ``database_path``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        database = sqlite3.connect(database_path)
        try:
            database.execute(SCHEMA)
            yield {"board": Board(database)}  # request.state.board, websocket.state.board
        finally:
            database.close()

    return Starlette(
        routes=[
            Route("/messages", list_messages, methods=["GET"]),
            Route("/messages", post_message, methods=["POST"]),
            WebSocketRoute("/live", live),
        ],
        lifespan=lifespan,
    )


if __name__ == "__main__":  # python -m board.app, then http://127.0.0.1:8000/messages
    import os
    import tempfile

    import uvicorn

    uvicorn.run(make_app(os.path.join(tempfile.gettempdir(), "board.sqlite")), host="127.0.0.1", port=8000)
