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
  ``.respond(...)``, ``.respond_json(...)``, ``.respond_stream(...)``,
  ``.respond_sse(...)``, ``.respond_sequence(...)`` or
  ``.respond_with(function)``: answers for matching requests;
- ``handler``: a function that answers anything else;
- ``expect(...)``: like ``route``, and the test fails when it ends unless
  the expected requests arrived; once a test expects anything, a request
  that only the default answer (``serve_content``, or 404) met fails it too;
- ``websocket(path)``: a scripted WebSocket endpoint (see
  ``serverlayer.websocket_script``), served at the layer's ``ws_url``.

Everything is back to the defaults before each test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import difflib
import io
import json
import math
import numbers
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from serverlayer import custom, matching
from serverlayer.errors import (
    ConfigurationError,
    ExpectationError,
    RequestTimeoutError,
    ScriptError,
    ServerSideError,
)
from serverlayer.recording import RecordedRequest, is_latin_1
from serverlayer.server import ServerThread, format_address
from serverlayer.websocket_script import WebSocketScript

Headers = Mapping[str, str] | Sequence[tuple[str, str]]
_T = TypeVar("_T")

@dataclasses.dataclass(frozen=True)
class Response:
    """An answer, including the ways a real service fails.

    ``delay`` waits that many seconds before answering (the client closing
    its connection or ``tearDown`` cuts it short); ``reset`` drops the
    connection with a TCP reset instead of answering; ``truncate`` sends
    the headers for the whole body but only that many bytes of it (a
    chunked body: one chunk announced for the whole body; to an HTTP/1.0
    client, which knows no chunks, the whole body's Content-Length), then
    closes the connection. A 204 or 304 response has no body; a 1xx status is
    refused, as it is no final answer.

    ``chunks`` is a body sent piece by piece, ``interval`` seconds apart,
    as streaming APIs send theirs: see ``Response.stream`` and
    ``Response.sse``.
    """

    status: int = 200
    body: bytes | str = b""
    headers: Headers = ()
    chunked: bool = False
    delay: float = 0.0
    reset: bool = False
    truncate: int | None = None
    chunks: Iterable[bytes] | None = None
    interval: float = 0.0

    def __post_init__(self) -> None:
        # Checked here, where the test declares it, rather than found out
        # inside the server at the first request, where the client only
        # sees its connection drop.
        status: object = self.status
        if isinstance(status, (str, bytes)) and not status.strip().isdigit():
            # respond() takes the body first, Response() the status: Response("ok").
            raise ConfigurationError(
                f"status={status!r}: an HTTP status is a whole number from 100 to 999; Response takes the status"
                " first, then the body: Response(200, 'ok') (respond() takes the body first)."
            )
        object.__setattr__(self, "status", _check_status(status))
        _switch(self.chunked, "chunked")
        _switch(self.reset, "reset")
        _as_bytes(self.body, "body")
        _check_no_body(self.status, self.body)
        object.__setattr__(self, "headers", tuple(_header_items(self.headers)))
        object.__setattr__(self, "delay", matching.seconds(
            self.delay, setting="delay", meaning="a response waits a number of seconds, 0 or more, before it is sent",
            otherwise="leave delay out to answer at once"))
        object.__setattr__(self, "interval", matching.seconds(
            self.interval, setting="interval", meaning="a stream sends its pieces that many seconds apart, 0 or more",
            otherwise="leave interval out to send them at once"))
        if self.truncate is not None:
            cut = matching.whole(self.truncate)
            if cut is None or cut < 0:
                raise ConfigurationError(
                    f"truncate={self.truncate!r}: the body is cut after that many bytes, a whole number 0 or more."
                )
            object.__setattr__(self, "truncate", cut)
            size = len(self.body_bytes())
            if self.chunks is None and not self.reset and cut >= size:
                # Nothing would be cut: the whole body would go, and the test
                # would not try its client with the cut it means to.
                raise ConfigurationError(
                    f"truncate={cut} cuts nothing: the body is {size} bytes. Give fewer bytes"
                    f" than that (truncate={size // 2}: half of it; truncate=0: none of it)."
                )
        if self.chunks is not None:
            if self.body or self.truncate is not None or _has_no_body(self.status):
                raise ConfigurationError(
                    "A streamed response sends its chunks as its body, chunked: it takes no"
                    f" body= and no truncate=, and a status with a body (not {self.status})."
                )
            pieces = _pieces(self.chunks, setting="chunks", example=["Hel", "lo"])
            if isinstance(pieces, Iterator):
                object.__setattr__(self, "chunks", _ReadAsSent(pieces))
            else:
                object.__setattr__(self, "chunks", tuple(
                    _as_bytes(chunk, f"chunks[{index}]") for index, chunk in enumerate(pieces)))
        if self.chunked or self.chunks is not None:
            framing = [name for name, _ in _header_items(self.headers)
                       if name.lower() in ("transfer-encoding", "content-length")]
            if framing:
                raise ConfigurationError(
                    f"A chunked or streamed response frames its body itself: leave out the {framing[0]}"
                    " header (the layer sends Transfer-Encoding: chunked, or to an HTTP/1.0 client the"
                    " body until the connection closes)."
                )
        elif not self.reset:  # a reset sends no head
            _check_length_framing(self.status, self.body_bytes(), self.headers)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Headers = ()) -> Response:
        """A JSON body with its Content-Type, ``application/json`` unless
        ``headers`` give one (``application/problem+json``): two would reach
        clients as one value of both. NaN and infinities are refused, as
        json.dumps would write them as ``NaN``, which no JSON parser takes."""
        try:
            body = json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"data={matching.shown(data)} is no JSON value ({error}).") from None
        return cls(status, body, _with_defaults(headers, [("Content-Type", "application/json")]))

    @classmethod
    def stream(cls, chunks: Iterable[bytes | str], interval: float = 0.0, status: int = 200,
               headers: Headers = ()) -> Response:
        """A body sent chunked, one chunk every ``interval`` seconds.

        A client that closes the connection mid-stream ends it, and is no
        error; so does the end of the test. A lone str or bytes is refused:
        it would go out a character at a time; write ``["the text"]``. A
        generator (any iterator) is asked for each chunk when it is due,
        after the interval, so it may go on for ever; its stream ends one
        interval after its last chunk, when it has none more. The requests
        it answers share it, each going on where the last left off.
        """
        return cls(status, headers=headers, chunks=_pieces(chunks, setting="chunks", example=["Hel", "lo"]),
                   interval=interval)

    @classmethod
    def sse(cls, events: Iterable[Event | object], interval: float = 0.0, status: int = 200,
            headers: Headers = ()) -> Response:
        """Server-Sent Events (``text/event-stream``), one every ``interval`` seconds.

        An event is an ``Event``, a ``str`` (its data), or any other value,
        sent as JSON data: ``[{"delta": "Hel"}, {"delta": "lo"}, "[DONE]"]``
        is how LLM-style APIs stream. A lone event (a str, a mapping, an
        ``Event``) is refused, as iterating it would make other events of its
        characters or keys: write ``[event]``.
        """
        events = _pieces(events, setting="events", example=[{"delta": "Hel"}, "[DONE]"])
        items = _with_defaults(headers, [("Content-Type", "text/event-stream; charset=utf-8"),
                                         ("Cache-Control", "no-cache")])
        # A bare None is JSON's null, as the other values are JSON; Event(None) has no data.
        encoded = (
            (event if isinstance(event, Event) else Event("null" if event is None else event)).encode()
            for event in events
        )
        return cls.stream(encoded if isinstance(events, Iterator) else list(encoded), interval, status, items)

    def body_bytes(self) -> bytes:
        return _as_bytes(self.body)


