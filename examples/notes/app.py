"""A small WSGI application that keeps notes in memory.

It uses the standard library only, so that the example shows serverlayer
and nothing else:

- ``GET /`` shows the notes and a form to add one;
- ``POST /notes`` (form field ``text``) stores a note and answers
  ``303 See Other`` to ``/``, so that reloading the page in a browser does
  not post the note again;
- ``GET /notes.json`` returns the notes as a JSON list of strings.

Every other path is a 404; a known path with the wrong method is a 405.
"""

from __future__ import annotations

import html
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

#: Longest request body we read; notes are short.
MAX_BODY = 64 * 1024

PAGE = """\
<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>Notes</title></head>
<body>
<h1>Notes</h1>
{notes}
<form method="post" action="/notes">
<input name="text" aria-label="New note">
<button type="submit">Add note</button>
</form>
</body>
</html>
"""


class NotesApp:
    """The application: a WSGI callable holding its notes.

    waitress calls it from several threads at once, so the list of notes is
    guarded by a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notes: list[str] = []

    @property
    def notes(self) -> list[str]:
        """A copy of the notes, oldest first."""
        with self._lock:
            return list(self._notes)

    def add(self, text: str) -> None:
        with self._lock:
            self._notes.append(text)

    def reset(self) -> None:
        """Forget every note; the test layer calls this before each test."""
        with self._lock:
            self._notes.clear()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        routes: dict[str, dict[str, Callable[[Environ, StartResponse], Iterable[bytes]]]] = {
            "/": {"GET": self.page},
            "/notes": {"POST": self.post_note},
            "/notes.json": {"GET": self.notes_json},
        }
        if path not in routes:
            return respond(start_response, "404 Not Found", "text/plain", b"Not found\n")
        handler = routes[path].get(method)
        if handler is None:
            allow = ", ".join(routes[path])
            return respond(
                start_response,
                "405 Method Not Allowed",
                "text/plain",
                b"Method not allowed\n",
                [("Allow", allow)],
            )
        return handler(environ, start_response)

    def page(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        notes = self.notes
        if notes:
            items = "".join(f"<li>{html.escape(note)}</li>\n" for note in notes)
            listing = f'<ul id="notes">\n{items}</ul>'
        else:
            listing = "<p>No notes yet.</p>"
        body = PAGE.format(notes=listing).encode("utf-8")
        return respond(start_response, "200 OK", "text/html; charset=utf-8", body)

    def post_note(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return respond(start_response, "400 Bad Request", "text/plain", b"Bad length\n")
        body = environ["wsgi.input"].read(length).decode("utf-8", "replace")
        text = urllib.parse.parse_qs(body).get("text", [""])[0].strip()
        if not text:
            return respond(start_response, "400 Bad Request", "text/plain", b"Empty note\n")
        self.add(text)
        return respond(
            start_response, "303 See Other", "text/plain", b"Saved\n", [("Location", "/")]
        )

    def notes_json(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        body = json.dumps(self.notes).encode("utf-8")
        return respond(start_response, "200 OK", "application/json", body)


def respond(
    start_response: StartResponse,
    status: str,
    content_type: str,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """Start a response with a known length and return its body.

    Sending ``Content-Length`` lets the server keep the connection open for
    the client's next request.
    """
    start_response(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])],
    )
    return [body]


def make_app() -> NotesApp:
    """A new application with an empty store of its own."""
    return NotesApp()


if __name__ == "__main__":  # try it in a browser: python -m notes.app
    from wsgiref.simple_server import make_server

    with make_server("127.0.0.1", 8080, make_app()) as server:
        print("Serving on http://127.0.0.1:8080/; Ctrl-C stops.")
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C: stop without a traceback, as uvicorn does
            pass
