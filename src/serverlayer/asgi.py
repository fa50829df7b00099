"""Serve an ASGI 3 application (HTTP and WebSocket) with uvicorn.

    >>> from serverlayer import asgi
    >>> async def app(scope, receive, send):
    ...     if scope['type'] != 'http':
    ...         return
    ...     await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    ...     await send({'type': 'http.response.body', 'body': b'hello'})
    >>> ASGI_LAYER = asgi.Layer(app, name='ASGI_LAYER')

uvicorn's HTTP (httptools where installed, else h11) and WebSocket
(websockets) protocols serve the layer's
own sockets on an event loop of the layer's own, on its named server
thread: not uvicorn's ``Server.serve()``, whose loop wakes every 0.1 s to
look whether it should stop and then waits for connections to go away.
Here stopping wakes the loop at once, closes every connection (idle
keep-alive and WebSocket clients included; a WebSocket's application
waiting for a message is told, and may clean up) and runs the
application's lifespan shutdown (its own tasks still running, as under
uvicorn; those it leaves running are cancelled after it), in milliseconds
unless that cleanup takes longer.

The application's lifespan ``startup`` runs in ``setUp`` (a failing one
fails ``setUp``), its ``shutdown`` in ``tearDown``. Under TLS, asyncio
speaks TLS itself, so the application sees the real client address and the
``https`` and ``wss`` schemes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import socket
import ssl
import sys
import threading
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping, Sequence
from email.utils import formatdate
from typing import Any

from serverlayer.errors import missing_extra

try:
    from uvicorn.config import Config
    from uvicorn.lifespan.on import LifespanOn
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from uvicorn.server import ServerState
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise missing_extra("serverlayer.asgi", "uvicorn and websockets", "asgi", missing) from missing
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: h11 serves, as in uvicorn's "auto"
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from serverlayer.arrivals import Unread
from serverlayer.errors import ConfigurationError, ServerSideError, SetUpError
from serverlayer.layer import HTTPLayer, identity, refuse_bound_application, takes_positional
from serverlayer.recording import RecordedRequest, RequestLog, split_target
from serverlayer.reporting import ErrorLog, ErrorLogHandler, server_logger, verbose
from serverlayer.server import (
    LISTEN_BACKLOG,
    AsyncioServer,
    Deadline,
    Listening,
    PlainAccepting,
    ServerThread,
    accepting_plain,
    format_address,
    holding_code,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: What the layer serves: called with (scope, receive, send). Its arguments are
#: left untyped, as uvicorn's Config leaves them: Quart and asgiref.typing type
#: the scope and messages as TypedDicts, which a user's type checker would not
#: let stand in for the mappings above, so their applications were refused.
ASGIApplication = Callable[..., Awaitable[None]]


#: The share of the layer's ``stop_timeout`` that requests still running and
#: the application's lifespan shutdown get; the rest is for closing up.
STOP_SHARE = 0.8


class LifespanStartupError(SetUpError):
    """The application's lifespan startup failed, so the layer did not set up."""


def is_asgi3(app: object) -> bool:
    """Whether ``app`` is an ASGI 3 application as uvicorn tells them apart:
    a coroutine function, or an object whose ``__call__`` is one. A class
    is one only if its instances are awaitable (calling it with the
    scope, receive and send makes what is awaited): the ``__call__`` of
    ``FastAPI`` or ``Starlette`` is a coroutine function, but it is their
    instances that are applications."""
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    call = getattr(app, "__call__", None)  # noqa: B004 - what it is matters, not whether it exists
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call)


