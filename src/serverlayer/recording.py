"""Every HTTP layer records the requests of the current test.

The ``http_requests`` resource lists them in arrival order: method, path
and query as the client sent them, headers and body bytes. Recording reads
the body before the application does and hands it on unchanged, so the
application sees exactly what it would have seen.
"""

from __future__ import annotations

import dataclasses
import email.message
import functools
import io
import json
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from serverlayer.arrivals import Arrivals, Unread
from serverlayer.errors import RequestTimeoutError


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it.

    ``headers`` may be given as ``(name, value)`` pairs: they become an
    ``email.message.Message`` (case-insensitive) when a test first reads
    them, not while the server is answering.
    """

    method: str
    #: The path as sent, percent-encoding and all, without the query.
    path: str
    #: The query string as sent, without the ``?``.
    query: str
    raw_headers: email.message.Message | tuple[tuple[str, str], ...]
    body: bytes

    @functools.cached_property
    def headers(self) -> email.message.Message:
        """The headers; ``request.headers['content-type']`` ignores case."""
        if isinstance(self.raw_headers, email.message.Message):
            return self.raw_headers
        headers = email.message.Message()
        for name, value in self.raw_headers:
            headers[name] = value
        return headers

    @property
    def query_params(self) -> dict[str, list[str]]:
        """The query string, decoded: ``{'q': ['tea']}``."""
        return urllib.parse.parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)

    def summary(self) -> str:
        target = self.path + (f"?{self.query}" if self.query else "")
        size = f" ({len(self.body)} bytes)" if self.body else ""
        return f"{self.method} {target}{size}"

    def __str__(self) -> str:
        return self.summary()


class RequestLog(Arrivals[RecordedRequest]):
    """Requests received during the current test, in arrival order."""

    noun = "request"
    timeout_error = RequestTimeoutError


def split_target(target: str) -> tuple[str, str]:
    """Path and query of a request target (origin or absolute form)."""
    if not target.startswith("/"):  # absolute form: http://host/path?query
        parts = urllib.parse.urlsplit(target)
        if parts.scheme:
            return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    return path, query


#: WSGI variables that hold the connection's objects, which the request
#: log must not keep alive.
CONNECTION_VARIABLES = ("wsgi.input", "wsgi.errors", "wsgi.file_wrapper", "waitress.client_disconnected")


class _UnreadEnviron(Unread[RecordedRequest]):
    """A WSGI request as its CGI variables, until a test reads it."""

    __slots__ = ("variables", "body")

    def __init__(self, variables: dict[str, Any], body: bytes) -> None:
        self.variables = variables
        self.body = body

    def parse(self) -> RecordedRequest:
        variables = self.variables
        headers = tuple(
            (key.removeprefix("HTTP_").replace("_", "-").title(), value)
            for key, value in variables.items()
            if key.startswith("HTTP_") or (key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value)
        )
        path, query = split_target(variables.get("REQUEST_URI") or variables.get("PATH_INFO", "/"))
        return RecordedRequest(variables["REQUEST_METHOD"], path, query, headers, self.body)


class RecordingMiddleware:
    """Records each request, then calls the application with the same input."""

    def __init__(self, app: Callable[..., Iterable[bytes]], log: RequestLog) -> None:
        self.app = app
        self.log = log

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH") or ""
        body = b""
        if length.isdigit():
            body = environ["wsgi.input"].read(int(length))
            environ["wsgi.input"] = io.BytesIO(body)
        variables = dict(environ)
        for key in CONNECTION_VARIABLES:
            variables.pop(key, None)
        self.log.append(_UnreadEnviron(variables, body))
        return self.app(environ, start_response)


class _BodyFirst:
    """A request's body, already read, followed by the rest of the connection.

    It reads from the connection only as much as the handler asks for, so
    nothing of a following request is taken in advance.
    """

    def __init__(self, body: bytes, rest: Any) -> None:
        self._body = io.BytesIO(body)
        self.rest = rest

    def read(self, size: int | None = -1) -> bytes:
        data = self._body.read(size)
        if size is None or size < 0:
            return data + self.rest.read()
        if len(data) < size:
            data += self.rest.read(size - len(data))
        return data

    def read1(self, size: int = -1) -> bytes:
        return self._body.read1(size) or self.rest.read1(size)

    def readline(self, size: int | None = -1) -> bytes:
        line = self._body.readline(size)
        if line.endswith(b"\n") or (size is not None and 0 <= size <= len(line)):
            return line
        return line + self.rest.readline(-1 if size is None or size < 0 else size - len(line))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rest, name)


def recording_handler(handler: type[Any], log: RequestLog) -> type[Any]:
    """A subclass of a ``BaseHTTPRequestHandler`` class that records requests.

    The handler still reads the body it expects from ``rfile``: the
    recorded bytes come first, then the rest of the connection.
    """

    def parse_request(self: Any) -> bool:
        if isinstance(self.rfile, _BodyFirst):  # the previous request's
            self.rfile = self.rfile.rest
        if not handler.parse_request(self):
            return False
        length = self.headers.get("Content-Length", "")
        body = self.rfile.read(int(length)) if length.isdigit() else b""
        path, query = split_target(self.path)
        self.recorded_request = RecordedRequest(self.command, path, query, self.headers, body)
        log.append(self.recorded_request)
        if body:
            self.rfile = _BodyFirst(body, self.rfile)
        return True

    return type(handler.__name__, (handler,), {"parse_request": parse_request, "__module__": handler.__module__})