def _switch(value: object, setting: str) -> bool:
    """A switch, refused unless True or False: taken for its truth,
    ``reset="no"`` reset the connection."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{setting}={value!r}: True or False.")
    return value


def _with_defaults(headers: Headers | None, defaults: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers``, then each of ``defaults`` whose name (in any letter case) they do not give."""
    items = _header_items(headers)
    given = {name.lower() for name, _ in items}
    return items + [(name, value) for name, value in defaults if name.lower() not in given]


def _as_bytes(data: bytes | str, setting: str = "body") -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        json_like = setting == "body" and isinstance(data, (dict, list))
        hint = " To answer JSON, use respond_json(data)." if json_like else ""
        raise ConfigurationError(f"{setting}: a body or chunk is bytes or str, not {data!r}.{hint}")
    return bytes(data)


class _ReadAsSent:
    """The chunks of a stream given as an iterator (a generator), each read
    as it is about to be sent: one that never ends streams until the client
    leaves or the test ends. The requests it answers share it, each going
    on where the last one left off; a lock keeps two from reading at once,
    which a generator refuses. What it raises fails the test, a
    ``ConnectionError`` too, which the server would take for a client gone.
    """

    def __init__(self, chunks: Iterator[Any]) -> None:
        self._chunks = chunks
        self._lock = threading.Lock()
        self._read = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._lock:
            try:
                chunk = next(self._chunks)  # its StopIteration ends the stream
            except (ConnectionError, TimeoutError) as error:
                raise ScriptError(f"the stream's chunks, given by the test, raised {error!r}") from error
            index, self._read = self._read, self._read + 1
        return _as_bytes(chunk, f"chunks[{index}]")


def _pieces(given: Iterable[Any], *, setting: str, example: list[Any]) -> list[Any] | Iterator[Any]:
    """The chunks or events of a stream: a list, or an iterator (a
    generator) as it is, to be read as the stream goes out.

    A str or bytes is iterable, a character or a byte (an int) at a time,
    and a mapping by its keys: given where a list of them is due, each
    would go out as a piece of its own. Such a lone piece, or an
    ``Event``, is refused rather than guessed at.
    """
    if isinstance(given, (str, bytes, bytearray, memoryview, Mapping, Event)):
        raise ConfigurationError(
            f"{setting}={matching.shown(given)}: give a list of {setting}, such as {example!r};"
            f" this is one of them (a stream would send it a piece at a time). To send it alone, write"
            f" [{matching.shown(given)}]."
        )
    if not isinstance(given, Iterable):
        raise ConfigurationError(f"{setting}={given!r}: give a list of {setting}, such as {example!r}.")
    return given if isinstance(given, Iterator) else list(given)


def _check_status(status: object, setting: str = "status") -> int:
    """``status`` as an int; refuses a status no response line can carry:
    three digits (RFC 9110 section 15), a number rather than its text; and
    a 1xx, which is no answer: the client waits on for the final response
    that follows it (RFC 9110 section 15.2), and none ever would."""
    number = matching.whole(status)
    if number is None or not 100 <= number <= 999:
        hint = f": write {int(status)}" if isinstance(status, str) and status.strip().isdigit() else ", such as 200"
        raise ConfigurationError(f"{setting}={status!r}: an HTTP status is a whole number from 100 to 999{hint}.")
    if number < 200 and number != 101:  # 101 Switching Protocols ends the HTTP exchange
        raise ConfigurationError(
            f"{setting}={status!r}: a 1xx status is an interim response, which a client reads and then waits"
            " for the final one after it; answered with it alone, the client waits until its timeout. Answer"
            " with a final status, 200 to 999, or 101 to switch protocols (the content layer sends no interim"
            " responses)."
        )
    return number


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: A header field's name (RFC 9110 section 5.1): a token, no spaces, no colon.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

#: Bodies up to this size go out in one write with the head: copying them
#: costs less than a second packet.
_JOINED_BODY_LIMIT = 64 * 1024


class _NoData:
    """``Event``'s ``data`` when none is given."""

    def __repr__(self) -> str:
        return "<no data>"


_NO_DATA: Any = _NoData()


@dataclasses.dataclass(frozen=True)
class Event:
    """A Server-Sent Event (WHATWG HTML, "Server-sent events").

    ``data`` that is a ``str`` goes as one ``data:`` line per line of it
    (``""``: one empty ``data:`` line, a message of no text); any other
    value as JSON; None as no data field, which clients dispatch no message
    for. ``event`` names its type, ``id`` sets the client's last event id,
    ``retry`` its reconnection time in milliseconds, ``comment`` adds a
    ``:`` line that clients ignore. Without ``data``, an event with an
    ``event``, ``id`` or ``retry`` has empty data (browsers fire no
    listener for an event without data), and one with a ``comment`` alone
    none: ``Event(comment="keep-alive")`` is a keep-alive clients never see.
    """

    data: Any = _NO_DATA
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def __post_init__(self) -> None:
        for name in ("event", "id", "comment"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or _LINE_BREAK.search(value)):
                raise ConfigurationError(f"Event {name}={value!r}: a single line of text.")
        if self.id is not None and "\0" in self.id:
            raise ConfigurationError(f"Event id={self.id!r}: clients ignore an id with a NUL in it.")
        if self.retry is not None and (
            isinstance(self.retry, bool) or not isinstance(self.retry, int) or self.retry < 0
        ):
            raise ConfigurationError(f"Event retry={self.retry!r}: milliseconds, a whole number 0 or more.")
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            raise ConfigurationError(
                f"Event data={bytes(self.data)[:40]!r}: events carry text; decode the bytes, or give a str."
            )
        if self.data is not None and self.data is not _NO_DATA and not isinstance(self.data, str):
            try:
                json.dumps(self.data, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"Event data={self.data!r} is no JSON value ({exc}): give a str.") from None

    def encode(self) -> bytes:
        lines = [] if self.comment is None else [f": {self.comment}"]
        fields = [f"{name}: {value}" for name, value in
                  (("event", self.event), ("id", self.id), ("retry", self.retry)) if value is not None]
        lines += fields
        data = self.data
        if data is _NO_DATA:
            data = "" if fields else None
        if data is not None:
            text = data if isinstance(data, str) else json.dumps(data, allow_nan=False)
            lines += [f"data: {line}" for line in _LINE_BREAK.split(text)]
        return ("\n".join(lines) + "\n\n").encode("utf-8")


Answer = Response | Callable[[RecordedRequest], Response]


class _Hold:
    """The answer of a route that holds its requests for the test to answer."""


_HOLD = _Hold()


