"""A scripted WebSocket endpoint for the content layer: what it sends, what
it answers, and what the test expects the client to send.

``http_content.websocket(path)`` makes one; the content layer's handler
serves a handshake for its path with it (websockets' sans-I/O protocol
speaks the frames). Each connection runs on a worker thread of the content
server and ends when the client or the script closes it, or the test ends:
then the server closes it with 1001 (going away), so that no connection,
and no thread, outlives the test that opened it.

Messages are ``str`` (text frames) and ``bytes`` (binary frames); anything
else a script sends goes as JSON text. A message the script waits for is
matched by a ``str`` or ``bytes`` (equal), the type ``str`` or ``bytes``
(any message of that kind), a compiled regular expression (the whole
message), a function (true for a match), or any other value, which a text
message parsed as JSON must equal.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from serverlayer.custom import HandlerServer, _ready_to_read, has_buffered_data
from serverlayer.errors import ConfigurationError
from serverlayer.matching import call_test_function, check_counts, check_path, json_differences, seconds
from serverlayer.recording import RecordedRequest

if TYPE_CHECKING:
    from serverlayer.content import ContentHandler

Message = str | bytes

#: Close codes an endpoint may send (RFC 6455 section 7.4): 1004-1006 and
#: 1015 only ever describe a connection, and below 1000 nothing is defined.
_SENDABLE_CLOSE_CODES = (range(1000, 1004), range(1007, 1015), range(3000, 5000))


def as_message(value: object) -> Message:
    """``value`` as the frame it goes out as: text, binary or JSON text."""
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    try:
        # NaN and infinities would go out as NaN and Infinity, which no JSON parser takes.
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"A WebSocket message must be str (a text frame), bytes (a binary frame)"
            f" or a value JSON can encode; {value!r} is none of them ({error})."
        ) from None


def _close_frame(close: int | tuple[int, str] | None) -> tuple[int, str] | None:
    if close is None:
        return None
    frame = (close, "") if isinstance(close, int) else close
    code, reason = frame if isinstance(frame, (tuple, list)) and len(frame) == 2 else (None, None)
    sendable = isinstance(code, int) and any(code in codes for codes in _SENDABLE_CLOSE_CODES)
    if not (sendable and isinstance(reason, str)):
        raise ConfigurationError(
            f"close={close!r}: a WebSocket closes with a code from 1000 to 1003, 1007 to 1014"
            " or 3000 to 4999 (RFC 6455 section 7.4), optionally with a reason: close=1000"
            " or close=(4000, 'why')."
        )
    if len(reason.encode("utf-8")) > 123:
        raise ConfigurationError(f"close reason {reason[:30]!r}...: at most 123 bytes fit in a close frame.")
    return code, reason


def _interval(interval: float) -> float:
    return seconds(interval, setting="interval", meaning="messages go out that many seconds apart, 0 or more",
                   otherwise="leave interval out to send them at once")


#: A subprotocol's name is a token (RFC 6455 section 4.1, RFC 9110 section 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _subprotocols(subprotocols: Sequence[str]) -> tuple[str, ...]:
    """The names of ``subprotocols``; refuses a bare str, whose characters
    would each be a subprotocol (``"chat"`` was ``c``, ``h``, ``a``, ``t``),
    and names no client can offer."""
    if isinstance(subprotocols, (str, bytes)) or not isinstance(subprotocols, Iterable):
        example = [subprotocols] if isinstance(subprotocols, str) else ["chat"]
        raise ConfigurationError(
            f"subprotocols={subprotocols!r}: give a list of subprotocol names, such as subprotocols={example!r}."
        )
    names = tuple(subprotocols)
    for name in names:
        if not (isinstance(name, str) and _TOKEN.fullmatch(name)):
            raise ConfigurationError(
                f"subprotocols={list(names)!r}: {name!r} is no subprotocol name; a name is text without spaces"
                " or separators (an HTTP token), such as 'graphql-transport-ws'."
            )
    return names


@dataclasses.dataclass(frozen=True)
class Reply:
    """Messages to send, ``interval`` seconds apart, then maybe a close frame."""

    messages: tuple[Message, ...]
    interval: float
    close: tuple[int, str] | None

    @classmethod
    def of(cls, messages: Iterable[object], interval: float = 0.0,
           close: int | tuple[int, str] | None = None) -> Reply:
        return cls(tuple(as_message(message) for message in messages), _interval(interval), _close_frame(close))


#: The answer to a message that a script with expectations does not expect.
_UNEXPECTED = Reply((), 0.0, (1008, "the test expected no such message"))


def _show(message: Message, limit: int = 60) -> str:
    text = repr(message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(match: object) -> str:
    if isinstance(match, re.Pattern):
        return f"matching /{match.pattern!r}/"
    if isinstance(match, type):
        return f"of type {match.__name__}"
    if callable(match):
        return f"accepted by {getattr(match, '__qualname__', repr(match))}"
    if isinstance(match, (str, bytes)):
        return _show(match)
    return f"JSON {_show(json.dumps(match, ensure_ascii=False))}"


def _checked_match(match: object) -> object:
    """``match``, refused if no message could meet it: a type other than
    ``str`` or ``bytes`` (a message is one of them), or a value JSON
    cannot encode (no parsed message equals it, and the report that says
    so could not show it)."""
    if isinstance(match, type):
        if match not in (str, bytes):
            raise ConfigurationError(
                f"match={match.__name__}: a message is str (text) or bytes (binary), so only those types match"
                " a kind of message; for JSON of a kind, give a function, such as"
                " lambda message: message.startswith('{')."
            )
    elif not isinstance(match, (str, bytes, re.Pattern)) and not callable(match):
        try:
            json.dumps(match, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(
                f"match={match!r}: a message is matched by a str or bytes, str or bytes (the type), a compiled"
                f" regular expression, a function, or a value JSON can encode, which this is not ({error})."
            ) from None
    return match


def message_differences(match: object, message: Message) -> list[str]:
    """How ``message`` differs from what ``match`` accepts; empty if it matches."""
    kind, other = ("text", "binary") if isinstance(message, str) else ("binary", "text")
    if isinstance(match, re.Pattern):
        if type(match.pattern) is not type(message):
            return [f"a {kind} message, the pattern is for {other}"]
        return [] if match.fullmatch(message) else [f"does not match /{match.pattern!r}/"]
    if isinstance(match, type):  # str or bytes: any message of that kind
        return [] if isinstance(message, match) else [f"a {kind} message, not {match.__name__}"]
    if callable(match):
        if call_test_function(match, message):
            return []
        return [f"{getattr(match, '__qualname__', repr(match))} returned false"]
    if isinstance(match, (str, bytes)):
        if type(match) is not type(message):
            return [f"a {kind} message, not {other}"]
        return [] if match == message else [f"not {_show(match)}"]
    if not isinstance(message, str):
        return ["a binary message, not JSON text"]
    try:
        parsed = json.loads(message)
    except ValueError:
        return ["not JSON"]
    return json_differences(match, parsed)


def _reported_differences(match: object, message: Message) -> list[str]:
    """``message_differences`` for the report of an unmet expectation: a
    function ``match`` raising on the message did not match it, and the
    report says so rather than become that exception."""
    try:
        return message_differences(match, message)
    except Exception as error:  # noqa: BLE001 -- the test's own function, whatever it raises
        return [f"{getattr(match, '__qualname__', repr(match))} raised {type(error).__name__}: {error}"]


@dataclasses.dataclass
class _MessageRule:
    """Messages that ``match`` accepts, and the reply they get."""

    match: object
    reply: Reply
    #: For expectations: how many times, exactly or at least.
    times: int | None = None
    at_least: int | None = None
    count: int = 0
    #: The messages it counted, in the order they came: the report of one
    #: met too often lists them.
    counted: list[Message] = dataclasses.field(default_factory=list)

    def wanted(self) -> str:
        if self.at_least is not None:
            return f"at least {self.at_least} time(s)"
        return "once" if self.times == 1 else f"{self.times} times"

    def met(self) -> bool:
        if self.at_least is not None:
            return self.count >= self.at_least
        return self.count == self.times

    def wants_more(self) -> bool:
        return self.times is None or self.count < self.times


class WebSocketScript:
    """What a scripted WebSocket endpoint does; made by ``http_content.websocket(path)``.

    Every method returns the script, so that a whole conversation reads as
    one expression:

    >>> from serverlayer import content
    >>> with content.Layer() as service:
    ...     feed = (
    ...         service["http_content"].websocket("/feed")
    ...         .on_connect({"type": "welcome"})
    ...         .on_message({"op": "subscribe"}, {"price": 1}, {"price": 2}, interval=0.1)
    ...         .on_message("bye", close=1000)
    ...     )
    ...     service["ws_url"] + "feed"
    'ws://127.0.0.1:.../feed'
    """

    def __init__(self, path: str | re.Pattern[str], subprotocols: Sequence[str] = ()) -> None:
        check_path(path, where="websocket", takes_query=False)
        self.path = path
        self.subprotocols = _subprotocols(subprotocols)
        # Re-entrant: the match and reply functions run under it, and may
        # read what the test reads (script.received).
        self._lock = threading.RLock()
        self._on_connect = Reply((), 0.0, None)
        self._rules: list[_MessageRule] = []
        self._expectations: list[_MessageRule] = []
        self._function: Callable[[Message], Any] | None = None
        self._received: list[Message] = []
        self._unexpected: list[Message] = []
        #: What clients sent that broke the protocol, one line each.
        self._client_errors: list[str] = []
        self._connections = 0

    def describe(self) -> str:
        # As a route's: "/pattern/" read as a path starting "//".
        return f"a path matching {self.path.pattern!r}" if isinstance(self.path, re.Pattern) else self.path

    def serves(self, request: RecordedRequest) -> bool:
        """Whether it serves the handshake ``request``: the path decoded
        (``/café`` for ``/caf%C3%A9``) or as sent matches, as for routes."""
        paths = (request.decoded_path, request.path)
        if isinstance(self.path, re.Pattern):
            return any(self.path.fullmatch(path) for path in paths)
        return self.path in paths

    # Scripting.

    def on_connect(self, *messages: object, interval: float = 0.0,
                   close: int | tuple[int, str] | None = None) -> WebSocketScript:
        """Send these to each client as it connects, ``interval`` seconds
        apart; then close with ``close`` (a code, or a code and reason) if given."""
        self._on_connect = Reply.of(messages, interval, close)
        return self

    def on_message(self, match: object, *replies: object, interval: float = 0.0,
                   close: int | tuple[int, str] | None = None) -> WebSocketScript:
        """Answer each received message that ``match`` accepts with
        ``replies`` (then ``close``); the first rule declared wins."""
        rule = _MessageRule(_checked_match(match), Reply.of(replies, interval, close))
        with self._lock:
            self._rules.append(rule)
        return self

    def reply_with(self, function: Callable[[Message], Any]) -> WebSocketScript:
        """Answer a message no rule or expectation matches with what
        ``function(message)`` returns: a message, a list of messages, or
        None for no answer."""
        if not callable(function):
            raise ConfigurationError(
                f"reply_with({function!r}): give a function that takes the message and returns the answer;"
                " for a fixed answer to every message, write on_message(str, answer) and on_message(bytes, answer)."
            )
        self._function = function
        return self

    def expect(self, match: object, *replies: object, times: int | None = 1, at_least: int | None = None,
               interval: float = 0.0, close: int | tuple[int, str] | None = None) -> WebSocketScript:
        """Expect the client to send a message ``match`` accepts, ``times``
        exactly (once unless said otherwise) or ``at_least``; the test fails
        when it ends if it did not. Answer such messages like ``on_message``.

        Once a script expects anything, a message that nothing in it
        matches fails the test too, and closes the connection with 1008
        (policy violation) so that a client waiting for an answer fails
        at once rather than hang.
        """
        times = check_counts(times, at_least)
        rule = _MessageRule(_checked_match(match), Reply.of(replies, interval, close), times=times, at_least=at_least)
        with self._lock:
            self._expectations.append(rule)
        return self

    # What happened.

    @property
    def received(self) -> list[Message]:
        """The messages clients sent, over all connections, in order."""
        with self._lock:
            return list(self._received)

    @property
    def connections(self) -> int:
        """How many clients completed the handshake."""
        with self._lock:
            return self._connections

    @property
    def expects(self) -> bool:
        """Whether the test expects messages of this script's clients."""
        with self._lock:
            return bool(self._expectations)

    def problems(self) -> list[str]:
        """What the clients did that the script did not expect, one line each."""
        with self._lock:
            found = []
            for rule in self._expectations:
                if not rule.met():
                    found.append(
                        f"expected a message {_describe(rule.match)} on WebSocket {self.describe()}"
                        f" {rule.wanted()}, it arrived {rule.count} time(s)" + self._closest(rule)
                    )
            found.extend(f"unexpected message on WebSocket {self.describe()}: {_show(message)}"
                         for message in self._unexpected)
            found.extend(f"on WebSocket {self.describe()}, {error}" for error in self._client_errors)
            return found

    def client_erred(self, error: str) -> None:
        """Note that a client broke the protocol: a client the test drives
        is at fault, and the test fails when it ends."""
        with self._lock:
            self._client_errors.append(error)

    def _closest(self, rule: _MessageRule, shown: int = 3) -> str:
        """The messages that came nearest to ``rule``, fewest differences
        first; of one met too often, the messages it counted (as for HTTP
        expectations, ``content._closest``)."""
        if rule.times is not None and rule.count > rule.times:
            return ".\n  The messages it counted:\n" + "\n".join(f"    {_show(message)}" for message in rule.counted)
        differing = [(message, found) for message in self._received
                     if (found := _reported_differences(rule.match, message))]
        if not differing:
            if not self._received:
                return "; no messages arrived" if self._connections else "; no client connected"
            # Every message matched it: none counted, as they went to an
            # earlier expectation or came before this one was declared.
            return "" if rule.count else "; the messages it matches came before it or met an earlier expectation"
        near = sorted(differing, key=lambda pair: len(pair[1]))[:shown]
        lines = [f"    {_show(message)}: {'; '.join(found)}" for message, found in near]
        return ".\n  Closest messages that arrived:\n" + "\n".join(lines)

    # Serving (on the content server's worker threads).

    def connected(self) -> Reply:
        with self._lock:
            self._connections += 1
        return self._on_connect

    def reply_to(self, message: Message) -> Reply | None:
        """Record ``message``; what to answer it with, if anything."""
        with self._lock:
            self._received.append(message)
            matching = [rule for rule in self._expectations if not message_differences(rule.match, message)]
            if matching:
                # The first not met yet: an at_least rule always wants more,
                # and took what a later one was still waiting for.
                rule = next((rule for rule in matching if not rule.met() and rule.wants_more()),
                            next((rule for rule in matching if rule.wants_more()), matching[-1]))
                rule.count += 1
                rule.counted.append(message)
                return rule.reply
            handled = next((rule for rule in self._rules if not message_differences(rule.match, message)), None)
            if handled is not None:
                return handled.reply
            function = self._function
            if function is None and self._expectations:
                # The test fails for it when it ends; closing now spares a
                # client waiting for an answer that never comes a hang.
                self._unexpected.append(message)
                return _UNEXPECTED
        if function is None:
            return None
        answer = call_test_function(function, message)
        if answer is None:
            return None
        return Reply.of(answer if isinstance(answer, (list, tuple)) else [answer])


