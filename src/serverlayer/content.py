"""Stand in for a remote HTTP service: the test decides what it answers and
checks what it was sent.

    >>> from serverlayer import content
    >>> PAYMENTS = content.Layer(name='PAYMENTS')

The layer publishes the usual ``http_*`` resources and ``http_content``, the
object a test programs:

- ``serve_content(content, code=200, headers=None)``, or the attributes
  ``code``, ``content`` and ``headers``: what every request gets that
  nothing else answers (404 until set), as in pytest-localserver;
- ``route(path, method=None, query=None, headers=None)`` then
  ``.respond(...)``, ``.respond_json(...)``, ``.respond_sequence(...)`` or
  ``.respond_with(function)``: answers for matching requests;
- ``handler``: a function that answers anything else;
- ``expect(...)``: like ``route``, and the test fails when it ends unless
  the expected requests arrived; once a test expects anything, a request
  that only the default answer (``serve_content``, or 404) met fails it too.

Everything is back to the defaults before each test.
"""

from __future__ import annotations

import dataclasses
import json
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from serverlayer import custom
from serverlayer.errors import ConfigurationError, ExpectationError
from serverlayer.recording import RecordedRequest

Headers = Mapping[str, str] | Sequence[tuple[str, str]]

@dataclasses.dataclass(frozen=True)
class Response:
    """An answer, including the ways a real service fails.

    ``delay`` waits that many seconds before answering (the client closing
    its connection or ``tearDown`` cuts it short); ``reset`` drops the
    connection with a TCP reset instead of answering; ``truncate`` sends
    the headers for the whole body but only that many bytes of it, then
    closes the connection. A 1xx, 204 or 304 response has no body.
    """

    status: int = 200
    body: bytes | str = b""
    headers: Headers = ()
    chunked: bool = False
    delay: float = 0.0
    reset: bool = False
    truncate: int | None = None

    def __post_init__(self) -> None:
        _check_no_body(self.status, self.body)
        if not self.delay >= 0:  # NaN too
            raise ConfigurationError(
                f"delay={self.delay!r}: a response waits a number of seconds, 0 or more,"
                " before it is sent; leave delay out to answer at once."
            )

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Headers = ()) -> Response:
        """A JSON body with its Content-Type."""
        return cls(status, json.dumps(data), [("Content-Type", "application/json"), *_header_items(headers)])

    def body_bytes(self) -> bytes:
        return self.body.encode("utf-8") if isinstance(self.body, str) else self.body


Answer = Response | Callable[[RecordedRequest], Response]


def _has_no_body(status: int) -> bool:
    """Whether HTTP ends a response of ``status`` after its headers (RFC 9110 section 6.4.1)."""
    return status < 200 or status in (204, 304)


def _check_no_body(status: int, body: bytes | str) -> None:
    """Refuse a body the wire would drop: the test expecting it has a bug."""
    if body and _has_no_body(status):
        raise ConfigurationError(
            f"A {status} response has no body, yet this one was given {body[:30]!r}:"
            " HTTP ends it after the headers, so a client would never see the body"
            " (RFC 9110 section 6.4.1). Either leave out the body, or answer with a"
            " status that has one, such as 200."
        )


def _header_items(headers: Headers | None) -> list[tuple[str, str]]:
    if not headers:
        return []
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


def _as_response(answer: Answer, request: RecordedRequest) -> Response:
    response = answer(request) if callable(answer) else answer
    if not isinstance(response, Response):
        raise TypeError(f"an answer function must return content.Response, not {response!r}")
    return response