class HeldRequest:
    """A request the server holds, its client waiting, until the test
    answers it; ``next_request()`` hands it to the test.

    It reads like the recorded request (``path``, ``body``, ``json()`` ...).
    """

    def __init__(self, request: RecordedRequest) -> None:
        #: The request as recorded.
        self.request = request
        self._response: Response | None = None
        self._answered = threading.Event()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.request, name)

    def __repr__(self) -> str:
        return f"<held request {self.request.summary()}>"

    @property
    def answered(self) -> bool:
        return self._answered.is_set()

    def respond(self, body: bytes | str = b"", status: int = 200, headers: Headers | None = None,
                **faults: Any) -> None:
        """Answer with this body and status (and ``chunked``, ``delay``,
        ``reset`` or ``truncate``, see ``Response``); the client gets it at once."""
        _check_options("respond", faults, _RESPONSE_OPTIONS, _RESPOND_TAKES)
        self.respond_with_response(Response(status, body, _header_items(headers), **faults))

    def respond_json(self, data: Any, status: int = 200, headers: Headers | None = None) -> None:
        """Answer with ``data`` as JSON."""
        self.respond_with_response(Response.json(data, status, headers or ()))

    def respond_with_response(self, response: Response) -> None:
        """Answer with ``response``, a ``content.Response`` (``Response.sse(...)``,
        a fault such as ``Response(reset=True)``); the client gets it at once."""
        if not isinstance(response, Response):
            raise TypeError(f"a held request is answered with content.Response, not {response!r}")
        with self._lock:
            if self._response is not None:
                raise ConfigurationError(
                    f"{self.request.summary()} was answered already, with status {self._response.status};"
                    " a request gets one answer."
                )
            self._response = response
        self._answered.set()

    def release(self, status: int, reason: str) -> None:
        """Answer with ``status`` unless the test answered already."""
        with contextlib.suppress(ConfigurationError):
            self.respond(reason, status, [("Content-Type", "text/plain; charset=utf-8")])

    def wait(self) -> Response:
        """The answer, once given (the serving thread waits here)."""
        self._answered.wait()
        assert self._response is not None
        return self._response


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


def _check_length_framing(status: int, body: bytes, headers: Headers) -> None:
    """Refuse framing headers that contradict the ``Content-Length`` the
    layer frames an unchunked body with: clients would wait for bytes that
    never come, or read what is left over as the next response."""
    for name, value in _header_items(headers):
        if name.lower() == "transfer-encoding":
            raise ConfigurationError(
                f"headers: {name}: {value}: this response is sent whole, with a Content-Length, and the header"
                " would make clients wait for chunks that never come. To send the body in chunks, leave out"
                " the header and write chunked=True (or respond_stream() for a body sent piece by piece)."
            )
        # A 304, and an answer to HEAD (a body given empty), may give the
        # length a 200 to GET would have (RFC 9110 section 8.6); 1xx and 204
        # carry no body either.
        if name.lower() == "content-length" and body and not _has_no_body(status):
            stated = value.strip()
            if not (stated.isascii() and stated.isdigit() and int(stated) == len(body)):
                raise ConfigurationError(
                    f"headers: {name}: {value}, but the body is {len(body)} bytes: clients would wait for"
                    " bytes that never come, or read the rest as the next response. Leave the header out"
                    " (the layer sends the body's length, for HEAD too); for a body cut short, write"
                    " truncate=N."
                )


def _header_items(headers: Headers | None) -> list[tuple[str, str]]:
    """``headers`` as (name, value) pairs; refuses what would fail inside the
    server at the first request, or split into headers of its own."""
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        items: list[Any] = list(headers.items())
    elif isinstance(headers, Iterable) and not isinstance(headers, (str, bytes)):
        items = list(headers)
    else:
        items = [headers]
    pairs = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            name, value = item
            if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool):
                value = str(value)  # http.server writes it as str() does
            if isinstance(value, str) and _TOKEN.fullmatch(name) and not _LINE_BREAK.search(value):
                if not is_latin_1(value):
                    raise ConfigurationError(
                        f"headers: {name}: {value!r} has characters a header cannot carry (it is"
                        " sent as ISO-8859-1); encode them, as RFC 8187 does for file names"
                        " (filename*=UTF-8''...) or percent-encoding does for URLs."
                    )
                pairs.append((name, value))
                continue
        raise ConfigurationError(
            f"headers={matching.shown(headers)}: give a mapping of names to values, such as"
            f" {{'Content-Type': 'text/plain'}}, or (name, value) pairs: each name a token (letters,"
            f" digits and !#$%&'*+-.^_`|~, no spaces or colons), each value a single line of text;"
            f" {matching.shown(item)} is none."
        )
    return pairs


def _matched_headers(headers: object) -> dict[str, str]:
    """The header fields a route matches on, each value a str: a request's
    header values are text, so ``{"X-Count": 1}`` would never match."""
    if headers is None:
        return {}
    given: Any = headers
    if not isinstance(given, Mapping) and isinstance(given, Iterable) and not isinstance(given, (str, bytes)):
        with contextlib.suppress(TypeError, ValueError):  # (name, value) pairs, or nothing
            given = dict(given)
    if isinstance(given, Mapping) and all(
        isinstance(name, str) and isinstance(value, str) for name, value in given.items()
    ):
        return dict(given)
    example = {"Authorization": "Bearer sk_test"}
    if isinstance(given, Mapping) and all(
        isinstance(value, (str, int, float)) and not isinstance(value, bool) for value in given.values()
    ):
        example = {str(name): str(value) for name, value in given.items()}
    raise ConfigurationError(
        f"headers={matching.shown(headers)}: a route matches header fields by their text, as they arrive in a"
        f" request: give a mapping of names to values, each a str, such as {example!r}."
    )


def _as_response(answer: Answer, request: RecordedRequest) -> Response:
    response = matching.call_test_function(answer, request) if callable(answer) else answer
    if not isinstance(response, Response):
        raise TypeError(f"an answer function must return content.Response, not {response!r}")
    return response


def _header_difference(name: str, got: str | None, wanted: str) -> str:
    """How a request's header field differs, for a report: "is missing"
    rather than "is None", and a value the client sent as UTF-8 said to be
    one, as it reads garbled ('ZoÃ«' for 'Zoë') next to what was wanted."""
    if got is None:
        return f"header {name} is missing, not {wanted!r}"
    as_utf8: str | None
    try:
        as_utf8 = got.encode("latin-1").decode("utf-8")
    except UnicodeError:
        as_utf8 = None
    why = " (sent as UTF-8; header values are read as ISO-8859-1)" if as_utf8 == wanted != got else ""
    return f"header {name} is {got!r}, not {wanted!r}{why}"


#: For ``json=``, whose every value (None too) is something to match.
_NOT_GIVEN: Any = object()


#: What a route matches on besides its path, method, query and headers.
_ROUTE_OPTIONS = ("raw_path", "data", "json", "json_subset", "form", "match")
#: What respond() takes besides body, status and headers: the faults, and a
#: stream's chunks (respond_stream() is the way the docs show).
_RESPONSE_OPTIONS = ("chunked", "delay", "reset", "truncate", "chunks", "interval")
_TO_MATCH_THE_BODY = ("to match the body, write data= (the exact bytes or text), json=, json_subset=, form="
                      " or match=")