class _Conversation:
    """One client's WebSocket connection to a script, on its worker thread."""

    def __init__(self, handler: ContentHandler, script: WebSocketScript) -> None:
        from websockets.server import ServerProtocol
        from websockets.typing import Subprotocol

        self.handler = handler
        self.script = script
        subprotocols = [Subprotocol(name) for name in script.subprotocols]
        self.protocol = ServerProtocol(subprotocols=subprotocols or None, max_size=None)
        #: (when, order, message or close frame) to send, soonest first.
        self._outbox: list[tuple[float, int, Message | tuple[int, str]]] = []
        self._order = itertools.count()
        #: The frames of the message being received (websockets gives bytes,
        #: or a view of them), and whether it is text.
        self._parts: list[bytes | bytearray | memoryview] = []
        self._text: bool
        self._over = False

    def run(self) -> None:
        """Shake hands, then send and answer as scripted until the connection ends."""
        handler, protocol = self.handler, self.protocol
        # http.server has read the handshake request; websockets parses it
        # again, as its protocol only moves on to frames after a request.
        lines = [f"{handler.command} {handler.path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in handler.headers.items()]
        protocol.receive_data(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        events = protocol.events_received()
        if not events:
            # websockets read no handshake in it (a body, which a handshake
            # has none of; a path not in ASCII) and ends the connection with
            # no answer, as a server error here: the client gets a 400
            # saying why, as for the handshakes websockets refuses itself.
            error = protocol.handshake_exc
            why = error.__cause__ if error is not None and error.__cause__ is not None else error
            refusal = protocol.reject(400, f"Failed to open a WebSocket connection: {why}.\n")
            server: HandlerServer = handler.server  # type: ignore[assignment]
            with server.writing(handler.connection):
                handler.wfile.write(refusal.serialize())
            return
        [request] = events
        response = protocol.accept(request)  # type: ignore[arg-type]
        protocol.send_response(response)
        self._flush()
        if protocol.handshake_exc is not None:  # websockets refused it, and said why
            return
        self._queue(self.script.connected())
        try:
            self._converse()
        except BaseException:
            if not self._over:  # the script failed: tell the client, then report it
                protocol.fail(1011, "the test's WebSocket script raised")
                self._flush()
            raise

    def _converse(self) -> None:
        server: HandlerServer = self.handler.server  # type: ignore[assignment]
        while not self._over:
            self._send_due()
            if self._over:
                return
            timeout = max(0.0, self._outbox[0][0] - time.monotonic()) if self._outbox else None
            if has_buffered_data(self.handler.connection, self.handler.rfile):
                ready: bool | None = True
            else:
                # An open WebSocket is no request in progress while it waits.
                ready = server.wait_readable(self.handler.connection, timeout, idle=True)
            if ready is None:  # the test ended, or the server stops
                if self._open():  # else a close of the script's or the client's is under way
                    self.protocol.send_close(1001, "the test is over")
                    self._flush()
                self._read_until_closed(server)
                return
            if ready:
                self._receive()

    def _read_until_closed(self, server: HandlerServer) -> None:
        """Read, until the client's close frame, the messages it sent before
        it saw the server's: they are the ended test's, and may still be on
        their way (a TLS front forwards them a moment later). The client
        answers a close at once; one that does not is waited for as long as
        the end of the test waits for requests, and the server's stop cuts
        the wait (it shuts the connection down)."""
        ending = server._ending_deadline
        connection = self.handler.connection
        while not self._over and ending is not None and (remaining := ending.remaining()) > 0:
            if has_buffered_data(connection, self.handler.rfile) or _ready_to_read((connection.fileno(),), remaining):
                self._receive()

    def _receive(self) -> None:
        from websockets.frames import Frame, Opcode

        data = self.handler.rfile.read1(65536)
        if data:
            broken = self.protocol.parser_exc is not None
            self.protocol.receive_data(data)
            if not broken and self.protocol.parser_exc is not None:
                close = self.protocol.close_sent
                code = f" {close.code}" if close is not None else ""
                self.script.client_erred(
                    f"the client broke the protocol ({self.protocol.parser_exc}): the server closed with{code}"
                )
        else:  # the client is gone: websockets answers with the end of the stream, b""
            self.protocol.receive_eof()

        for frame in self.protocol.events_received():
            if not isinstance(frame, Frame):  # never: the handshake's request, its one other event, came in run()
                continue
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                self._text, self._parts = frame.opcode is Opcode.TEXT, [frame.data]
            elif frame.opcode is Opcode.CONT:
                self._parts.append(frame.data)
            else:
                continue
            if frame.fin:
                self._received(b"".join(self._parts))
        self._flush()

    def _received(self, data: bytes) -> None:
        if self._text:
            try:
                message: Message = data.decode("utf-8")
            except UnicodeDecodeError as error:
                self.protocol.fail(1007, "invalid UTF-8 in a text message")
                self.script.client_erred(
                    f"the client sent a text message that is no UTF-8 ({error}): the server closed with 1007"
                )
                return
        else:
            message = data
        reply = self.script.reply_to(message)
        if reply is not None:
            self._queue(reply)

    def _queue(self, reply: Reply) -> None:
        when = time.monotonic()
        for index, message in enumerate(reply.messages):
            self._push(when + index * reply.interval, message)
        if reply.close is not None:
            self._push(when + max(0, len(reply.messages) - 1) * reply.interval, reply.close)

    def _push(self, when: float, item: Message | tuple[int, str]) -> None:
        heapq.heappush(self._outbox, (when, next(self._order), item))

    def _open(self) -> bool:
        """Whether messages may still be sent: no close frame has gone either way."""
        from websockets.protocol import State

        return self.protocol.state is State.OPEN

    def _send_due(self) -> None:
        """Send what is due while the connection is open. Once a close frame
        went either way, replies to what the client sent before it saw the
        close are dropped, as the protocol asks."""
        if not self._open():
            self._outbox.clear()
            return
        now = time.monotonic()
        while self._outbox and self._outbox[0][0] <= now:
            _, _, item = heapq.heappop(self._outbox)
            if isinstance(item, tuple):
                self.protocol.send_close(*item)
                self._outbox.clear()  # nothing goes after a close frame
            elif isinstance(item, str):
                self.protocol.send_text(item.encode("utf-8"))
            else:
                self.protocol.send_binary(item)
        self._flush()

    def _flush(self) -> None:
        server: HandlerServer = self.handler.server  # type: ignore[assignment]
        for data in self.protocol.data_to_send():
            if not data:  # websockets' "end of stream": the closing handshake is done
                self._over = True
                return
            with server.writing(self.handler.connection):  # a client that stops reading does not hold the worker
                self.handler.wfile.write(data)


def converse(handler: ContentHandler, script: WebSocketScript) -> None:
    """Serve the WebSocket handshake ``handler`` has read with ``script``."""
    _Conversation(handler, script).run()