def _takes_no_arguments(function: Callable[..., Any]) -> bool:
    """Whether ``function`` can be called without arguments (an application
    factory, as uvicorn's ``--factory`` takes), as far as can be told."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: no telling
        return False
    return all(
        parameter.default is not parameter.empty or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        for parameter in signature.parameters.values()
    )


# Recording.


#: The scope key under which the httptools protocol hands the recording a
#: request target that is not a path (the absolute form a client sends to
#: its proxy): its scope's ``raw_path`` leaves out the scheme and authority.
#: The application never sees it.
TARGET = "serverlayer.target"


class _UnreadScope(Unread[RecordedRequest]):
    """A request or WebSocket handshake as its scope gave it, until a test reads it."""

    __slots__ = ("method", "raw_path", "query", "headers", "body", "client_cert", "target")

    def __init__(self, scope: Scope, body: bytes, client_cert: Any = None, target: bytes | None = None) -> None:
        # A WebSocket handshake is a GET with Upgrade: websocket (RFC 6455).
        self.method: str = scope.get("method", "GET")
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        self.query: bytes = scope.get("query_string", b"")
        self.headers = tuple(scope.get("headers", ()))
        self.body = body
        self.client_cert = client_cert
        #: The target as sent, from the httptools protocol (``TARGET``).
        self.target = target

    def parse(self) -> RecordedRequest:
        headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in self.headers)
        if self.target is not None:
            path, query, scheme, authority = split_target(self.target.decode("latin-1"))
        else:
            # h11's raw_path is the target up to its "?": an absolute form whole.
            path, _, scheme, authority = split_target(self.raw_path.decode("latin-1"))
            query = self.query.decode("latin-1")
        return RecordedRequest(method=self.method, path=path, query=query, raw_headers=headers, body=self.body,
                               client_cert=self.client_cert, scheme=scheme, authority=authority)


def _announces_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a request's headers (names in lower case, as uvicorn gives
    them) announce a body: without Content-Length or Transfer-Encoding it
    has none (RFC 9112 section 6.3)."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class _BodyRecorder:
    """Records a request with its body once the body is whole, or once
    the client left; the application reads the body as it arrives.

    An application that sends the head of its answer before it reads has
    the head held back while the rest of the request body is read for it
    (and kept for its ``receive``), so that the request is recorded whole
    before the client sees any of the answer, as the WSGI layer records
    it: the client, having seen no answer, sends all of it. The head goes
    out once the body is whole, or as soon as the application reads, so
    that one answering each piece of an upload as it comes is served as
    under uvicorn alone. The application's first body part waits for the
    head. A client waiting for ``100 Continue`` is not sent one unless the
    application reads; its request is recorded with what the application
    read. One that reads part of the body and then answers is recorded,
    as its answer ends, with what arrived: its client, seeing an answer,
    may stop sending (curl does), and waiting for the rest would hang.
    """

    def __init__(
        self, log: RequestLog, scope: Scope, client_cert: Any, target: bytes | None, receive: Receive, send: Send
    ) -> None:
        self.log = log
        self.scope = scope
        # The request as sent, taken now: the record is made once the body
        # is whole, and by then middleware may have changed the scope it
        # passed on in place (Starlette's MutableHeaders(scope=scope)).
        self.request = _UnreadScope(scope, b"", client_cert, target)
        self.original_receive = receive
        self.original_send = send
        self.chunks: list[bytes] = []
        self.recorded = False
        self.read_any = False
        #: The answer's head, held back while the body is read for the application.
        self.held: Message | None = None
        #: What reads the body for the application, while its head is held.
        self.reader: asyncio.Task[None] | None = None
        #: The messages read for the application, for its ``receive``.
        self.read_ahead: collections.deque[Message] = collections.deque()
        #: Set while no head is held back, or being sent.
        self.head_out = asyncio.Event()
        self.head_out.set()

    def record(self) -> None:
        if not self.recorded:
            self.recorded = True
            self.request.body = b"".join(self.chunks)
            self.log.append(self.request)

    async def _read(self) -> Message:
        message = await self.original_receive()
        if message["type"] == "http.request":
            self.chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.record()
        else:  # the client left, the body unfinished
            self.record()
        return message

    async def _read_ahead(self) -> None:
        try:
            while not self.recorded:
                self.read_ahead.append(await self._read())
        finally:  # the body whole, the client gone, the application reading, failing or cancelled
            await self.release()

    async def stop_reading(self) -> None:
        """End the reading ahead, keeping what it read."""
        reader, self.reader = self.reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def receive(self) -> Message:
        self.read_any = True
        await self.stop_reading()
        await self.release()
        if self.read_ahead:
            return self.read_ahead.popleft()
        return await self._read()

    async def release(self) -> None:
        """Send the head held back, if any."""
        if self.held is not None:
            held, self.held = self.held, None
            try:
                await self.original_send(held)
            finally:
                self.head_out.set()

    async def send(self, message: Message) -> None:
        if (
            not self.recorded
            and message["type"] == "http.response.start"
            and not self.read_any
            and message["status"] >= 200  # an interim one is refused at once, in the application's task
            and not _expects_continue(self.scope["headers"])
        ):
            self.held = message
            self.head_out.clear()
            self.reader = asyncio.get_running_loop().create_task(self._read_ahead())
            return
        await self.head_out.wait()  # the answer's body waits for its head
        if not self.recorded and self._completes_answer(message):
            self.record()
        await self.original_send(message)

    def _completes_answer(self, message: Message) -> bool:
        """Whether the client has the whole answer once ``message`` is
        sent: the last part of its body, or a head that nothing follows."""
        if message["type"] == "http.response.body":
            return not message.get("more_body", False)
        if message["type"] != "http.response.start":
            return False
        status = message["status"]
        if status in (204, 304) or 100 <= status < 200 or self.scope["method"] == "HEAD":
            return True
        return any(
            name.lower() == b"content-length" and value.strip() == b"0" for name, value in message.get("headers", ())
        )


def _expects_continue(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers)


#: The final statuses whose responses have no body (RFC 9110 section 6.4.1).
_NO_CONTENT = (204, 304)


class _Exchange:
    """uvicorn's ``receive`` and ``send`` for one request (one object, as
    they run for every request), with what serverlayer adds to each.

    ``receive`` says ``http.disconnect`` once the client ended its side
    (``_Registered.eof_received``). The connection then stays open for the
    answer, so uvicorn does not know the client left; a ``receive()``
    waiting after the body wakes with an empty request message, which is
    the end.

    ``send`` keeps from the client what the response may not carry, and
    fails the test that made the request. Upstream, the httptools protocol
    writes the body of a 204 or 304 that announces a length, and sends a
    1xx as if it were final: the client takes those bytes for the next
    response on the connection, or waits for a final response that never
    comes. A 304 that announces the length a 200 would have (RFC 9110
    section 8.6) it takes for a body cut short, closing the connection.
    The h11 protocol refuses a body with a 204 or 304, and any 1xx, closing
    the connection, in h11's words ("Too much data for declared
    Content-Length"), which do not say what the application did. Here, with
    either, as on the wsgi layer: the body of a 204 or 304 is dropped and
    reported as a server error, and the connection stays usable; a 1xx
    raises in the application before anything is written, and its client
    gets uvicorn's 500. Only the start of a response is looked at, and the
    body of one that has none: nothing is counted.
    """

    __slots__ = ("cycle", "original_receive", "original_send", "has_body", "bodiless", "reported")

    def __init__(self, cycle: Any, receive: Receive, send: Send) -> None:
        self.cycle = cycle
        self.original_receive = receive
        self.original_send = send
        #: Whether the application has the whole body.
        self.has_body = False
        #: The status of the response started, if it has no body (204, 304); else 0.
        self.bodiless = 0
        #: Whether the body dropped was reported: once per response.
        self.reported = False

    async def receive(self) -> Any:
        if self.has_body and getattr(self.cycle, "client_ended", None) is not None:
            return self._ended()
        # How many wait in receive() (a stream's listener for the
        # disconnect, say), for the stop to tell (``_requests_reading``).
        # On the cycle, which refers to nothing of ours: a reference back
        # from it would leave each request's objects to the garbage collector.
        cycle = self.cycle
        cycle.readers = getattr(cycle, "readers", 0) + 1
        try:
            message = await self.original_receive()
        finally:
            cycle.readers -= 1
        if message["type"] == "http.request":
            if self.has_body and getattr(self.cycle, "client_ended", None) is not None:  # woken up by the end
                return self._ended()
            self.has_body = not message.get("more_body", False)
        return message

    def _ended(self) -> Any:
        """The end, told: from now on the client is gone, as upstream takes
        one whose connection closed (what the application still sends is
        dropped, and it may return without finishing its answer)."""
        cycle = self.cycle
        if not cycle.disconnected:
            cycle.disconnected = True  # now: the application may return at once
            # The answer to this request is dropped from here on, so those
            # pipelined behind it would be taken for its: gone too, as upstream.
            cycle.client_ended.transport.close()
        return {"type": "http.disconnect"}

    def send(self, message: Message) -> Awaitable[None]:
        # No coroutine of its own for most answers: their messages go
        # straight to uvicorn's send, with no frame of ours to await between.
        if self.bodiless or (
            message["type"] == "http.response.start" and (message["status"] < 200 or message["status"] in _NO_CONTENT)
        ):
            return self._checked_send(message)
        return self.original_send(message)

    async def _checked_send(self, message: Message) -> None:
        if self.bodiless:
            if message["type"] == "http.response.body" and message.get("body"):
                self._report_body()
                message = {**message, "body": b""}
        elif message["type"] == "http.response.start":
            status = message["status"]
            if status < 200:
                raise RuntimeError(
                    f"the application started its response with status {status}, an interim (1xx) status:"
                    " http.response.start sends the final response, and a client takes a 1xx for an"
                    " interim one and waits for the final one after it. Start the response with its"
                    " final status, 200 or above (a WebSocket is served in a scope of type 'websocket')."
                )
            if status in _NO_CONTENT:
                await self.original_send(message)
                self.bodiless = status
                if hasattr(self.cycle, "expected_content_length"):  # httptools: no body follows
                    self.cycle.expected_content_length = 0
                    self.cycle.chunked_encoding = False
                return
        await self.original_send(message)

    def _report_body(self) -> None:
        if self.reported:
            return
        self.reported = True
        scope = self.cycle.scope
        self.cycle.logger.error(
            "%s %s: the application sent a body with status %d, which has none; it was dropped."
            " Send no body with 204 and 304.",
            scope["method"],
            scope["path"],
            self.bodiless,
        )


class RecordingApp:
    """Records each HTTP request (body included) and WebSocket handshake in
    ``log``, then hands the application the same messages.

    A request without a body is recorded before the application runs; one
    with a body once the body is whole (``_BodyRecorder``).
    """

    def __init__(
        self,
        app: ASGIApplication,
        log: RequestLog,
        client_certs: Mapping[tuple[str, int], Any] | None = None,
        tls_connections: Mapping[tuple[str, int], dict[str, Any]] | None = None,
    ) -> None:
        self.app = app
        self.log = log
        #: The certificate each client (by address and port) presented.
        self.client_certs = {} if client_certs is None else client_certs
        #: Over TLS, the ASGI TLS extension of each client's connection (by address and port).
        self.tls_connections = tls_connections

    def _with_tls(self, scope: Scope) -> None:
        """Give the scope asgiref's TLS extension of its connection (uvicorn gives none)."""
        client = scope.get("client")
        facts = self.tls_connections.get(tuple(client)) if self.tls_connections and client else None
        if facts is not None:
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": dict(facts)}

    def _client_cert(self, scope: Scope) -> Any:
        client = scope.get("client")
        return self.client_certs.get(tuple(client)) if client else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.tls_connections is not None and scope["type"] in ("http", "websocket"):
            self._with_tls(scope)
        if scope["type"] == "http":
            _serving.set(scope)  # in the task of this request alone
            cycle = getattr(receive, "__self__", None)  # uvicorn's RequestResponseCycle
            if cycle is not None:
                exchange = _Exchange(cycle, receive, send)
                receive, send = exchange.receive, exchange.send
                # The request read whole, with no body: most requests. (uvicorn
                # reads all that arrived with the head before the task starts.)
                bodiless = not (cycle.more_body or cycle.body)
            else:
                bodiless = not _announces_body(scope["headers"])
            target = scope.pop(TARGET, None)
            client_cert = self._client_cert(scope) if self.client_certs else None
            if bodiless:  # nothing to read
                self.log.append(_UnreadScope(scope, b"", client_cert, target))
                await self.app(scope, receive, send)
                return
            body = _BodyRecorder(self.log, scope, client_cert, target, receive, send)
            try:
                await self.app(scope, body.receive, body.send)
            finally:
                await body.stop_reading()
                # A head without a body, or before the application failed:
                # then uvicorn ends the answer as it would have.
                await body.release()
                body.record()
            return
        if scope["type"] == "websocket":
            _serving.set(scope)
            self.log.append(_UnreadScope(scope, b"", self._client_cert(scope) if self.client_certs else None))
        await self.app(scope, receive, send)


# uvicorn's pieces, adapted to a server that lives inside a test process.


class _State(ServerState):
    """uvicorn's state shared by a server's connections, plus the server
    itself: uvicorn makes the WebSocket protocol with nothing else to find it by."""

    def __init__(self, owner: UvicornServer) -> None:
        super().__init__()
        self.owner = owner