_EXPECTED = "an expected request is declared with expect(path, times=...) or expect(path, at_least=...)"
_OPTION_HINTS = {
    "route": {"body": _TO_MATCH_THE_BODY, "content": _TO_MATCH_THE_BODY, "text": _TO_MATCH_THE_BODY,
              "params": "write query=", "query_params": "write query=",
              "times": _EXPECTED, "at_least": _EXPECTED, "ordered": _EXPECTED},
    "respond": {"json": "write respond_json(data)", "status_code": "write status=", "code": "write status=",
                "content": "the body is the first argument, or body=", "text": "the body is the first argument,"
                " or body=", "data": "the body is the first argument, or body=",
                "events": "write respond_sse(events)"},
}
_OPTION_HINTS["expect"] = {name: hint for name, hint in _OPTION_HINTS["route"].items() if hint is not _EXPECTED}


_ROUTE_TAKES = "path, method, query=, headers=, raw_path=, data=, json=, json_subset=, form= and match="
_EXPECT_TAKES = _ROUTE_TAKES.replace(" and match=", ", match=, times=, at_least= and ordered=")
_RESPOND_TAKES = "body, status, headers, and chunked=, delay=, reset=, truncate= (respond_stream() sends chunks)"


def _check_options(where: str, given: Mapping[str, Any], known: Sequence[str], takes: str) -> None:
    """Refuse keywords ``where()`` does not take, saying what to write: passed
    on as they were, they raised a TypeError naming Route.__init__() or
    Response.__init__(), which the test never called."""
    for name in given:
        if name in known:
            continue
        hint = _OPTION_HINTS.get(where, {}).get(name)
        if hint:
            raise ConfigurationError(f"{where}() takes no {name}=: {hint}.")
        close = difflib.get_close_matches(name, known, n=1)
        guess = f" Did you mean {close[0]}=?" if close else ""
        raise ConfigurationError(f"{where}() takes no {name}=; it takes {takes}.{guess}")


def _checked_method(method: object) -> str | None:
    """``method`` in capitals; refuses what no request line has, which
    raised an AttributeError (a list of methods) or matched nothing
    without a word (``"GET /orders"``)."""
    if method is None:
        return None
    if not isinstance(method, str):
        raise ConfigurationError(
            f"method={matching.shown(method)}: a route matches one method, such as 'POST', or any without"
            " method=; declare a route for each method it should match."
        )
    if not _TOKEN.fullmatch(method):
        raise ConfigurationError(
            f"method={method!r}: a method is one word, such as 'GET' or 'PROPFIND'; the path is the first argument."
        )
    return method.upper()


def _checked_data(data: object) -> bytes | None:
    """``data=`` as bytes; refuses what no body equals, which matched no
    request without a word until the test ended (``data={"amount": 1}``,
    meant as JSON)."""
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    hint = "; to match it parsed as JSON, write json=" if isinstance(data, (Mapping, list)) else ""
    raise ConfigurationError(f"data={matching.shown(data)}: the exact body, bytes or str{hint}.")