class Route:
    """Requests a route matches, and what they get."""

    def __init__(
        self,
        path: str | re.Pattern[str],
        method: str | None = None,
        *,
        query: Mapping[str, str | Sequence[str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(path, (str, re.Pattern)):
            raise ConfigurationError(f"path {path!r} must be a string or a compiled regular expression.")
        self.path = path
        self.method = method.upper() if method else None
        self.query = {key: [value] if isinstance(value, str) else list(value) for key, value in (query or {}).items()}
        self.headers = dict(headers or {})
        self._answers: list[Answer] = [Response()]
        self._lock = threading.Lock()

    # What the route answers.

    def respond(
        self,
        body: bytes | str = b"",
        status: int = 200,
        headers: Headers | None = None,
        **faults: Any,
    ) -> Route:
        """Answer with this body and status (and ``chunked``, ``delay``,
        ``reset`` or ``truncate``, see ``Response``)."""
        return self.respond_sequence(Response(status, body, _header_items(headers), **faults))

    def respond_json(self, data: Any, status: int = 200, headers: Headers | None = None) -> Route:
        """Answer with ``data`` as JSON."""
        return self.respond_sequence(Response.json(data, status, headers or ()))

    def respond_sequence(self, *answers: Answer) -> Route:
        """Answer each request with the next answer; the last one repeats.

        ``respond_sequence(Response(503), Response(200, "ok"))`` fails the
        first request and answers every later one.
        """
        if not answers:
            raise ConfigurationError("respond_sequence() needs at least one answer.")
        with self._lock:
            self._answers = list(answers)
        return self

    def respond_with(self, function: Callable[[RecordedRequest], Response]) -> Route:
        """Answer with what ``function(request)`` returns."""
        return self.respond_sequence(function)

    def next_answer(self) -> Answer:
        with self._lock:
            return self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]

    # Matching.

    def differences(self, request: RecordedRequest) -> list[str]:
        """How ``request`` differs from what the route matches; empty if it matches."""
        found = []
        if self.method and request.method != self.method:
            found.append(f"method is {request.method}, not {self.method}")
        if isinstance(self.path, re.Pattern):
            if not self.path.fullmatch(request.path):
                found.append(f"path {request.path} does not match {self.path.pattern!r}")
        elif request.path != self.path:
            found.append(f"path is {request.path}, not {self.path}")
        params = request.query_params
        for key, values in self.query.items():
            if params.get(key) != values:
                got = "missing" if key not in params else f"{params[key]}"
                found.append(f"query {key} is {got}, not {values}")
        for name, value in self.headers.items():
            if request.headers.get(name) != value:
                found.append(f"header {name} is {request.headers.get(name)!r}, not {value!r}")
        return found

    def matches(self, request: RecordedRequest) -> bool:
        return not self.differences(request)

    def describe(self) -> str:
        path = f"/{self.path.pattern}/" if isinstance(self.path, re.Pattern) else self.path
        text = f"{self.method or 'any method'} {path}"
        if self.query:
            pairs = [f"{key}={value}" for key, values in self.query.items() for value in values]
            text += " with query " + "&".join(pairs)
        if self.headers:
            text += " with headers " + ", ".join(f"{name}: {value}" for name, value in self.headers.items())
        return text


class Expectation(Route):
    """A route the test expects requests for: ``times`` exactly, or ``at_least``."""

    def __init__(self, *args: Any, times: int | None = 1, at_least: int | None = None,
                 ordered: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if at_least is not None:
            times = None
        if times is None and at_least is None:
            raise ConfigurationError("expect() needs times= or at_least=.")
        self.times = times
        self.at_least = at_least
        self.ordered = ordered
        self.count = 0

    @property
    def minimum(self) -> int:
        return self.at_least if self.at_least is not None else self.times or 0

    def wanted(self) -> str:
        if self.at_least is not None:
            return f"at least {self.at_least} time(s)"
        return "once" if self.times == 1 else f"{self.times} times"

    def problem(self) -> str | None:
        if self.at_least is not None and self.count >= self.at_least:
            return None
        if self.times is not None and self.count == self.times:
            return None
        return f"expected {self.describe()} {self.wanted()}, it was requested {self.count} time(s)"


class HTTPContent:
    """What the content layer's server answers, and what the test expects of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Back to the defaults: 404 for everything, no routes, no expectations."""
        with self._lock:
            self.code = 404
            self.content: bytes | str = b""
            self.headers: dict[str, str] = {}
            self.chunked = False
            self.handler: Callable[[RecordedRequest], Response | None] | None = None
            self.routes: list[Route] = []
            self.expectations: list[Expectation] = []
            self._unexpected: list[RecordedRequest] = []
            self._order_problems: list[str] = []
            self._requests: list[RecordedRequest] = []

    # Programming the answers.

    def serve_content(self, content: bytes | str, code: int = 200, headers: Mapping[str, str] | None = None,
                      chunked: bool = False) -> None:
        """Answer every request that nothing else answers with this."""
        _check_no_body(code, content)
        self.content, self.code, self.headers, self.chunked = content, code, dict(headers or {}), chunked

    def route(self, path: str | re.Pattern[str], method: str | None = None, *,
              query: Mapping[str, str | Sequence[str]] | None = None,
              headers: Mapping[str, str] | None = None) -> Route:
        """Answer requests that match; the first route declared wins."""
        route = Route(path, method, query=query, headers=headers)
        with self._lock:
            self.routes.append(route)
        return route

    def expect(self, path: str | re.Pattern[str], method: str | None = None, *,
               query: Mapping[str, str | Sequence[str]] | None = None,
               headers: Mapping[str, str] | None = None,
               times: int | None = 1, at_least: int | None = None, ordered: bool = False) -> Expectation:
        """Expect matching requests: ``times`` exactly (once unless said
        otherwise) or ``at_least``; ``ordered`` ones must first be met in
        the order they were declared. Answer them like a route."""
        expectation = Expectation(path, method, query=query, headers=headers,
                                  times=times, at_least=at_least, ordered=ordered)
        with self._lock:
            self.expectations.append(expectation)
        return expectation

    # Serving.

    def answer(self, request: RecordedRequest) -> Response:
        """The response to ``request``, noting which expectation it met."""
        with self._lock:
            self._requests.append(request)
            chosen = self._expectation_for(request) or next(
                (route for route in self.routes if route.matches(request)), None
            )
            handler = self.handler
        if chosen is not None:
            return _as_response(chosen.next_answer(), request)
        if handler is not None:
            response = handler(request)
            if response is not None:
                return _as_response(response, request)
        with self._lock:
            if self.expectations:
                self._unexpected.append(request)
        return Response(self.code, self.content, list(self.headers.items()), chunked=self.chunked)

    def _expectation_for(self, request: RecordedRequest) -> Expectation | None:
        """The first matching expectation still wanting requests, else the
        last matching one (which then counts one request too many)."""
        matching = [expectation for expectation in self.expectations if expectation.matches(request)]
        if not matching:
            return None
        expectation = next((e for e in matching if e.times is None or e.count < e.times), matching[-1])
        self._check_order(expectation, request)
        expectation.count += 1
        return expectation

    def _check_order(self, expectation: Expectation, request: RecordedRequest) -> None:
        if not expectation.ordered or expectation.count:
            return
        for earlier in self.expectations:
            if earlier is expectation:
                break
            if earlier.ordered and earlier.count < earlier.minimum:
                self._order_problems.append(
                    f"{request.summary()} arrived before {earlier.describe()} was met"
                )

    @property
    def requests(self) -> list[RecordedRequest]:
        """This server's requests of the current test.

        The same as its ``http_requests`` resource, which an HTTP layer
        stacked above (the application calling this service) shadows.
        """
        with self._lock:
            return list(self._requests)

    # Checking.

    def problems(self) -> list[str]:
        """Everything wrong with the requests so far, one line each."""
        with self._lock:
            found = []
            for expectation in self.expectations:
                problem = expectation.problem()
                if problem:
                    found.append(problem + _closest(expectation, self._requests))
            found.extend(f"out of order: {problem}" for problem in self._order_problems)
            found.extend(f"unexpected request: {request.summary()}" for request in self._unexpected)
            return found

    def check(self) -> None:
        """Fail now, with what went wrong, if anything did.

        Runs by itself when a test ends; call it to check mid-way.
        """
        found = self.problems()
        if found:
            raise ExpectationError(
                "The requests of this test did not meet its expectations:\n"
                + "\n".join(f"- {line}" for line in found)
            )


def _closest(expectation: Expectation, requests: Sequence[RecordedRequest], shown: int = 3) -> str:
    """The requests that came nearest to ``expectation``, fewest differences first."""
    differing = [(request, found) for request in requests if (found := expectation.differences(request))]
    if not differing:
        if not requests:
            return "; no requests arrived at all"
        # Every request matched it: too many, or none counted because they
        # went to an earlier expectation or came before this one was declared.
        return "" if expectation.count else "; the requests it matches came before it or met an earlier expectation"
    near = sorted(differing, key=lambda pair: len(pair[1]))[:shown]
    lines = [f"    {request.summary()}: {'; '.join(found)}" for request, found in near]
    return ".\n  Closest requests that arrived:\n" + "\n".join(lines)


class ContentHandler(custom.RequestHandler):
    """Answers every request as ``http_content`` says."""

    protocol_version = "HTTP/1.1"

    def __init__(self, *args: Any, content: HTTPContent, **kwargs: Any) -> None:
        self.content = content
        super().__init__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any method: GET, POST, PROPFIND ...
            return self._answer
        raise AttributeError(name)

    def _answer(self) -> None:
        request: RecordedRequest = self.recorded_request  # type: ignore[attr-defined]
        response = self.content.answer(request)
        if response.delay and self._abandoned_within(response.delay):
            self.close_connection = True
            return
        if response.reset:
            self.server.abort_connection(self.connection)  # type: ignore[attr-defined]
            self.close_connection = True
            return
        bodiless = _has_no_body(response.status)
        body = b"" if bodiless else response.body_bytes()
        chunked = response.chunked and not bodiless
        # HTTP/1.0 knows no chunks: closing the connection ends the body.
        until_close = chunked and self.request_version < "HTTP/1.1"
        headers = _header_items(response.headers)
        self.send_response(response.status)
        for name, value in headers:
            self.send_header(name, value)
        if until_close:
            self.send_header("Connection", "close")
        elif chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not bodiless and "content-length" not in {name.lower() for name, _ in headers}:
            self.send_header("Content-Length", str(len(body)))  # for HEAD too: what GET would get
        self.end_headers()
        if response.truncate is not None:
            self.close_connection = True
        if self.command == "HEAD" or bodiless:
            return
        if response.truncate is not None:
            self.wfile.write(body[: response.truncate])
        elif chunked and not until_close:
            half = len(body) // 2
            for chunk in (body[:half], body[half:]):
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)

    def _abandoned_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True if the client closed its connection or the
        server stopped first, so that a client that gave up does not keep
        a thread for the rest of the delay.

        The connection turns readable when the client closes it (a client
        that only shuts down its sending side counts as gone too), when the
        stopping server shuts it down, or when the client sends its next
        request; that one waits its turn, and from then on only the server
        stopping cuts the delay short.
        """
        stopped: threading.Event = getattr(self.server, "stopped", None) or threading.Event()
        deadline = time.monotonic() + seconds
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            while not stopped.is_set() and (remaining := deadline - time.monotonic()) > 0:
                if not selector.select(remaining):
                    continue
                peeked = self._peek()
                if peeked == b"":
                    return True
                if peeked:  # a pipelined request: readable until answered
                    return stopped.wait(max(0.0, deadline - time.monotonic()))
        return stopped.is_set()

    def _peek(self) -> bytes | None:
        """The connection's next byte, left unread: b"" once the client has
        closed it, None when readable was a false alarm."""
        timeout = self.connection.gettimeout()
        self.connection.settimeout(0.0)  # never block
        try:
            return self.connection.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError:  # reset
            return b""
        finally:
            self.connection.settimeout(timeout)


class Layer(custom.Layer):
    """A programmable HTTP server; ``http_content`` says what it answers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(ContentHandler, **kwargs)
        #: Published as ``http_content``.
        self.content = HTTPContent()

    def handler_arguments(self) -> dict[str, Any]:
        return {"content": self.content}

    def setUp(self) -> None:
        self.content.reset()
        super().setUp()
        self.publish({"http_content": self.content})

    def testSetUp(self) -> None:
        super().testSetUp()
        self.content.reset()

    def check_after_test(self) -> None:
        super().check_after_test()
        self.content.check()


#: A ready content layer.
HTTP_CONTENT = Layer(name="HTTP_CONTENT")