def _owner(server_state: ServerState) -> UvicornServer:
    assert isinstance(server_state, _State)
    return server_state.owner


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (Nagle's algorithm off), where asyncio did not."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.proto == socket.IPPROTO_TCP:  # asyncio set it for these
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # the client left already
        pass


def _mark_closed(transport: asyncio.BaseTransport) -> None:
    """Close the transport of a connection that is lost, if nothing did.

    Python 3.10's TLS transport is not marked closed when its connection
    is lost (3.11 marks it), and one its protocol never closed (a client
    that left while its request ran) warns "unclosed transport" when it
    is collected. Closing it then only marks it so.
    """
    if not transport.is_closing():
        transport.close()


class _Registered(asyncio.Protocol):
    """What serverlayer adds to uvicorn's HTTP/1.1 protocols (h11 and httptools).

    - Upstream logs through the process-wide ``uvicorn.error`` and
      ``uvicorn.access`` loggers; here each server has loggers of its own,
      so a layer records its own application's errors only, and nothing
      reaches the terminal unless ``$SERVERLAYER_VERBOSE`` is set.
    - Its transport is registered so that stopping can abort it, whatever
      the connection is doing (upstream waits for connections to end).
    - TCP_NODELAY is set on every connection. asyncio sets it only on
      sockets whose ``proto`` is ``IPPROTO_TCP``; uvicorn's own
      ``bind_socket`` makes them with ``proto`` 0, and so may other code
      handing us sockets. With Nagle on, each response on a keep-alive
      connection waits for the client's delayed ACK: ~40 ms a request.
    - A plain-HTTP client that ends its side once it sent its requests
      (``shutdown(SHUT_WR)``, as ``nc -N`` does) gets its answers, then the
      end. Upstream (uvicorn 0.54, its issue 1264) takes that end for a
      client that is gone: the connection closes at once and the answers
      are dropped, even that to a lone request. A client that ends its
      side with a request unfinished is gone, as upstream. Either way the
      application's ``receive()`` says ``http.disconnect`` from then on
      (a client that closed its connection ends its side too, and the
      two look alike), so that a stream listening for it ends.
    """

    transport: asyncio.Transport
    owner: UvicornServer
    #: uvicorn's: the request last read (None before the first), and for
    #: httptools those read while another is answered, waiting their turn.
    cycle: Any
    pipeline: Any = ()
    #: Whether the client ended its side with answers still to come.
    client_done = False
    logger: logging.Logger
    access_logger: logging.Logger
    access_log: bool

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        owner = self.owner = _owner(server_state)
        self.logger = owner.logger
        self.access_logger = owner.access_logger
        self.access_log = owner.access_log

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        owner = self.owner
        if owner.sets_no_delay:
            _no_delay(transport)
        owner.transports.add(transport)
        if owner.tls_connections is not None:
            owner.note_tls(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        owner = self.owner
        owner.transports.discard(self.transport)
        if owner.tls_connections is not None:
            owner.forget_tls(self.transport)
        _mark_closed(self.transport)
        super().connection_lost(exc)

    def answering(self) -> Any:
        """The request being answered (or answered last): h11's are read one at a time."""
        return self.cycle

    def _answers_to_come(self) -> bool:
        """Whether the request being answered is whole, and it or others wait for their answer."""
        cycle = self.answering()
        return cycle is not None and not cycle.more_body and (not cycle.response_complete or bool(self.pipeline))

    def eof_received(self) -> bool | None:
        if self.transport.get_extra_info("sslcontext") is not None:
            # asyncio's TLS ends the connection anyway (a TCP end without
            # TLS's close_notify may be a cut), warning if told otherwise.
            return None
        self._forget_unfinished()
        if self._answers_to_come():
            self.client_done = True
            # The application learns of it (``_Exchange.receive``): a stream
            # that listens for http.disconnect ends, as upstream, while an
            # answer being made still goes out.
            for cycle in (self.answering(), *(waiting[0] for waiting in self.pipeline)):
                cycle.client_ended = self
                cycle.message_event.set()
            return True  # asyncio keeps the transport for the answers
        return None  # asyncio closes the transport

    def _forget_unfinished(self) -> None:
        """Drop the request read last if it waits its turn with its body
        unfinished, when no more of it will be read (its client ended its
        side, or what followed could not be parsed): it is never started,
        as uvicorn never starts those waiting when their client is gone.
        Started, its application would wait for the rest for ever."""
        last = self.cycle
        if last is not None and last.more_body and last is not self.answering():
            for waiting in list(self.pipeline):
                if waiting[0] is last:
                    self.pipeline.remove(waiting)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._close_if_client_done()

    def _close_if_client_done(self) -> None:
        if self.client_done and not self._answers_to_come() and not self.transport.is_closing():
            self.transport.close()


# uvicorn annotates eof_received as returning None; asyncio's protocols may
# return True to keep the transport open, as _Registered's does.
class _H11Protocol(_Registered, H11Protocol):  # type: ignore[misc]
    """uvicorn's pure-Python HTTP/1.1 protocol (h11)."""


#: The HTTP/1.1 protocols a layer can serve with, by uvicorn's names for them.
HTTP_PROTOCOLS: dict[str, type[_Registered]] = {"h11": _H11Protocol}
if HttpToolsProtocol is not None:

    class _HttpToolsProtocol(_Registered, HttpToolsProtocol):  # type: ignore[misc]  # as _H11Protocol
        """uvicorn's HTTP/1.1 protocol on httptools' C parser: what uvicorn
        serves with by default where httptools is installed (``uvicorn[standard]``,
        serverlayer's ``asgi`` extra), and some 1.5 times as fast as h11.

        It answers an HTTP/1.0 client as h11 does: a body of no announced
        length goes as it is, to the end of the connection. Upstream
        (uvicorn 0.54) chunks it, and announces ``Transfer-Encoding:
        chunked``, which an HTTP/1.0 client does not know (RFC 9112 section
        6.1: a server must not send it to one). A client that leaves
        while pipelined requests wait is gone for the request being
        answered too, as it is for h11's. And bytes that are no request,
        after requests still to be answered, get their 400 after those
        answers, as h11's do.
        """

        #: The request being answered: with requests pipelined, not the
        #: one read last (uvicorn's ``cycle``).
        _answering: Any = None
        #: Why what followed the requests being answered is no request:
        #: the 400 that says so waits for their answers.
        _refusal: str | None = None

        def answering(self) -> Any:
            return self._answering

        def on_headers_complete(self) -> None:
            if not self.url.startswith(b"/"):  # most requests: a path
                # The absolute form a client sends to its proxy: httptools'
                # path leaves its scheme and authority out (h11's keeps them).
                self.scope[TARGET] = self.url  # type: ignore[literal-required]
            HttpToolsProtocol.on_headers_complete(self)  # not super(): it runs for every request

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            if cycle.scope["http_version"] == "1.0":
                cycle.send = _unchunked_send(cycle)
            self._answering = cycle
            cycle.transport = _HeadJoiningTransport(self.transport, self.loop)
            HttpToolsProtocol._start_asgi_task(self, cycle, app)  # not super(): it runs for every request

        def on_response_complete(self) -> None:
            # Upstream (uvicorn 0.54) arms a timer after every response, to
            # close the connection should it stay idle for its keep-alive
            # timeout (5 s), and cancels it when the next request comes: a
            # timer made and dropped for every request, some 12 % of the
            # server's instructions per small request. Here no timer is
            # armed: an idle connection stays open until the layer stops, as
            # on the other layers. Otherwise as upstream: the next of the
            # requests read ahead (pipelined) is started.
            self.server_state.total_requests += 1
            self._answering.transport.flush()  # a head with no body (HEAD, 204, 304) goes out now
            if self.transport.is_closing():
                return
            if self._refusal is None:
                self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            elif self._refusal is not None:
                super().send_400_response(self._refusal)  # and closes the connection
                return
            self._close_if_client_done()

        def send_400_response(self, msg: str) -> None:
            # Upstream sends the 400 at once and closes the connection, the
            # answers to the requests read before the bad bytes unsent: the
            # client takes the 400 for the answer to a request the
            # application did answer. The bytes may be the body of a request
            # that did not announce it (RFC 9112 section 6.3: without
            # Content-Length or Transfer-Encoding a request has none), sent
            # with it: its answer was lost.
            self._forget_unfinished()  # its body, which the fault cut, never comes
            if self._answers_to_come():
                self._refusal = msg
                self.flow.pause_reading()  # the parser failed: nothing after is read
                return
            super().send_400_response(msg)

        def connection_lost(self, exc: Exception | None) -> None:
            # Upstream tells only the request read last that its client is
            # gone. With requests pipelined, the application answering an
            # earlier one went on sending: over TLS asyncio's transport
            # then raised AttributeError (``_write_appdata`` of None), which
            # failed the test as an error of the application.
            cycle = self._answering
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            super().connection_lost(exc)

    class _HeadJoiningTransport:
        """The transport one request's answer is written to: its head
        waits for the first part of its body, and both go out as one write.

        uvicorn's cycle writes the head (status line and headers) when
        ``http.response.start`` comes, and each part of the body when it
        comes, each at once: a small answer leaves in two TCP segments,
        and its client wakes up for each (an HTTP client in the test's own
        process then takes the interpreter lock from the server twice per
        request). Here the answer's first write (its head, or an interim
        ``100 Continue``) waits until the next, which it joins, or until
        the loop's next turn or the response's end, whichever comes first:
        an application that starts its answer and then awaits something
        before the body still has its head sent at once. Every later write
        goes straight through, as upstream, under asyncio's flow control.
        (Joined with ``write``, not ``writelines``: the selector
        transport's own ``writelines``, since Python 3.12 (3.12.1 and
        3.13.0 here), neither drops what is written to a connection that
        was lost nor ever drains an empty part, so a connection it was
        given one never closed.)
        """

        __slots__ = ("transport", "loop", "held", "first")

        def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
            self.transport = transport
            self.loop = loop
            self.held: bytes | None = None
            #: Whether nothing was written yet.
            self.first = True

        def write(self, data: bytes) -> None:
            if self.first:
                self.first = False
                self.held = data
                self.loop.call_soon(self.flush)
                return
            held = self.held
            if held is not None:
                self.held = None
                data = held + data
            self.transport.write(data)

        def flush(self) -> None:
            held = self.held
            if held is not None:
                self.held = None
                if not self.transport.is_closing():  # else aborted or lost: nothing more goes out
                    self.transport.write(held)

        def close(self) -> None:
            self.flush()
            self.transport.close()

        def is_closing(self) -> bool:
            return self.transport.is_closing()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.transport, name)

    def _unchunked_send(cycle: Any) -> Callable[[Any], Awaitable[None]]:
        """``cycle.send``, sending a body of no announced length unchunked.

        uvicorn's cycle chunks a body when ``chunked_encoding`` is still
        None at the response's start, and counts a body of known length
        down to zero. Here such a body counts down from a length too large
        to reach, until its last part, which is what is left of it.
        """
        send = cycle.send
        unannounced = False

        async def unchunked_send(message: Any) -> None:
            nonlocal unannounced
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", ())}
                if not names & {b"content-length", b"transfer-encoding"}:
                    unannounced = True
                    cycle.chunked_encoding = False
                    cycle.expected_content_length = sys.maxsize
            elif unannounced and message["type"] == "http.response.body" and not message.get("more_body"):
                cycle.expected_content_length = len(message.get("body", b""))
            await send(message)

        return unchunked_send

    HTTP_PROTOCOLS["httptools"] = _HttpToolsProtocol


#: The close code of a WebSocket that the server's stop closes: going away
#: (RFC 6455 section 7.4.1), and why.
GOING_AWAY = 1001
STOPPING = "the server is stopping"


#: How many received messages may wait for a WebSocket application's
#: ``receive()`` before its connection stops reading: websockets' own
#: default for its servers (``max_queue``).
UNREAD_MESSAGES = 16


class _WebSocketTransport:
    """The transport a WebSocket's protocol writes to, closes and pauses.

    - It is closed once, however often it is told to. uvicorn's WebSocket
      protocol closes its transport as the closing handshake ends, and
      again as its application returns. asyncio's TLS transport, closed a
      second time, lets go of its connection (CPython 3.11 to 3.13), and
      its ``abort()`` then does nothing: a connection still waiting for its
      client's TLS close_notify when the server stops outlives the loop,
      and is collected unclosed (ResourceWarning).
    - It goes on reading while the application has fewer than
      ``UNREAD_MESSAGES`` messages to take. Upstream (uvicorn 0.55's
      websockets-sansio protocol) stops reading at every message it
      receives and reads again once the application took it: two changes
      to the loop's selector, and two system calls, for each message of a
      conversation. Here the protocol's pause is left to
      ``_WebSocketProtocol.data_received``, which pauses once that many
      wait, so that a client sending faster than its application reads is
      still held back.

    ``write`` and ``is_closing``, called for every message, are the
    transport's own.
    """

    __slots__ = ("transport", "write", "is_closing")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.write = transport.write
        self.is_closing = transport.is_closing

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def pause_reading(self) -> None:
        """Nothing: see ``_WebSocketProtocol.data_received``."""

    def resume_reading(self) -> None:
        if not self.transport.is_reading():
            self.transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (websockets' sans-I/O one), logging
    through its server, whose task does not count as a request in progress.

    A WebSocket's task lasts as long as its connection; the end-of-test
    check must not wait for it. The HTTP protocol registered the transport
    it takes over; this one forgets it when the connection ends.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        owner = self.owner = _owner(server_state)
        self.logger = owner.logger
        self.tasks = owner.websocket_tasks

    #: The transport the connection came with (``self.transport`` may wrap it).
    own_transport: asyncio.Transport
    #: How many of the application's tasks wait in ``receive()`` now.
    readers = 0
    #: Whether the stop told an application waiting in ``receive()`` of the
    #: close (``shutdown``): it takes the disconnect and cleans up, and is
    #: waited for (``UvicornServer._close_websockets``).
    told = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.own_transport = transport  # type: ignore[assignment]
        self.owner.transports.add(self.own_transport)
        super().connection_made(_WebSocketTransport(self.own_transport))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        transport = self.own_transport
        if self.queue.qsize() >= UNREAD_MESSAGES and transport.is_reading():
            transport.pause_reading()  # until the application took them all (upstream's receive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.transports.discard(self.own_transport)
        if self.owner.tls_connections is not None:
            self.owner.forget_tls(self.own_transport)
        _mark_closed(self.own_transport)
        super().connection_lost(exc)

    async def run_asgi(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.owner.websocket_protocols[task] = self
        await super().run_asgi()

    def on_task_complete(self, task: asyncio.Task[None]) -> None:
        self.owner.websocket_protocols.pop(task, None)
        super().on_task_complete(task)

    async def receive(self) -> Any:
        self.readers += 1
        try:
            return await super().receive()
        finally:
            self.readers -= 1

    def over(self) -> bool:
        """Whether the connection is over or closing: its application
        then has no client left to wait for, and is soon done."""
        return bool(self.disconnected or self.transport.is_closing())

    def shutdown(self) -> None:
        """Close an open WebSocket as the server stops, with 1001 (going
        away), and tell the application so: its ``receive()`` says
        ``websocket.disconnect`` with that code, as when a client leaves,
        so that its cleanup runs (``UvicornServer._close_websockets`` waits
        for it).

        Upstream closes with 1012 (service restart), which asks a client to
        come back soon; a layer's server stops for good. A handshake in
        progress, or a closing one, ends as upstream.
        """
        if self.transport.is_closing():
            # Ending already: its application is told as the connection goes
            # (connection_lost). Closed again, asyncio's TLS transport would
            # let go of its connection (``UvicornServer._shut_down``).
            return
        if not self.handshake_complete or self.close_sent:
            super().shutdown()
            return
        self.stop_keepalive()
        self.told = self.readers > 0
        self.queue.put_nowait({"type": "websocket.disconnect", "code": GOING_AWAY, "reason": STOPPING})
        self.conn.send_close(GOING_AWAY, STOPPING)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    def send(self, message: Any) -> Coroutine[Any, Any, None]:
        # Upstream's own coroutine for the messages of a conversation: no
        # frame of ours to run between the application and it.
        if message["type"] == "websocket.http.response.body":
            return self._send_response_body(message)
        return super().send(message)

    async def _send_response_body(self, message: Any) -> None:
        await super().send(message)
        # A WebSocket refused with a response of the application's own
        # (the ``websocket.http.response`` extension) ended its handshake
        # with that response. Upstream (websockets-sansio, uvicorn 0.54)
        # takes it for no handshake at all and logs "ASGI callable
        # returned without completing handshake.", an error that would
        # fail the test; its other WebSocket protocol logs nothing.
        if not message.get("more_body", False):
            self.handshake_complete = True


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where the suspended ``task`` waits: each coroutine of the chain of
    awaits, outermost first, as a traceback shows them.

    asyncio's ``Task.get_stack()`` gives a suspended coroutine's outermost
    frame alone. An async generator driven by ``anext()`` (the
    ``asynccontextmanager`` lifespans of FastAPI and Starlette) cannot be
    reached from what awaits it, only from the frame that awaits: among
    its locals, or their ``gen`` (contextlib's), the one running. Read
    from another thread while the loop waits in its selector, so the
    chain holds still; one that moves on meanwhile is cut short.
    """
    frames: list[tuple[types.FrameType, int]] = []
    awaitable: Any = task.get_coro()
    while awaitable is not None and len(frames) < 50:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        frame = frame or getattr(awaitable, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "ag_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
        )
        if type(awaitable).__name__ in ("async_generator_asend", "async_generator_athrow"):
            values = list(frame.f_locals.values())
            candidates = [*values, *(getattr(value, "gen", None) for value in values)]
            awaitable = next((each for each in candidates if inspect.isasyncgen(each) and each.ag_running), None)
    return "".join(traceback.StackSummary.extract(frames).format()).rstrip()


def _running_self(task: asyncio.Task[Any]) -> Any:
    """The object whose method the coroutine of ``task`` runs (None once it is done)."""
    frame = getattr(task.get_coro(), "cr_frame", None)
    return None if frame is None else frame.f_locals.get("self")


def _asked_to_cancel(task: asyncio.Task[Any] | None) -> bool:
    """Whether ``task`` was asked to cancel (and has not taken it back);
    always true on Python 3.10, which does not count it."""
    cancelling: Callable[[], int] | None = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


class _Lifespan(LifespanOn):
    """uvicorn's lifespan driver, telling a failing startup from an
    application without lifespan support.

    Upstream, in its default ``lifespan="auto"``, an application that
    raises in its lifespan is taken for one without lifespan support: it
    logs that at INFO level, drops the traceback and serves on. A test
    layer must not serve an application whose startup failed, and must say
    why. Here an application that raised after it received
    ``lifespan.startup`` failed its startup (after ``lifespan.shutdown``:
    its shutdown), and its traceback is kept; one that raised before it
    received anything (``assert scope['type'] == 'http'``, say) has no
    lifespan support, as upstream, and that is fine.

    A ``CancelledError`` is the server ending the lifespan's task (a
    startup or shutdown that never finishes) only if the task was asked
    to cancel. One the application raises itself, awaiting a task it
    cancelled (``task.cancel(); await task``), fails its startup or
    shutdown as any other exception does: taken for the server's, it
    ended the shutdown where it was raised, and nothing said so. Python
    3.10 cannot tell the two apart: there every ``CancelledError`` is
    taken for the server's.
    """

    def __init__(self, config: Config, logger: logging.Logger) -> None:
        super().__init__(config)
        self.logger = logger
        #: The task the application's lifespan runs in, once started.
        self.task: asyncio.Task[None] | None = None
        self.received: list[str] = []
        #: Why startup or shutdown failed: the application's message or traceback.
        self.failure: str | None = None

    async def receive(self) -> Any:
        message = await super().receive()
        self.received.append(message["type"])
        return message

    async def send(self, message: Any) -> None:
        if message["type"] in ("lifespan.startup.failed", "lifespan.shutdown.failed"):
            self.failure = message.get("message") or f"the application sent {message['type']} without a message"
        await super().send(message)

    async def main(self) -> None:
        self.task = asyncio.current_task()
        try:
            scope = {
                "type": "lifespan",
                "asgi": {"version": self.config.asgi_version, "spec_version": "2.0"},
                "state": self.state,
            }
            await self.config.loaded_app(scope, self.receive, self.send)
        except BaseException as exc:
            self.error_occurred = True
            if isinstance(exc, asyncio.CancelledError) and _asked_to_cancel(asyncio.current_task()):
                raise
            if self.received and self.failure is None:
                self.failure = "".join(traceback.format_exception(exc)).rstrip()
                if self.startup_event.is_set():
                    self.shutdown_failed = True
                else:
                    self.startup_failed = True
        finally:
            self.startup_event.set()
            self.shutdown_event.set()


#: The scope of the request or WebSocket that the running task serves: set
#: by ``RecordingApp`` in the task uvicorn runs the application in, where
#: uvicorn logs what the application raised.
_serving: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("serving", default=None)


#: What uvicorn's httptools protocol and h11 raise when a response's body
#: does not fit its Content-Length header, in words that do not say what to do.
_LENGTH_MISMATCHES = frozenset({
    "Response content longer than Content-Length",
    "Response content shorter than Content-Length",
    "Too much data for declared Content-Length",
    "Too little data for declared Content-Length",
})


#: What uvicorn's WebSocket protocol logs of an application that returned
#: before it accepted or refused its WebSocket.
_NO_HANDSHAKE = "ASGI callable returned without completing handshake."


class _ApplicationErrors(logging.Filter):
    """Names the request in uvicorn's "Exception in ASGI application", which
    says nothing of it, and says what to do about a body that does not fit
    its Content-Length, and of a WebSocket application that returned
    without accepting or refusing; drops it for a request the server
    cancelled itself, stopping: that is no error of the application."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncio.CancelledError):
            return False
        scope = _serving.get()
        if scope is not None and str(record.msg).startswith("Exception in ASGI application"):
            what = scope["method"] if scope["type"] == "http" else "WebSocket"
            record.msg = f"Exception in ASGI application while serving {what} {scope.get('path', '')}"
            if str(error) in _LENGTH_MISMATCHES:
                record.msg += (
                    ": the application's body did not fit the Content-Length header it sent; the client"
                    " got no more of it than fit, and the connection closed. Send the body's length in"
                    " bytes as Content-Length, or no Content-Length."
                )
            record.args = ()
        elif scope is not None and record.msg == _NO_HANDSHAKE:
            # uvicorn says neither which WebSocket nor what was missing.
            record.msg = (
                f"The application returned without accepting or refusing WebSocket {scope.get('path', '')},"
                " so its client got a 500: send websocket.accept to accept it (Starlette's"
                " websocket.accept()), or websocket.close to refuse it (a 403)."
            )
        return True


class UvicornServer(AsyncioServer):
    """uvicorn's protocols serving an ASGI application on the layer's sockets.

    ``app`` is the application as the layer was given it; uvicorn serves it
    through the recording of ``requests``.
    """

    #: How often the ``Date`` header is brought up to date, as uvicorn does.
    DATE_INTERVAL = 1.0

    def __init__(
        self,
        app: ASGIApplication,
        sockets: Sequence[socket.socket],
        *,
        errors: ErrorLog,
        requests: RequestLog,
        thread_name: str,
        stop_timeout: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
        http_protocol: type[_Registered] = _H11Protocol,
    ) -> None:
        super().__init__(sockets, errors=errors)
        self.app = app
        self.http_protocol = http_protocol
        self.ssl_context = ssl_context
        self.stop_timeout = stop_timeout
        logger = server_logger(f"serverlayer.uvicorn.{thread_name}")
        logger.addFilter(_ApplicationErrors())
        self.logger = logger
        self.access_logger = server_logger(f"{logger.name}.access", logger)
        self.access_log = verbose()
        self._log_handler = ErrorLogHandler(errors)
        # uvicorn calls the application it is given with no arguments to
        # find out whether it is a factory. It is given the recording
        # wrapper, never the user's application.
        #: The certificates clients presented, by client address, while connected.
        self.client_certs: dict[tuple[str, int], Any] = {}
        #: Over TLS, what the ASGI TLS extension tells of each client's connection (``note_tls``).
        self.tls_connections: dict[tuple[str, int], dict[str, Any]] | None = None if ssl_context is None else {}
        self._tls_peers: dict[asyncio.BaseTransport, tuple[str, int]] = {}
        self.config = Config(
            RecordingApp(app, requests, self.client_certs, self.tls_connections),
            http=http_protocol,
            ws=_WebSocketProtocol,
            lifespan="auto",
            interface="asgi3",
            log_config=None,  # leave the process's logging alone
            proxy_headers=False,  # the application sees the request as the client sent it
        )
        self.config.load()
        self.state = _State(self)
        self.websocket_tasks: set[asyncio.Task[None]] = set()
        #: The connection each running WebSocket task serves.
        self.websocket_protocols: dict[asyncio.Task[None], _WebSocketProtocol] = {}
        #: The tasks of requests, and of WebSockets whose client left, that
        #: the end of a test waited for in vain. Changed in the loop's thread.
        self.given_up: dict[asyncio.Task[None], str] = {}
        #: Give-ups of ended tests that the loop's thread has yet to run.
        self.pending_give_ups: collections.deque[Callable[[], None]] = collections.deque()
        errors.left_running = self._left_running
        self.lifespan: _Lifespan | None = None
        #: Why the application's lifespan shutdown failed, once stopped.
        self.shutdown_failure: str | None = None
        self._date_timer: asyncio.TimerHandle | None = None
        self._stop_deadline: Deadline | None = None
        #: Whether clients may present certificates, to be remembered.
        self.asks_client_certs = ssl_context is not None and ssl_context.verify_mode != ssl.CERT_NONE
        #: The certificate (PEM) the server presents, for the ASGI TLS extension.
        self.server_certificate: str | None = None
        if ssl_context is not None:
            from serverlayer import tls

            self.server_certificate = tls.certificate_authority().server_certificate(ssl_context)
        #: Whether connections need TCP_NODELAY set (``_no_delay``): asyncio sets it on the rest.
        self.sets_no_delay = any(sock.proto != socket.IPPROTO_TCP for sock in self.sockets)
        #: Makes the protocol of each connection, once the lifespan started.
        self.protocol_factory: Callable[[], asyncio.Protocol] | None = None
        #: asyncio's tasks that make the connections its servers accept
        #: (TLS ones shake hands in them), while they run (``_accepted_protocol``).
        self.accepting: set[asyncio.Task[Any]] = set()

    def note_tls(self, transport: asyncio.BaseTransport) -> None:
        """Remember what the client of the TLS ``transport`` presented (its
        certificate, if asked for one) and what the application's scope
        tells of its connection, until it closes (``forget_tls``)."""
        from serverlayer import tls

        ssl_object = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername")
        if ssl_object is None or not peer or self.tls_connections is None:
            return
        peer = (peer[0], peer[1])
        certificate = tls.presented_certificate(transport) if self.asks_client_certs else None
        if certificate is not None:
            self.client_certs[peer] = certificate
        self.tls_connections[peer] = tls.asgi_tls_extension(ssl_object, certificate, self.server_certificate)
        self._tls_peers[transport] = peer  # a closed TLS transport no longer knows its peer

    def forget_tls(self, transport: asyncio.BaseTransport) -> None:
        peer = self._tls_peers.pop(transport, None)
        if peer is not None and self.tls_connections is not None:
            self.client_certs.pop(peer, None)
            self.tls_connections.pop(peer, None)

    # What uvicorn's Server does, without its polling loop.

    def _refresh_headers(self) -> None:
        date = [(b"date", formatdate(time.time(), usegmt=True).encode())]
        self.state.default_headers = date + self.config.encoded_headers
        self._date_timer = self.loop.call_later(self.DATE_INTERVAL, self._refresh_headers)

    def _lifespan_logger(self) -> logging.Logger:
        """uvicorn's lifespan logs a failed startup or shutdown, and the
        application's failure message, at ERROR: the layer reports those
        itself (``LifespanStartupError``, the shutdown's ``ServerSideError``),
        so they stay out of the server's errors, where they would fail the
        tear-down a second time."""
        logger = server_logger(f"{self.logger.name}.lifespan")
        logger.setLevel(self.logger.level)
        # With no handler, logging's last resort prints errors to stderr.
        logger.addHandler(logging.StreamHandler(sys.stderr) if verbose() else logging.NullHandler())
        return logger

    async def prepare(self) -> None:
        self._refresh_headers()
        self.lifespan = _Lifespan(self.config, self._lifespan_logger())
        await self.lifespan.startup()
        if self.lifespan.startup_failed:
            raise LifespanStartupError(self.lifespan.failure or "the application's startup failed")
        self.protocol_factory = functools.partial(
            self.http_protocol, self.config, self.state, self.lifespan.state, _loop=self.loop
        )

    def still_starting(self) -> str | None:
        """What a start that takes too long waits for, to say so."""
        lifespan = self.lifespan
        if lifespan is not None and not lifespan.startup_event.is_set():
            waiting = (
                "the application's lifespan startup has not finished: it received"
                f" {', '.join(lifespan.received) or 'nothing'} and sent no lifespan.startup.complete"
            )
            held = holding_code(self.thread_id)
            if held is not None:  # not waiting for what it awaits, but running code that does not return
                waiting += (
                    ", and synchronous code of the application holds the event loop (a blocking call"
                    " in its startup: await an async equivalent, or run it in a thread with"
                    " asyncio.to_thread). The loop's thread is at:\n\n" + held
                )
            elif lifespan.task is not None and (awaiting := _awaiting(lifespan.task)):
                waiting += ", and it waits at:\n\n" + awaiting
            return waiting
        return None

    async def start(self, sock: socket.socket) -> Listening:
        assert self.protocol_factory is not None  # made by ``prepare``, which ran first
        if self.ssl_context is None and accepting_plain(self.loop):
            return PlainAccepting(self.loop, sock, self.protocol_factory, self.transports)
        return await self.loop.create_server(
            self._accepted_protocol, sock=sock, ssl=self.ssl_context, backlog=LISTEN_BACKLOG
        )

    def _accepted_protocol(self) -> asyncio.Protocol:
        """The protocol of a connection ``create_server`` accepted, made in
        the task asyncio runs for it; that task is noted until it ends.

        asyncio makes each connection it accepts in a task of its own,
        which makes the transport, then waits for the protocol's
        ``connection_made``: under TLS, until the handshake is done, which
        a client may never finish. Closing its server leaves those tasks
        running (it only stops listening), and ``asyncio.run`` cancels
        them with every other task as its loop ends. Here the stop ends
        them with the requests, before the application's shutdown, which a
        handshake finishing meanwhile would hand a new connection; the
        application's own tasks are left alone. Calling this is the first
        thing such a task does, so it is known as the current task, not by
        asyncio's private names. (A loop that makes connections in no task,
        as on Windows, has none to note.)
        """
        assert self.protocol_factory is not None
        task = asyncio.current_task(self.loop)
        if task is not None:
            self.accepting.add(task)
            task.add_done_callback(self.accepting.discard)
        return self.protocol_factory()

    def serve(self, ready: Callable[[], None]) -> None:
        self.logger.addHandler(self._log_handler)
        try:
            super().serve(ready)
        finally:
            self.logger.removeHandler(self._log_handler)
            self._join_worker_threads()

    def _join_worker_threads(self) -> None:
        """Wait for the threads anyio ran the application's synchronous
        code on (Starlette's ``def`` endpoints and background tasks).

        anyio tells each to end once the task it began for has ended, and
        does not wait for it: one was now and then still there when the
        test ended (zope.testrunner: "left new threads behind"). Each of
        those threads holds the loop it serves as its ``loop`` attribute.
        """
        deadline = self._stop_deadline or Deadline(self.stop_timeout * STOP_SHARE)
        for thread in threading.enumerate():
            if getattr(thread, "loop", None) is self.loop and thread is not threading.current_thread():
                thread.join(deadline.remaining())

    def _shut_down(self, servers: list[Listening]) -> None:
        """Close every connection, end the requests, then let the
        application shut down, then end what it left running: uvicorn's
        order, its waiting bounded.

        The application's own tasks (a poller or a queue consumer its
        lifespan started, work a request left behind) run on untouched
        through its lifespan shutdown, as under uvicorn, so that a shutdown
        that stops them itself (sets an event and awaits the task, awaits
        its queue's ``join()``, flushes what they hold) finds them as the
        tests left them. Only then are those still running cancelled, as
        uvicorn's ``asyncio.run`` does as its loop ends (``_end_tasks_left``).
        """
        if self._date_timer is not None:
            self._date_timer.cancel()
        # Within the time the layer waits for this thread, so that it finds
        # how the shutdown went.
        deadline = self._stop_deadline or Deadline(self.stop_timeout * STOP_SHARE)
        # Its first turn of the loop, with the servers still open, also
        # starts asyncio's tasks for the connections accepted in the loop's
        # last turn, so that they note themselves (``_accepted_protocol``).
        # Started once their server is closed, asyncio would fail to make
        # their transports and leave them for the garbage collector.
        self._close_websockets(deadline)
        for server in servers:
            server.close()
        # uvicorn's own goodbye to the rest: an idle connection is closed,
        # one whose answer is on its way closes after it. Not to those
        # closing already (a TLS one waiting for its client's close_notify):
        # asyncio's TLS transport, closed again, lets go of its connection,
        # and the abort below would then leave it open, to be collected
        # unclosed once the loop is gone (ResourceWarning).
        for connection in list(self.state.connections):
            if connection.transport.is_closing():
                continue
            try:
                connection.shutdown()
            except Exception:  # noqa: BLE001 - the connection was in no state to say goodbye
                pass
        connections = len(self.transports)
        reading = self._requests_reading()
        for transport in list(self.transports):
            transport.abort()
        running = [task for task in (*self.state.tasks, *self.websocket_tasks, *self.accepting) if not task.done()]
        for task in running:
            if task not in reading:
                task.cancel()
        if reading:
            self.loop.run_until_complete(asyncio.wait(reading, timeout=deadline.remaining() / 2))
            for task in reading:
                task.cancel()  # those not done in time; nothing for those done
        if running:
            self.loop.run_until_complete(asyncio.wait(running, timeout=deadline.remaining() / 2))
        lifespan = self.lifespan
        if lifespan is not None and lifespan.startup_event.is_set() and not lifespan.error_occurred:
            budget = deadline.remaining()
            if budget <= 0:
                self.shutdown_failure = (
                    "it did not run: ending the server's connections and requests took"
                    f" all the time the layer's stop_timeout ({self.stop_timeout} seconds)"
                    f" gives the stop ({connections} connections and {len(running)} requests"
                    " to end); raise stop_timeout"
                )
            else:
                try:
                    self.loop.run_until_complete(asyncio.wait_for(lifespan.shutdown(), budget))
                except asyncio.TimeoutError:
                    self.shutdown_failure = (
                        f"it did not finish within {budget:.2f} seconds; the layer's"
                        f" stop_timeout ({self.stop_timeout} seconds) bounds it"
                    )
                    # The application's lifespan, still waiting: which of its awaits never finished.
                    awaiting = _awaiting(lifespan.task) if lifespan.task is not None else ""
                    if awaiting:
                        self.shutdown_failure += ". It waits at:\n\n" + awaiting
        if lifespan is not None and lifespan.shutdown_failed:
            self.shutdown_failure = lifespan.failure
        self._end_tasks_left(deadline)
        super()._shut_down(servers)

    def _end_tasks_left(self, deadline: Deadline) -> None:
        """Cancel the tasks still running once the application shut down
        (one its shutdown did not stop, work a request started), and wait
        for them until the deadline, or at least half the time the stop
        keeps for closing up: most end at their next ``await``.

        What one raises as it ends is a server error, as under
        ``asyncio.run``. One that does not end (it catches the cancellation
        and goes on) fails the tear-down, and is left behind, not waited for.
        """
        left = asyncio.all_tasks(self.loop)
        if not left:
            return
        for task in left:
            task.cancel()
        budget = max(deadline.remaining(), self.stop_timeout * (1 - STOP_SHARE) / 2)
        done, pending = self.loop.run_until_complete(asyncio.wait(left, timeout=budget))
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                self.loop.call_exception_handler({
                    "message": "a task left running when the application had shut down raised as it was cancelled",
                    "exception": error,
                    "task": task,
                })
        if pending:
            self.abandoned = pending
            count = "1 task" if len(pending) == 1 else f"{len(pending)} tasks"
            stubborn = (
                f"it left {count} running that did not end within {budget:.2f} seconds of being cancelled"
                " (caught the cancellation and went on), left behind: " + ", ".join(sorted(map(repr, pending)))
            )
            self.shutdown_failure = f"{self.shutdown_failure}\n\n{stubborn}" if self.shutdown_failure else stubborn

    def _requests_reading(self) -> set[asyncio.Task[None]]:
        """Tell the requests whose application waits in ``receive()`` that
        their client is gone, and return their tasks, to wait for before
        the rest are cancelled.

        A stream that listens for ``http.disconnect`` (Starlette's
        ``StreamingResponse``, an SSE endpoint) then ends as when its client
        leaves, and what follows it runs (a background task). Upstream
        waits for such a stream without a bound (or cancels it once its
        ``timeout_graceful_shutdown`` passed), and it would learn of the
        stop only from its client; cancelled at once with the rest, it
        would meet ``CancelledError`` wherever it is. Those not reading (a
        stream that only pushes) are still cancelled at once, rather than
        waited for until they next send.
        """
        told: set[Any] = set()
        for protocol in self.state.connections:
            if not isinstance(protocol, _Registered):
                continue  # a WebSocket's (``_close_websockets``)
            cycle = protocol.answering()
            readers: int = getattr(cycle, "readers", 0)
            if readers:
                cycle.disconnected = True
                cycle.message_event.set()
                told.add(cycle)
        if not told:
            return set()
        # uvicorn runs each request as a task of its cycle's run_asgi().
        return {task for task in self.state.tasks if _running_self(task) in told}

    def _close_websockets(self, deadline: Deadline) -> None:
        """Close every open WebSocket (``_WebSocketProtocol.shutdown``), then
        give the applications that read the close up to half the time left
        to finish.

        An application learns of it from ``receive()``, as when its client
        leaves, and cleans up: Starlette's ``WebSocketDisconnect`` handler
        runs, a subscriber is removed. Cancelled at once, one waiting in
        ``receive()`` would meet ``CancelledError`` instead, its cleanup
        never run. Those not done in time are cancelled in ``_shut_down``,
        with the requests (upstream waits for them without a bound); those
        an ended test gave up on are not waited for again. Nothing else is cancelled
        or closed meanwhile (see ``_shut_down``): the listening sockets,
        which accept no more since the stop was asked (``request_stop``),
        are only no longer watched, so that a client waiting to be accepted
        does not wake the loop at every turn.
        """
        for protocol in [each for each in self.state.connections if isinstance(each, _WebSocketProtocol)]:
            try:
                protocol.shutdown()
            except Exception:  # noqa: BLE001 - the connection was in no state to say goodbye
                pass
        # In one turn of the loop each application waiting in receive()
        # takes the disconnect. One that is not reading (it only pushes, and
        # waits for something to push) would learn of the close only when it
        # next sends: it is not waited for, but cancelled with the requests.
        # Which were reading is noted as they are told (``told``), not seen
        # from their queue's being empty after that turn: the close ends a
        # plain connection at once, and uvicorn's ``connection_lost`` then
        # queues a disconnect of its own (1005) in that turn, so that every
        # application whose cleanup awaits anything was cancelled at once.
        self.loop.run_until_complete(asyncio.sleep(0))
        finishing = [
            task for task, protocol in self.websocket_protocols.items()
            if not task.done() and task not in self.given_up and protocol.told
        ]
        if finishing:
            for sock in self.sockets:
                self.loop.remove_reader(sock.fileno())
            self.loop.run_until_complete(asyncio.wait(finishing, timeout=deadline.remaining() / 2))

    def request_stop(self) -> None:
        self._stop_deadline = Deadline(self.stop_timeout * STOP_SHARE)
        super().request_stop()

    def _finishing(self) -> list[asyncio.Task[None]]:
        """The tasks the end of a test waits for: every request's, and
        those of WebSockets whose connection is over (an open WebSocket's
        task lasts as long as its connection), unless the end of an
        earlier test waited for them in vain."""
        given_up = self.given_up
        return [
            *(task for task in list(self.state.tasks) if task not in given_up),
            *(
                task
                for task, protocol in list(self.websocket_protocols.items())
                if protocol.over() and task not in given_up
            ),
        ]

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no request runs, nor the application of a WebSocket
        whose client left.

        A request is not over when its client has the response, nor a
        WebSocket when its connection closes: the application may still
        run, and raise, and its error belongs to the test that made the
        request or opened the WebSocket. uvicorn adds and discards each
        request's task in its plain set, in the loop's thread, with no
        Python code of ours on that path; the wait asks the loop to tell
        when those are done.
        """
        if not (self.state.tasks or self.websocket_protocols):
            return True
        quiet = threading.Event()

        async def watch() -> None:
            while finishing := self._finishing():
                # uvicorn's discard runs before this wakes up: its done
                # callback was added first.
                await asyncio.wait(finishing)
            quiet.set()

        try:
            watching = asyncio.run_coroutine_threadsafe(watch(), self.loop)
        except RuntimeError:  # the loop is closed: nothing runs any more
            return not self._finishing()
        if quiet.wait(timeout):
            return True
        watching.cancel()
        # A WebSocket application that goes on without its client (one
        # that never reads, say) would hold up the end of every later test.
        self._give_up_soon(functools.partial(self._give_up, websockets_only=True))
        return False

    def give_up(self, test: str = "") -> None:
        self._give_up_soon(functools.partial(self._give_up, test))

    def _give_up_soon(self, give_up: Callable[[], None]) -> None:
        """Have the loop's thread give up, before anything asked of it later.

        A request whose wake-up the loop had queued already runs before
        the give-up, so what it raises first runs the give-ups pending
        (``_left_running``) to learn that the ended test left it running.
        """
        self.pending_give_ups.append(give_up)
        try:
            self.loop.call_soon_threadsafe(self._run_pending_give_ups)
        except RuntimeError:  # the loop is closed: nothing runs any more
            pass

    def _run_pending_give_ups(self) -> None:
        while self.pending_give_ups:  # only the loop's thread takes them
            self.pending_give_ups.popleft()()

    def _give_up(self, test: str = "", *, websockets_only: bool = False) -> None:
        for task in self._finishing():
            if task not in self.given_up and (not websockets_only or task in self.websocket_protocols):
                self.given_up[task] = test
                task.add_done_callback(self._forget_given_up)
        if test:  # those a wait for quiet gave up on meanwhile (WebSockets whose client left) are its test's too
            for task, given_by in self.given_up.items():
                if not given_by:
                    self.given_up[task] = test

    def _forget_given_up(self, task: asyncio.Task[None]) -> None:
        self.given_up.pop(task, None)

    def _left_running(self) -> str | None:
        """The test whose end gave up on the task recording an error (its
        name, or ""); None if none did."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in the loop's thread
            return None
        if loop is not self.loop:
            return None
        self._run_pending_give_ups()
        task = asyncio.current_task()
        return self.given_up.get(task) if task is not None else None


class Layer(HTTPLayer):
    """Serves an ASGI 3 application with uvicorn: HTTP/1.1 and WebSocket.

    The application is the ``asgi_app`` resource of a base layer if there
    is one, else the ``asgi_app`` argument or class attribute (wrap a
    function in ``staticmethod`` there). Besides the resources of every
    HTTP layer it publishes ``ws_url``: ``ws://host:port/``, ``wss://``
    with ``tls=True``.

    The application's lifespan startup runs in ``setUp``, its shutdown in
    ``tearDown``; an application without lifespan support is served all
    the same.

    ``http_protocol`` chooses uvicorn's HTTP/1.1 implementation as its
    ``--http`` option does: ``"auto"`` (httptools where installed, else
    h11), ``"httptools"`` or ``"h11"``.
    """

    asgi_app: ASGIApplication | None = None
    http_protocol: str = "auto"

    def __init__(
        self, asgi_app: ASGIApplication | None = None, *, http_protocol: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if asgi_app is not None:
            self.asgi_app = asgi_app
        if http_protocol is not None:
            self.http_protocol = http_protocol
        self._protocol_class()  # refuse an unknown or missing protocol now

    def _protocol_class(self) -> type[_Registered]:
        name = self.http_protocol
        if name == "auto":
            return HTTP_PROTOCOLS.get("httptools", _H11Protocol)
        if name not in ("h11", "httptools"):
            raise ConfigurationError(
                f"{self!r}: http_protocol={name!r} is none of uvicorn's HTTP/1.1"
                " implementations; use 'auto', 'httptools' or 'h11'."
            )
        if name not in HTTP_PROTOCOLS:
            raise ConfigurationError(
                f"{self!r}: http_protocol='httptools' needs httptools, which is not"
                " installed. Install it (pip install 'serverlayer[asgi]' brings it),"
                " or use http_protocol='auto' or 'h11'."
            )
        return HTTP_PROTOCOLS[name]

    def application(self) -> ASGIApplication:
        """The application to serve; the ``asgi_app`` resource wins."""
        app = self.get("asgi_app") or self.asgi_app
        if app is None:
            # With bases, one that publishes asgi_app in its setUp may not have
            # been set up (`with layer:` sets up the layer alone): the advice
            # alone would tell the user to write what they wrote.
            bases = ", ".join(identity(base) for base in self.__bases__)
            raise ConfigurationError(
                f"{self!r} has no ASGI application to serve. Give it one:"
                " asgi.Layer(app), an asgi_app class attribute (a function"
                " wrapped in staticmethod) or an asgi_app resource of a base layer."
                + (
                    f" If one of its base layers ({bases}) publishes asgi_app in its setUp, it was not set"
                    " up before this layer: `with layer:` and layer.setUp() set up this layer alone. Set"
                    " the bases up first, as zope-testrunner does."
                    if bases
                    else ""
                )
            )
        if not callable(app):
            raise ConfigurationError(f"{self!r}: the ASGI application {app!r} is not callable.")
        # Its lifespan would be taken for no lifespan support, so setUp would pass.
        refuse_bound_application(self, app, "asgi_app", ["scope", "receive", "send"])
        if not is_asgi3(app):
            # A class or a factory given for the application it makes would be
            # served, its every request failing with a TypeError, or be taken
            # for a WSGI application: say what to give instead.
            name = getattr(app, "__name__", "app")
            call = getattr(app, "__call__", None)  # noqa: B004 - what it is matters, not whether it exists
            if inspect.isclass(app) and inspect.iscoroutinefunction(call) and takes_positional(call, 3):
                # (self, receive, send): made with the scope, as ASGI 2 has it.
                raise ConfigurationError(
                    f"{self!r}: {app!r} is an ASGI 2 application (made with the scope, then called"
                    " with receive and send): serve it as ASGI 3 with"
                    f" asgi.Layer(ASGI2Middleware({name})) (from uvicorn.middleware.asgi2 import ASGI2Middleware)."
                )
            if inspect.isfunction(app) and takes_positional(app, 1):
                # ASGI 2's own form, def app(scope) returning the coroutine
                # function for receive and send, which uvicorn serves as
                # ASGI 2. No WSGI application takes one argument.
                raise ConfigurationError(
                    f"{self!r}: {app!r} is an ASGI 2 application (called with the scope, then what it"
                    " returns with receive and send): serve it as ASGI 3 with"
                    f" asgi.Layer(ASGI2Middleware({name})) (from uvicorn.middleware.asgi2 import ASGI2Middleware)."
                )
            if inspect.isclass(app) and inspect.iscoroutinefunction(call):
                raise ConfigurationError(
                    f"{self!r}: {app!r} is a class, not an application: give the layer"
                    f" an instance, {name}(): asgi.Layer({name}())."
                )
            if inspect.isfunction(app) and _takes_no_arguments(app):
                raise ConfigurationError(
                    f"{self!r}: {app!r} takes no arguments: an application factory? Give the"
                    f" layer what it makes, asgi.Layer({name}()); an ASGI 3 application is a"
                    " coroutine function app(scope, receive, send), or an object whose __call__ is one."
                )
            raise ConfigurationError(
                f"{self!r}: {app!r} is no ASGI 3 application: that is a coroutine"
                " function app(scope, receive, send), or an object whose __call__"
                " is one. Serve a WSGI application with serverlayer.wsgi.Layer."
            )
        return app  # type: ignore[no-any-return]

    def setUp(self) -> None:
        self.application()  # fail before binding anything
        try:
            super().setUp()
        except SetUpError as error:
            cause = error.__cause__
            if isinstance(cause, LifespanStartupError):
                raise LifespanStartupError(
                    f"{self!r}: the application's lifespan startup failed, so the layer"
                    f" did not set up:\n\n{cause}"
                ) from cause
            raise

    def tearDown(self) -> None:
        running = self._running
        try:
            super().tearDown()
        finally:
            if running is not None and running.thread.is_alive():
                self._report_held_loop(running.thread)
            self._check_shutdown(None if running is None else running.server)

    def _report_held_loop(self, thread: threading.Thread) -> None:
        """Fail the tear-down of a server whose thread outlived the stop.

        The stop's every wait is bounded, so only synchronous code on the
        event loop keeps it from ending in time: a blocking call in an
        async endpoint or lifespan (``time.sleep``, requests, a blocking
        database driver). The loop's thread is abandoned, as a request that
        never ends is on the other layers; but the application's lifespan
        shutdown has not run, and nothing said so: ``tearDown`` returned as
        if all went well. Where the thread is shows what holds it.
        """
        where = holding_code(thread.ident) or ""
        self._tear_down_raised = True
        raise ServerSideError(
            f"{self!r}: the server's event loop did not stop within the layer's stop_timeout"
            f" ({self.stop_timeout} seconds): synchronous code of the application holds it,"
            " such as a blocking call (time.sleep, requests, a blocking database driver) in an"
            " async endpoint or lifespan. Await an async equivalent, or run it in a thread (a"
            " plain def endpoint, asyncio.to_thread). So its lifespan shutdown has not run, and"
            " the server's thread is left behind. The loop's thread is at:\n\n" + where
        )

    def _check_shutdown(self, server: object) -> None:
        if isinstance(server, UvicornServer) and server.shutdown_failure:
            failure, server.shutdown_failure = server.shutdown_failure, None
            self._tear_down_raised = True
            raise ServerSideError(
                f"{self!r}: the application's lifespan shutdown failed (the server"
                f" is stopped all the same):\n\n{failure}"
            )

    def _server(self, sockets: Sequence[socket.socket], ssl_context: ssl.SSLContext | None) -> UvicornServer:
        return UvicornServer(
            self.application(),
            sockets,
            errors=self.server_errors,
            requests=self.requests,
            thread_name=f"serverlayer {self.__module__}.{self.__name__}",
            stop_timeout=self.stop_timeout,
            ssl_context=ssl_context,
            http_protocol=self._protocol_class(),
        )

    def make_server(self, sockets: Sequence[socket.socket]) -> UvicornServer:
        return self._server(sockets, None)

    def build_server(self, sockets: Sequence[socket.socket], host: str) -> UvicornServer:
        """With ``tls=True``, asyncio speaks TLS on the layer's sockets itself.

        The other HTTP layers put a TLS front before a plain server; behind
        one, uvicorn would tell the application the front's address as the
        client's and ``http``/``ws`` as the scheme.
        """
        if not self.tls:
            return self.make_server(sockets)
        from serverlayer import tls

        addresses = [sock.getsockname()[0] for sock in sockets]
        names = tls.certificate_names(host, self.published_host(host), *addresses)
        context = tls.certificate_authority().server_context(names, self.client_certs, owner=repr(self))
        return self._server(sockets, context)

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        resources["ws_url"] = f"{'wss' if self.tls else 'ws'}://{format_address(host, port)}/"
        return resources


__all__ = ["Layer", "LifespanStartupError", "RecordingApp", "UvicornServer", "is_asgi3"]