def _checked_json(setting: str, value: _T) -> _T:
    """``json=`` or ``json_subset=``, refused unless it is a JSON value: no
    parsed body equals a set or NaN, and the report of the unmet
    expectation, which shows it as JSON, raised a TypeError instead."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"{setting}={matching.shown(value)} is no JSON value ({error}), so no request body could match it;"
            " give dicts, lists, str, numbers, booleans and None."
        ) from None
    return value


class Route:
    """Requests a route matches, and what they get.

    A request matches when everything given matches: ``path`` (exact, or a
    compiled regular expression for the whole path; compared with the
    decoded path, so ``/café`` matches what clients send as
    ``/caf%C3%A9``, unless ``raw_path=True`` compares the path as sent),
    ``method``, ``query`` (these values for these keys), ``headers``, and
    the body: ``data`` (exact bytes or text), ``json`` (equal once parsed),
    ``json_subset`` (holds at least these keys and values, at any depth),
    ``form`` (these fields of an urlencoded or multipart form) or ``match``
    (a function of the recorded request that returns true).
    """

    def __init__(
        self,
        path: str | re.Pattern[str],
        method: str | None = None,
        *,
        query: Mapping[str, str | Sequence[str]] | None = None,
        headers: Mapping[str, str] | None = None,
        raw_path: bool = False,
        data: bytes | str | None = None,
        json: Any = _NOT_GIVEN,
        json_subset: Mapping[str, Any] | None = None,
        form: Mapping[str, str | Sequence[str]] | None = None,
        match: Callable[[RecordedRequest], bool] | None = None,
    ) -> None:
        matching.check_path(path, where="expect" if isinstance(self, Expectation) else "route", takes_query=True)
        if match is not None and not callable(match):
            raise ConfigurationError(f"match={match!r} must be a function that takes the recorded request.")
        checked_query = matching.checked_fields("query", query or {})
        checked_form = None if form is None else matching.checked_fields("form", form)
        self.path = path
        self.method = _checked_method(method)
        self.query = {key: [value] if isinstance(value, str) else value for key, value in checked_query.items()}
        self.headers = _matched_headers(headers)
        self.raw_path = _switch(raw_path, "raw_path")
        self.data = _checked_data(data)
        self.json = json if json is _NOT_GIVEN else _checked_json("json", json)
        self.json_subset = None if json_subset is None else _checked_json("json_subset", json_subset)
        self.form = checked_form
        self.match = match
        self._answers: list[Answer | _Hold] = [Response()]
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
        _check_options("respond", faults, _RESPONSE_OPTIONS, _RESPOND_TAKES)
        return self.respond_sequence(Response(status, body, _header_items(headers), **faults))

    def respond_json(self, data: Any, status: int = 200, headers: Headers | None = None) -> Route:
        """Answer with ``data`` as JSON."""
        return self.respond_sequence(Response.json(data, status, headers or ()))

    def respond_stream(self, chunks: Iterable[bytes | str], interval: float = 0.0, status: int = 200,
                       headers: Headers | None = None) -> Route:
        """Answer with a body sent chunk by chunk, ``interval`` seconds apart."""
        return self.respond_sequence(Response.stream(chunks, interval, status, headers or ()))

    def respond_sse(self, events: Iterable[Event | object], interval: float = 0.0, status: int = 200,
                    headers: Headers | None = None) -> Route:
        """Answer with Server-Sent Events, ``interval`` seconds apart (see ``Response.sse``)."""
        return self.respond_sequence(Response.sse(events, interval, status, headers or ()))

    def respond_sequence(self, *answers: Answer) -> Route:
        """Answer each request with the next answer; the last one repeats.

        ``respond_sequence(Response(503), Response(200, "ok"))`` fails the
        first request and answers every later one.
        """
        if not answers:
            raise ConfigurationError("respond_sequence() needs at least one answer.")
        for answer in answers:
            # Checked here: taken as it is, it failed at each request, a 500.
            if not isinstance(answer, Response) and not callable(answer):
                raise ConfigurationError(
                    f"respond_sequence(): {matching.shown(answer)} is no answer; an answer is a content.Response,"
                    " such as Response(200, 'ok'), or a function of the request returning one."
                )
        with self._lock:
            self._answers = list(answers)
        return self

    def respond_with(self, function: Callable[[RecordedRequest], Response]) -> Route:
        """Answer with what ``function(request)`` returns."""
        if not callable(function):
            hint = ("; for a fixed answer, write respond_sequence(Response(...)) or respond(...)"
                    if isinstance(function, Response) else ", such as lambda request: Response(200, request.body)")
            raise ConfigurationError(
                f"respond_with({matching.shown(function)}): give a function of the request that returns a"
                f" content.Response{hint}."
            )
        return self.respond_sequence(function)

    def hold(self) -> Route:
        """Hold each matching request, its client waiting, until the test
        takes it with ``http_content.next_request()`` and answers it."""
        with self._lock:
            self._answers = [_HOLD]
        return self

    @property
    def holds(self) -> bool:
        with self._lock:
            return _HOLD in self._answers

    def next_answer(self) -> Answer | _Hold:
        with self._lock:
            return self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]

    # Matching.

    def differences(self, request: RecordedRequest) -> list[str]:
        """How ``request`` differs from what the route matches; empty if it matches."""
        return list(self._differences(request))

    def _differences(self, request: RecordedRequest) -> Iterator[str]:
        """The differences, cheapest to find first, found only as far as
        they are asked for: ``matches`` stops at the first, so that a
        request another route serves costs a body matcher nothing. The
        ``match`` function is asked only when nothing else differs."""
        found = False
        for difference in self._declared_differences(request):
            found = True
            yield difference
        if self.match is not None and not found and not matching.call_test_function(self.match, request):
            yield f"{getattr(self.match, '__qualname__', repr(self.match))}(request) returned false"

    def _declared_differences(self, request: RecordedRequest) -> Iterator[str]:
        if self.method and request.method != self.method:
            yield f"method is {request.method}, not {self.method}"
        # Decoded unless told otherwise; a route written encoded still matches.
        paths = [request.path] if self.raw_path else [request.decoded_path, request.path]
        if isinstance(self.path, re.Pattern):
            if not any(self.path.fullmatch(path) for path in paths):
                yield f"path {request.path} does not match {self.path.pattern!r}"
        elif self.path not in paths:
            doubled = request.path.startswith("//") and self.path in (request.path[1:], request.decoded_path[1:])
            # http_url ends in "/": http_url + "/orders" asks for //orders.
            hint = " (a doubled slash: the layer's http_url ends in /)" if doubled else ""
            yield f"path is {request.path}, not {self.path}{hint}"
        params = request.query_params if self.query else {}
        for key, values in self.query.items():
            if params.get(key) != values:
                got = "missing" if key not in params else f"{params[key]}"
                yield f"query {key} is {got}, not {values}"
        for name, value in self.headers.items():
            sent = request.headers.get(name)
            if sent != value:
                yield _header_difference(name, sent, value)
        yield from self._body_differences(request)

    def _body_differences(self, request: RecordedRequest) -> list[str]:
        body = request.body
        if self.data is not None and body != self.data:
            return [f"body {matching.bytes_difference(body, self.data)}"]
        found = self._parsed_body_differences(request)
        if not found:  # the headers only when needed: a request's are parsed as a test first reads them
            return found
        encoding = request.headers.get("Content-Encoding", "").strip()
        if encoding and encoding.lower() != "identity":
            # Compressed bodies are not decoded: said so, rather than "body
            # is no JSON: b'\x1f\x8b...'" or a form's fields all "missing".
            return [f"body is compressed (Content-Encoding: {encoding}), which json= and form= do not decode:"
                    " match it with match="]
        return found

    def _parsed_body_differences(self, request: RecordedRequest) -> list[str]:
        body = request.body
        if self.json is not _NOT_GIVEN or self.json_subset is not None:
            is_json, parsed = request.parsed_json
            if not is_json:
                return [f"body is no JSON: {matching.shown(body)}"]
            if self.json is not _NOT_GIVEN:
                return matching.shortened(matching.json_differences(self.json, parsed), "body ")
            return matching.shortened(matching.json_differences(self.json_subset, parsed, subset=True), "body ")
        if self.form is not None:
            content_type = request.headers.get("Content-Type", "")
            fields = matching.form_fields(content_type, body)
            if fields is None:
                return [f"body is no form (Content-Type {content_type or 'missing'})"]
            return matching.shortened(matching.form_differences(self.form, fields), "")
        return []

    def matches(self, request: RecordedRequest) -> bool:
        return next(self._differences(request), None) is None

    def describe(self) -> str:
        # Not "/pattern/": a path pattern starts with "/", and "//users/\d+/"
        # read as a path, though "//users" is a path of its own.
        path = f"a path matching {self.path.pattern!r}" if isinstance(self.path, re.Pattern) else self.path
        text = f"{self.method or 'any method'} {path}"
        if self.query:
            pairs = [f"{key}={value}" for key, values in self.query.items() for value in values]
            text += " with query " + "&".join(pairs)
        if self.headers:
            text += " with headers " + ", ".join(f"{name}: {value}" for name, value in self.headers.items())
        if self.data is not None:
            text += f" with body {matching.shown(self.data)}"
            if len(repr(self.data)) > 60:  # cut short: its size tells more
                text += f" ({len(self.data)} bytes)"
        # JSON's text as the test wrote it ("Zoë"), not escaped ("Zo\u00eb").
        if self.json is not _NOT_GIVEN:
            text += f" with JSON {matching.shown(json.dumps(self.json, ensure_ascii=False))}"
        if self.json_subset is not None:
            text += f" with JSON holding {matching.shown(json.dumps(self.json_subset, ensure_ascii=False))}"
        if self.form is not None:
            text += f" with form fields {matching.shown(dict(self.form))}"
        if self.match is not None:
            text += f" accepted by {getattr(self.match, '__qualname__', repr(self.match))}"
        return text


class Expectation(Route):
    """A route the test expects requests for: ``times`` exactly, or ``at_least``."""

    def __init__(self, *args: Any, times: int | None = 1, at_least: int | None = None,
                 ordered: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        times = matching.check_counts(times, at_least)
        self.times = times
        self.at_least = at_least
        self.ordered = _switch(ordered, "ordered")
        self.count = 0
        #: The requests it counted, in the order they came.
        self.counted: list[RecordedRequest] = []

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


#: What a URL's path and query may hold as it is (RFC 3986's reserved and
#: unreserved characters, and "%" of an escape); ``quote`` keeps the
#: unreserved ones anyway.
_URL_CHARACTERS = ":/?#[]@!$&'()*+,;=%"


class HTTPContent:
    """What the content layer's server answers, and what the test expects of it."""

    def __init__(self, owner: str = "") -> None:
        #: The layer serving it, named in messages.
        self.owner = owner
        # Re-entrant: a route's match function, which runs under it, may
        # read what the test reads (http_content.requests).
        self._lock = threading.RLock()
        #: Made by the first ``next_request()``, which waits on it: a
        #: Condition costs a kilobyte, and most tests hold no request.
        self._held_arrived: threading.Condition | None = None
        #: The server's URL while its layer is set up: ``url_for`` builds on it.
        self.url: str | None = None
        self.reset()

    def url_for(self, path: str) -> str:
        """The URL of ``path`` on this server: ``url_for("/charges")``."""
        if self.url is None:
            raise ConfigurationError(
                "url_for() needs the content layer's server: call it while the layer is set up."
            )
        # "//api" is no "/api": routes match paths as sent. Text no URL
        # holds (route("/café") matches it decoded) is percent-encoded as
        # UTF-8, as browsers do, so that urllib and http.client, which send
        # a URL as it is and refuse such text, can open it too; what a URL
        # may hold stays, so an encoded path or a query is unchanged.
        return self.url + urllib.parse.quote(path.removeprefix("/"), safe=_URL_CHARACTERS)

    def reset(self) -> None:
        """Back to the defaults: 404 for everything, no routes, no expectations."""
        with self._lock:
            self._code = 404
            self._content: bytes | str = b""
            self._headers: dict[str, str] = {}
            #: The headers as set, pairs with a name repeated included (``headers``).
            self._header_pairs: list[tuple[str, str]] = []
            self._chunked = False
            self._handler: Callable[[RecordedRequest], Response | None] | None = None
            self.routes: list[Route] = []
            self.expectations: list[Expectation] = []
            self._unexpected: list[RecordedRequest] = []
            self._order_problems: list[str] = []
            self._requests: list[RecordedRequest] = []
            self.websockets: list[WebSocketScript] = []
            #: Held requests that no ``next_request()`` took yet, oldest first.
            self._held: list[HeldRequest] = []
            #: Held requests the test never took, answered 503 when it ended.
            self._never_taken: list[HeldRequest] = []

    # Programming the answers.

    def serve_content(self, content: bytes | str, code: int = 200, headers: Mapping[str, str] | None = None,
                      chunked: bool = False) -> None:
        """Answer every request that nothing else answers with this."""
        _check_status(code, "code")
        _as_bytes(content, "content")
        _check_no_body(code, content)
        Response(code, content, _header_items(headers), chunked=chunked)  # refuses what it would fail on
        self._content, self._code, self._chunked = content, code, chunked
        self.headers = headers or {}

    # The default answer's parts, as attributes (as in pytest-localserver):
    # each checked as it is set, as serve_content() checks them; taken as
    # they were, a wrong one failed every request with a 500 and the test
    # with a TypeError from the server thread.

    @property
    def code(self) -> int:
        """The default answer's status."""
        return self._code

    @code.setter
    def code(self, code: int) -> None:
        self._code = _check_status(code, "code")

    @property
    def content(self) -> bytes | str:
        """The default answer's body."""
        return self._content

    @content.setter
    def content(self, content: bytes | str) -> None:
        _as_bytes(content, "content")
        self._content = content

    @property
    def headers(self) -> dict[str, str]:
        """The default answer's header fields."""
        return self._headers

    @headers.setter
    def headers(self, headers: Headers) -> None:
        # Pairs too, as pytest-localserver takes them, a name repeated
        # (Set-Cookie) sent as often as it is given; the attribute reads as
        # a dict, which a test may change in place.
        self._header_pairs = _header_items(headers)
        self._headers = dict(self._header_pairs)

    def _default_headers(self) -> list[tuple[str, str]]:
        """The default answer's headers: as set, unless changed in place since."""
        pairs = self._header_pairs
        return pairs if dict(pairs) == self._headers else list(self._headers.items())

    @property
    def chunked(self) -> bool:
        """Whether the default answer is sent in chunks."""
        return self._chunked

    @chunked.setter
    def chunked(self, chunked: bool) -> None:
        self._chunked = _switch(chunked, "chunked")

    @property
    def handler(self) -> Callable[[RecordedRequest], Response | None] | None:
        """A function answering what no route or expectation matches."""
        return self._handler

    @handler.setter
    def handler(self, handler: Callable[[RecordedRequest], Response | None] | None) -> None:
        if handler is not None and not callable(handler):
            raise ConfigurationError(
                f"handler={matching.shown(handler)}: a function of the recorded request that returns a"
                " content.Response, or None for the default answer."
            )
        self._handler = handler

    def route(self, path: str | re.Pattern[str], method: str | None = None, *,
              query: Mapping[str, str | Sequence[str]] | None = None,
              headers: Mapping[str, str] | None = None, **body_and_more: Any) -> Route:
        """Answer requests that match; the first route declared wins.

        Besides path, method, query and headers, a route matches on
        ``raw_path``, ``data``, ``json``, ``json_subset``, ``form`` and
        ``match`` (see ``Route``).
        """
        _check_options("route", body_and_more, _ROUTE_OPTIONS, _ROUTE_TAKES)
        route = Route(path, method, query=query, headers=headers, **body_and_more)
        with self._lock:
            self.routes.append(route)
        return route

    def expect(self, path: str | re.Pattern[str], method: str | None = None, *,
               query: Mapping[str, str | Sequence[str]] | None = None,
               headers: Mapping[str, str] | None = None,
               times: int | None = 1, at_least: int | None = None, ordered: bool = False,
               **body_and_more: Any) -> Expectation:
        """Expect matching requests: ``times`` exactly (once unless said
        otherwise) or ``at_least``; ``ordered`` ones must first be met in
        the order they were declared. Match and answer them like a route."""
        _check_options("expect", body_and_more, (*_ROUTE_OPTIONS, "times", "at_least", "ordered"), _EXPECT_TAKES)
        expectation = Expectation(path, method, query=query, headers=headers,
                                  times=times, at_least=at_least, ordered=ordered, **body_and_more)
        with self._lock:
            self.expectations.append(expectation)
        return expectation

    def websocket(self, path: str | re.Pattern[str], *, subprotocols: Sequence[str] = ()) -> WebSocketScript:
        """Serve WebSocket handshakes for ``path`` with a script; the first
        declared wins. ``subprotocols`` are those the server agrees to, in
        its order of preference."""
        try:
            import websockets  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "http_content.websocket() needs the websockets package. Install it with"
                " pip install 'serverlayer[websocket]'."
            ) from None
        script = WebSocketScript(path, subprotocols)
        with self._lock:
            self.websockets.append(script)
        return script

    # Serving.

    def websocket_for(self, request: RecordedRequest) -> WebSocketScript | None:
        """The script that serves the WebSocket handshake ``request``, if any."""
        with self._lock:
            script = next((script for script in self.websockets if script.serves(request)), None)
            if script is not None:
                self._requests.append(request)
            return script

    def answer(self, request: RecordedRequest) -> Response:
        """The response to ``request``, noting which expectation it met."""
        with self._lock:
            self._requests.append(request)
            chosen = self._expectation_for(request) or next(
                (route for route in self.routes if route.matches(request)), None
            )
            handler = self.handler
        if chosen is not None:
            answer = chosen.next_answer()
            if isinstance(answer, _Hold):
                return self._hold(request)
            return _as_response(answer, request)
        if handler is not None:
            response = matching.call_test_function(handler, request)
            if response is not None:
                return _as_response(response, request)
        with self._lock:
            expects, scripts = bool(self.expectations), list(self.websockets)
        # A WebSocket's expectations count too: a handshake to a path no
        # script serves is why its client never connected. Asked with the
        # lock released: a script's lock is held while its match functions
        # run, which may read http_content.
        if expects or any(script.expects for script in scripts):
            with self._lock:
                self._unexpected.append(request)
        # The headers attribute may be set to (name, value) pairs, as
        # pytest-localserver's takes them; .items() failed on those.
        return Response(self.code, self.content, self._default_headers(), chunked=self.chunked)

    def _hold(self, request: RecordedRequest) -> Response:
        held = HeldRequest(request)
        with self._lock:
            self._held.append(held)
            if self._held_arrived is not None:
                self._held_arrived.notify_all()
        return held.wait()

    @contextlib.contextmanager
    def next_request(self, timeout: float | None = 5.0) -> Iterator[HeldRequest]:
        """Take the oldest request a ``hold()`` route holds, waiting up to
        ``timeout`` seconds for one, and answer it before the block ends::

            http_content.route("/charges", "POST").hold()
            ...  # the application sends its request in a thread of its own
            with http_content.next_request() as request:
                ...  # the client is waiting: check what it does meanwhile
                request.respond_json({"id": "ch_1"})

        A block left without an answer (an assertion failed in it, say)
        answers 500, so no client is left waiting.
        """
        if timeout is not None:
            # NaN waited for ever (threading's wait compares it with 0),
            # infinity and text raised from inside threading.
            meaning = "next_request() waits that many seconds for a held request, 0 or more"
            if timeout == math.inf:
                raise ConfigurationError(f"timeout={timeout!r}: {meaning}; write timeout=None to wait until one comes.")
            timeout = min(threading.TIMEOUT_MAX, matching.seconds(
                timeout, setting="timeout", meaning=meaning, otherwise="write timeout=None to wait until one comes"))
        with self._lock:
            if not any(route.holds for route in [*self.expectations, *self.routes]):
                raise ConfigurationError(
                    "next_request() waits for a held request, and no route holds any:"
                    ' declare one first, for example http_content.route("/charges").hold().'
                )
            if self._held_arrived is None:
                self._held_arrived = threading.Condition(self._lock)
            arrived = self._held_arrived.wait_for(lambda: bool(self._held), timeout)
            if not arrived:
                requests = [request.summary() for request in self._requests]
            held = self._held.pop(0) if arrived else None
        if held is None:
            listing = "; ".join(requests) if requests else "none"
            raise RequestTimeoutError(
                (f"{self.owner}: " if self.owner else "")
                + f"No held request arrived within {timeout} s. The requests that did arrive: {listing}."
            )
        try:
            yield held
        except BaseException:
            held.release(500, "The test failed before it answered this held request.")
            raise
        if not held.answered:
            held.release(500, "The test did not answer this held request.")
            raise ConfigurationError(
                f"The block of next_request() ended without answering {held.request.summary()}, so it got a 500."
                " Answer it inside the block: request.respond(...), respond_json(...) or respond_with_response(...)."
            )

    def release_held(self) -> int:
        """Answer 503 to every request still held: the test that would
        answer them is over. Returns how many there were."""
        with self._lock:
            held, self._held = self._held, []
            self._never_taken.extend(held)
        for each in held:
            each.release(503, "The test ended before it answered this held request.")
        return len(held)

    def _expectation_for(self, request: RecordedRequest) -> Expectation | None:
        """The first matching expectation not met yet, else the first still
        wanting requests (``at_least`` ones always do), else the last
        matching one (which then counts one request too many). Unmet ones
        first: an ``at_least`` expectation declared earlier took every
        request it matched, leaving a later one unmet that the request met."""
        matching = [expectation for expectation in self.expectations if expectation.matches(request)]
        if not matching:
            return None
        expectation = next(
            (e for e in matching if e.count < e.minimum),
            next((e for e in matching if e.times is None or e.count < e.times), matching[-1]),
        )
        self._check_order(expectation, request)
        expectation.count += 1
        expectation.counted.append(request)
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
            found.extend(f"unexpected request: {request.summary()}{self._handshake_note(request)}"
                         for request in self._unexpected)
            found.extend(
                f"held, and never taken with next_request(): {held.request.summary()}"
                for held in [*self._never_taken, *self._held]
            )
            scripts = list(self.websockets)
        for script in scripts:
            found.extend(script.problems())
        return found

    def _handshake_note(self, request: RecordedRequest) -> str:
        """For an unexpected WebSocket handshake, which reads as any GET: the
        paths the scripts serve, the likely near miss."""
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return ""
        paths = [script.describe() for script in self.websockets]
        served = (", ".join(paths[:-1]) + " and " + paths[-1]) if len(paths) > 1 else "".join(paths)
        return f" (a WebSocket handshake; the scripts serve {served})" if paths else " (a WebSocket handshake)"

    def check(self) -> None:
        """Fail now, with what went wrong, if anything did.

        Runs by itself when a test ends; call it to check mid-way.
        """
        found = self.problems()
        if found:
            raise ExpectationError(
                (f"{self.owner}: " if self.owner else "") + "The requests of this test did not meet its expectations:\n"
                + "\n".join(f"- {line}" for line in found)
            )


def _closest(expectation: Expectation, requests: Sequence[RecordedRequest], shown: int = 3) -> str:
    """The requests that came nearest to ``expectation``, fewest differences
    first; of one met too often, the requests it counted."""
    if expectation.times is not None and expectation.count > expectation.times:
        lines = [f"    {request.summary()}" for request in expectation.counted]
        return ".\n  The requests it counted:\n" + "\n".join(lines)
    differing, elsewhere = [], []
    counted = {id(request) for request in expectation.counted}
    for request in requests:
        found = _reported_differences(expectation, request)
        if found:
            differing.append((request, found))
        elif id(request) not in counted:
            elsewhere.append(request)
    if not differing:
        if not requests:
            return "; no requests arrived at all"
        # Every request matched it: too many, or none counted because they
        # went to an earlier expectation or came before this one was declared.
        return "" if expectation.count else "; the requests it matches came before it or met an earlier expectation"
    # Named too when others differ: shown alone, those read as if none of
    # its requests had arrived.
    went = "".join(f"\n    {request.summary()}" for request in elsewhere[:shown])
    went = f".\n  Requests it matches that came before it or met an earlier expectation:{went}" if went else ""
    near = sorted(differing, key=lambda pair: len(pair[1]))[:shown]
    lines = [f"    {request.summary()}: {'; '.join(found)}" for request, found in near]
    return went + (".\n" if not went else "\n") + "  Closest requests that arrived:\n" + "\n".join(lines)


def _reported_differences(expectation: Expectation, request: RecordedRequest) -> list[str]:
    """How ``request`` differs from ``expectation``, for the report; its
    ``match`` function raising on it means it did not match it, and the
    report says so rather than become that exception (the server error it
    caused when the request came is reported too)."""
    try:
        return expectation.differences(request)
    except Exception as error:  # noqa: BLE001 -- the test's own function, whatever it raises
        name = getattr(expectation.match, "__qualname__", repr(expectation.match))
        return [f"{name}(request) raised {type(error).__name__}: {error}"]


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
        if "websocket" in self.headers.get("Upgrade", "").lower():
            script = self.content.websocket_for(request)
            if script is not None:
                from serverlayer.websocket_script import converse

                self.close_connection = True
                converse(self, script)
                return
        try:
            response = self.content.answer(request)
        except Exception:
            # The test's own function (respond_with, match=, a handler) or
            # answer raised: the client gets a 500 at once, as from a service
            # that failed, not a connection closed unanswered, which a browser
            # takes for a stale one and sends the request again. The error
            # still fails the test.
            self.close_connection = True
            with contextlib.suppress(ConnectionError):
                self.send_error(500, "The test's answer for this request raised; the test fails with it")
            raise
        if response.delay:
            waited = self._client_waits(response.delay)
            if waited is None and not self.server.stopping:  # type: ignore[attr-defined]
                # The test ended first. A connection closed with no answer
                # looks stale to a browser, which sends the request again
                # (a POST too) into the next test: it gets an answer.
                self.close_connection = True
                with contextlib.suppress(ConnectionError):
                    self.send_error(503, "The test ended before this delayed answer was due")
                return
            if not waited:
                self.close_connection = True
                return
        if response.reset:
            self.server.abort_connection(self.connection)  # type: ignore[attr-defined]
            self.close_connection = True
            return
        bodiless = _has_no_body(response.status)
        body = b"" if bodiless else response.body_bytes()
        chunked = (response.chunked or response.chunks is not None) and not bodiless
        # HTTP/1.0 knows no chunks: closing the connection ends the body.
        until_close = chunked and self.request_version < "HTTP/1.1"
        headers = _header_items(response.headers)
        self._send_status(response.status, headers)
        if until_close:
            self.send_header("Connection", "close")
            if response.truncate is not None:  # the length of the whole, so that the cut shows
                self.send_header("Content-Length", str(len(body)))
        elif chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not bodiless and "content-length" not in {name.lower() for name, _ in headers}:
            self.send_header("Content-Length", str(len(body)))  # for HEAD too: what GET would get
        if response.truncate is not None:
            self.close_connection = True
            whole, body = len(body), body[: response.truncate]
            if chunked and not until_close:  # announced as one chunk of the whole body
                body = b"%x\r\n%s" % (whole, body)
        if self.command == "HEAD" or bodiless:
            self._send_head_with(b"")
            return
        server: custom.HandlerServer = self.server  # type: ignore[assignment]
        with server.writing(self.connection):  # a client that stops reading does not hold the worker
            if response.truncate is not None or not chunked:
                self._send_head_with(body)
                return
            self.end_headers()
            half = len(body) // 2
            chunks = response.chunks if response.chunks is not None else (body[:half], body[half:])
            # A list ends with its last chunk; a generator when asked for one more.
            count = len(chunks) if isinstance(chunks, tuple) else None
            pieces = iter(chunks)
            sent = 0
            while count is None or sent < count:
                if sent and response.interval and not self._client_waits(response.interval):
                    self.close_connection = True  # the body is cut: the connection must end
                    return
                # Read once it is due, not before the wait: a generator's chunk
                # is fresh, and one whose client left stays for the next request.
                piece = next(pieces, None)
                if piece is None:
                    break
                sent += 1
                if piece:  # an empty chunk would end the body
                    self.wfile.write(piece if until_close else b"%x\r\n%s\r\n" % (len(piece), piece))
            if not until_close:
                self.wfile.write(b"0\r\n\r\n")

    def _send_status(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Start the head with ``status`` and ``headers``: http.server's
        ``Server`` and ``Date`` fields unless ``headers`` give their own (a
        cached answer's old Date), which would otherwise go out next to
        them, two of each."""
        self.log_request(status)
        self.send_response_only(status)
        given = {name.lower() for name, _ in headers}
        if "server" not in given:
            self.send_header("Server", self.version_string())
        if "date" not in given:
            self.send_header("Date", self.date_time_string())
        for name, value in headers:
            self.send_header(name, value)

    def _send_head_with(self, body: bytes) -> None:
        """End the head and send it together with ``body``, if that is small.

        http.server sends the head as it ends it (``end_headers``), and the
        body then goes out in a second write: two packets, each waking the
        client, and with a client in the test's process two hand-overs of
        the interpreter lock per response.
        """
        wfile = self.wfile
        self.wfile = head = io.BytesIO()
        try:
            self.end_headers()
        finally:
            self.wfile = wfile
        if len(body) <= _JOINED_BODY_LIMIT:
            wfile.write(head.getvalue() + body)
            return
        wfile.write(head.getvalue())
        wfile.write(body)

    def _client_waits(self, seconds: float) -> bool | None:
        """Wait ``seconds``: True; False if the client closed its connection,
        None if the test ended or the server stopped first, so that a client
        that gave up (or a test that is over) does not keep a thread for the
        rest of a delay or a stream.

        The connection turns readable when the client closes it (a client
        that only shuts down its sending side counts as gone too), when the
        stopping server shuts it down, or when the client sends its next
        request; that one waits its turn, and from then on only the test's
        end or the server's stop cuts the wait short.
        """
        server: custom.HandlerServer = self.server  # type: ignore[assignment]
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            ready = server.wait_readable(self.connection, remaining)
            if ready is None:
                return None
            if ready:
                peeked = self._peek()
                if peeked == b"":
                    return False
                if peeked:  # a pipelined request: readable until answered
                    return None if server.wait_readable(None, max(0.0, deadline - time.monotonic())) is None else True
        return True

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
    """A programmable HTTP server; ``http_content`` says what it answers.

    It stands in for a service the application calls. Its ``http_content``
    resource, an ``HTTPContent``, takes routes (``route(path, ...)`` then
    ``respond(...)``, ``respond_json(...)``, faults such as
    ``respond(reset=True)``) and expectations (``expect(...)``), which fail
    the test at its end when unmet; what a test set is reset before the
    next one. Besides the resources of every HTTP layer it publishes
    ``ws_url``, for WebSocket endpoints scripted with
    ``http_content.websocket(path)``.

    It takes the keywords of every HTTP layer (``name``, ``bases``,
    ``host``, ``port``, ``tls``, ...) and ``threads``, as ``custom.Layer``
    does; no positional arguments.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(ContentHandler, **kwargs)
        #: Published as ``http_content``.
        self.content = HTTPContent(repr(self))

    def handler_arguments(self) -> dict[str, Any]:
        return {"content": self.content}

    def setUp(self) -> None:
        self.refuse_second_set_up()  # before the running test's routes go
        self.content.reset()
        super().setUp()
        self.content.url = self["http_url"]
        self.publish({"http_content": self.content})

    def tearDown(self) -> None:
        self.content.url = None
        if self.content.release_held() and self._running is not None:
            # The released answers go out before stopping closes their connections.
            self._running.server.wait_quiet(self.quiet_timeout)
        super().tearDown()

    def testSetUp(self) -> None:
        super().testSetUp()
        self.content.reset()

    def check_after_test(self) -> None:
        # Held requests keep the server busy; the server errors' check
        # would wait for them.
        self.content.release_held()
        try:
            super().check_after_test()
        except ServerSideError as server_error:
            # A server error -- a match= or respond_with function that
            # raised -- is often why an expectation is unmet; raised alone,
            # it hid the expectations' report (and its line saying what the
            # function raised). Both are shown, in one message: test runners
            # such as zope.testrunner show no exception's cause.
            try:
                self.content.check()
            except ExpectationError as unmet:
                raise ServerSideError(f"{server_error}\n\nAnd {unmet}") from None
            raise
        self.content.check()

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        resources["ws_url"] = f"{'wss' if self.tls else 'ws'}://{format_address(host, port)}/"
        return resources


#: A ready content layer.
HTTP_CONTENT = Layer(name="HTTP_CONTENT")
