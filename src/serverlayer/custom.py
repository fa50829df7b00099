"""Serve a ``http.server.BaseHTTPRequestHandler`` subclass.

    >>> from serverlayer import custom
    >>> class Hello(custom.RequestHandler):
    ...     def do_GET(self):
    ...         self.send_response(200)
    ...         self.end_headers()
    ...         self.wfile.write(b'hello')
    >>> HELLO_LAYER = custom.Layer(Hello, name='HELLO_LAYER')
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import http.server
import io
import itertools
import os
import queue
import select
import selectors
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from types import MethodType, TracebackType
from typing import Any, cast

import plone.testing

from serverlayer.errors import ConfigurationError
from serverlayer.layer import HTTPLayer, whole_number
from serverlayer.recording import RequestLog, record_requests
from serverlayer.reporting import ErrorLog, verbose
from serverlayer.server import Activity, Deadline, ForwardedClients, ServerThread, SocketserverStops

#: What ``http.server`` logs when a request raised ``TimeoutError``.
_TIMED_OUT = "Request timed out: %r"

#: Exceptions that only mean the client went away.
DISCONNECTS = (ConnectionError, TimeoutError, ssl.SSLEOFError, ssl.SSLZeroReturnError)



#: The longest wait in one poll() or select() call: poll() takes whole
#: milliseconds that fit 32 bits (under 25 days), and raises beyond. A
#: longer wait (a test stalling a stream for "a very long time") goes in
#: waits this long, one after the other.
LONGEST_WAIT = 86400.0


def _ready_to_read(fds: tuple[int, ...], timeout: float | None) -> Collection[int]:
    """Which of ``fds`` are readable (or closed), once one is or ``timeout``
    seconds passed (None: no limit).

    A worker waits like this for each next request on its connection, so
    the wait is a single poll() call: no epoll object to create and close,
    as a DefaultSelector would, and none of the selectors module's Python.
    Only a wait longer than ``LONGEST_WAIT`` takes more than one.
    """
    if timeout is None or timeout <= LONGEST_WAIT:
        return _ready_within(fds, timeout)
    deadline = time.monotonic() + timeout
    while not (ready := _ready_within(fds, LONGEST_WAIT)):
        left = deadline - time.monotonic()
        if left <= LONGEST_WAIT:
            return _ready_within(fds, max(0.0, left))
    return ready


def _ready_within(fds: tuple[int, ...], timeout: float | None) -> Collection[int]:
    """``_ready_to_read`` in one call, ``timeout`` at most ``LONGEST_WAIT``."""
    if not hasattr(select, "poll"):
        return select.select(fds, [], [], timeout)[0]
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return dict(poller.poll(None if timeout is None else timeout * 1000))


def _exclusive_accepting(sockets: Sequence[socket.socket]) -> Any:
    """An epoll object that waits for connections on ``sockets``, woken
    only if no waiter registered before it is waiting (``EPOLLEXCLUSIVE``)."""
    accepting = select.epoll()
    try:
        for listening in sockets:
            accepting.register(listening, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    except OSError:
        accepting.close()
        raise
    for listening in sockets:
        listening.setblocking(False)  # the acceptor and the loop both accept
    return accepting


def _ends(connection: socket.socket) -> tuple[Any, Any] | None:
    try:
        return connection.getsockname(), connection.getpeername()
    except OSError:  # gone already
        return None


def _shut_down(connection: socket.socket, descriptor: int, ends: tuple[Any, Any] | None) -> None:
    """End both sides of a connection, which unblocks a worker reading or
    writing it; through its descriptor where a handler's ``setup()``
    detached the socket object to wrap it and has not finished (a stalled
    TLS handshake), if the descriptor is still that connection's."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
        return
    except OSError:
        if connection.fileno() != -1 or ends is None:
            return  # ended already, or the client is gone
    try:
        borrowed = socket.socket(fileno=descriptor)
    except OSError:  # closed meanwhile
        return
    try:
        if _ends(borrowed) == ends:  # not a descriptor a later socket reuses
            borrowed.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        borrowed.detach()  # the descriptor is the wrapper's to close


def _client_left(connection: socket.socket) -> bool:
    """Whether a connection the serving loop found readable was closed by
    its client rather than sent a request.

    The loop closes such a connection itself: clients close theirs as
    tests end, and a worker started for that after the test's end would
    count as a thread the test left behind.
    """
    try:
        return _peek(connection) == b""
    except BlockingIOError:  # readable was a false alarm
        return False
    except OSError:  # reset by the client
        return True


#: As a plain int: or-ing the enum members costs more than the call.
_PEEK_FLAGS = int(socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0))


def _peek(connection: socket.socket) -> bytes:
    """The next byte the connection's socket has, without taking it or
    waiting; of a TLS connection a handler made (``ssl.SSLSocket``, whose
    own ``recv`` refuses flags), the next byte of TLS record."""
    return socket.socket.recv(connection, 1, _PEEK_FLAGS)


class _ReadingWithoutWaiting:
    """A connection's socket whose reads never wait (``MSG_DONTWAIT``)."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_into(self, buffer: Any) -> int:
        if not _readable_now(self.sock):
            raise BlockingIOError(errno.EAGAIN, "nothing to read yet")  # SocketIO reads nothing
        return self.sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)


class _Connection(socket.socket):
    """An accepted connection whose worker, reading a request whose rest
    has not come, waits where the end of the test calls it back.

    http.server reads a request without a timeout: a client that sent part
    of one and stopped (its test failed midway) held the worker until the
    end of the test had waited for that request in vain (``quiet_timeout``,
    a second by default), as nothing else tells a worker waiting for bytes
    from one still reading what came. Here the worker that would wait
    finds the test over and ends the connection itself (``cut_read``). A
    read that finds bytes costs what it did: one ``recv``.
    """

    __slots__ = ()

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        conversation: _Conversation | None = getattr(_this_thread, "reading", None)
        timeout = self.gettimeout()
        if conversation is None or conversation.connection is not self or flags or timeout == 0:
            return super().recv_into(buffer, nbytes, flags)
        if timeout is None:
            try:
                return super().recv_into(buffer, nbytes, _DONT_WAIT)
            except BlockingIOError:
                pass
        elif _readable_now(self):
            return super().recv_into(buffer, nbytes)
        arrived = conversation.server.wait_readable(self, timeout)
        if arrived is None:  # the test is over, or the server stops
            conversation.cut_read()
        elif not arrived:
            raise TimeoutError("timed out")
        return super().recv_into(buffer, nbytes)


_DONT_WAIT = int(getattr(socket, "MSG_DONTWAIT", 0))


def _readable_now(connection: socket.socket) -> bool:
    """Whether a read of ``connection`` would not wait, where it might.

    CPython waits for a socket with a timeout (a handler's ``timeout``) to
    turn readable before it reads, up to that timeout, ``MSG_DONTWAIT`` or
    not; a socket without one is read at once.
    """
    return not connection.gettimeout() or bool(_ready_to_read((connection.fileno(),), 0))


class _NothingToRead:
    """Stands in for a connection's socket while a file's buffer is looked
    at: a read from it would block (``SocketIO`` then reads nothing), so
    ``peek`` shows only what the file holds, without a system call."""

    __slots__ = ()

    def recv_into(self, buffer: Any, *args: Any) -> int:
        raise BlockingIOError(errno.EAGAIN, "nothing is read while the buffer is looked at")


_NOTHING_TO_READ = _NothingToRead()


def _reads_connection(rfile: Any, connection: socket.socket) -> bool:
    """Whether ``rfile`` is a buffered file reading ``connection`` through a
    ``socket.SocketIO`` (what ``StreamRequestHandler`` makes)."""
    raw: Any = getattr(rfile, "raw", None)
    return isinstance(raw, socket.SocketIO) and getattr(raw, "_sock", None) is connection


def file_holds_data(connection: socket.socket, rfile: Any) -> bool:
    """Whether ``rfile`` holds bytes of a next request it read from
    ``connection`` along with the last one (a client that pipelines).

    What the socket has is left to the wait for the next request, a poll()
    that returns at once if it has anything: looking here too would take
    one more system call per request, and each lets the other threads take
    the interpreter lock. An unbuffered file (a handler's ``rbufsize =
    0``) holds nothing. A file of the handler's own that wraps the one
    ``StreamRequestHandler`` made, keeping it as an attribute, is looked
    through; one that can be peeked at is peeked at with the socket not
    waiting (``has_buffered_data``); one that hides its buffer is taken to
    hold nothing, as waiting on it would keep its worker until the client
    closes the connection.
    """
    pending = getattr(connection, "pending", None)  # an ssl.SSLSocket's decrypted bytes, which poll() does not see
    if pending is not None and pending():
        return True
    if not _reads_connection(rfile, connection):
        inner = [value for value in getattr(rfile, "__dict__", {}).values() if _reads_connection(value, connection)]
        if inner:
            rfile = inner[0]
        elif isinstance(rfile, io.RawIOBase) or not hasattr(rfile, "peek"):
            return False
        else:
            return has_buffered_data(connection, rfile)
    raw: Any = rfile.raw
    raw._sock = _NOTHING_TO_READ
    try:
        return bool(rfile.peek(1))
    finally:
        raw._sock = connection


def _socket_has_data(connection: socket.socket) -> bool:
    pending = getattr(connection, "pending", None)  # a TLS connection's decrypted bytes
    if pending is not None and pending():
        return True
    if not _readable_now(connection):
        return False
    try:
        return bool(_peek(connection))
    except OSError:  # nothing yet (BlockingIOError), or gone
        return False


def has_buffered_data(connection: socket.socket, rfile: Any) -> bool:
    """Whether ``rfile`` holds, or the socket has ready, bytes of a next request.

    ``rfile.peek`` reads from the socket when its buffer is empty, which
    must not wait here. Where the file reads through a ``socket.SocketIO``
    (``makefile``), its socket is swapped for one that reads with
    ``MSG_DONTWAIT`` for the peek: one system call, where switching the
    socket to non-blocking and back takes two more, each of which lets
    other threads take the interpreter lock in between. An unbuffered
    file (a handler's ``rbufsize = 0``) has no ``peek``: only the socket
    can have bytes.
    """
    raw: Any = getattr(rfile, "raw", None)
    reads_connection = isinstance(raw, socket.SocketIO) and getattr(raw, "_sock", None) is connection
    if reads_connection and hasattr(socket, "MSG_DONTWAIT"):
        raw._sock = _ReadingWithoutWaiting(connection)
        try:
            return bool(rfile.peek(1))
        except OSError:
            return False
        finally:
            raw._sock = connection
    if not hasattr(rfile, "peek"):
        return _socket_has_data(connection)
    timeout = connection.gettimeout()
    connection.settimeout(0.0)
    try:
        return bool(rfile.peek(1))
    except OSError:
        return False
    finally:
        connection.settimeout(timeout)


def _log_if_verbose(handler: http.server.BaseHTTPRequestHandler, format: str, *args: Any) -> None:
    if verbose():
        http.server.BaseHTTPRequestHandler.log_message(handler, format, *args)


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing unless ``$SERVERLAYER_VERBOSE`` is set.

    ``BaseHTTPRequestHandler`` logs every request to stderr, which buries
    test output.
    """

    def log_message(self, format: str, *args: Any) -> None:
        if verbose():
            super().log_message(format, *args)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` of a response sent now; http.server formats it anew
        for each (``email.utils``), where it changes once a second: 2.4 %
        of the instructions of a keep-alive request to the content layer,
        its client's included."""
        global _date_now
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        date = _date_now
        if date[0] != second:
            date = _date_now = (second, super().date_time_string(second))
        return date[1]


#: The second of ``RequestHandler.date_time_string``'s last answer, and that answer.
_date_now: tuple[int, str] = (-1, "")


class _Conversation:
    """A client's connection, and the user's handler object serving it.

    ``BaseHTTPRequestHandler`` keeps its thread for as long as the client
    keeps the connection open. Here the worker waits for the next request
    only until the test ends; then ``handle`` returns with the connection
    still open (``parked``), the server's loop watches it, and whichever
    worker is free when the next request arrives resumes the conversation.
    So no thread outlives the test that started it, and no timeout has to
    guess when a client is gone. A handler class with a ``handle`` of its
    own keeps its thread for the whole connection.

    The handler is an instance of the user's own class, so that
    ``type(self)`` in its methods is the layer's ``request_handler``: what
    serverlayer changes it sets on the instance, and takes off again when
    the connection closes.
    """

    def __init__(
        self, server: HandlerServer, connection: socket.socket, address: Any, client_cert: Any = None
    ) -> None:
        self.server = server
        self.connection = connection
        #: The connection's file descriptor and ends, also once a handler's
        #: setup() detached the socket to wrap it (a TLS handshake may stall there).
        self.descriptor = connection.fileno()
        # Only a handler's own setup() detaches it (two system calls saved
        # per connection for the others).
        self.ends = _ends(connection) if server._handler_sets_up else None
        self.address = address
        self.client_cert = client_cert
        #: The server's handler class when the client connected, and how it
        #: is served: a test may set another (``httpd.RequestHandlerClass``)
        #: while this connection is under way.
        self.handler_class = server.handler_class
        self.shares_threads = server._handler_shares_threads
        self.logs_to_stderr = server._logs_to_stderr
        self.handler: Any = None
        self.parked = False
        #: Since when (``time.monotonic()``) the connection waits for a request.
        self.idle_since = time.monotonic()
        #: The deadline the serving loop closes it at, while it watches it.
        self.watched_until: float | None = None
        #: Whether the server ended its side and waits for the client's end.
        self.lingering = False
        #: Whether ``finish`` left the handler's files open for the next request.
        self._files_open = False
        #: Whether a worker reads a request that has not all arrived yet
        #: (its line, head or body): the end of the test cuts it (``_cut_reads``).
        self.reading_request = False
        #: Whether the end of a test did: what was read of the request is none.
        self.reading_cut = False

    def start(self) -> None:
        """Make the handler, which serves the requests that have arrived."""
        server = self.server
        handler_class = self.handler_class
        handler = self.handler = handler_class.__new__(handler_class)
        record_requests(handler, server._request_log, self.client_cert, cut=lambda: self.reading_cut)
        handler.parse_request = functools.partial(self._parse_request, handler.parse_request)  # type: ignore[method-assign]
        handler.log_error = self._log_error  # type: ignore[method-assign]
        if self.logs_to_stderr:
            handler.log_message = MethodType(_log_if_verbose, handler)  # type: ignore[method-assign]
        if self.shares_threads:
            handler.handle = self._handle  # type: ignore[method-assign]
            handler.finish = self._finish  # type: ignore[method-assign]
        else:
            handler.handle = self._own_handle  # type: ignore[method-assign]
            handler.handle_one_request = functools.partial(self._one_request, handler.handle_one_request)  # type: ignore[method-assign]
        handler_class.__init__(handler, self.connection, self.address, server, **server._handler_arguments)  # type: ignore[misc]

    def resume(self) -> None:
        """Serve the requests that have arrived on the parked connection."""
        try:
            self._handle()
        finally:
            self._finish()

    def adopt_wrapper(self) -> None:
        """Take the socket the handler's ``setup()`` wrapped the connection
        in (``ssl.wrap_socket``, the hand-made HTTPS of many suites) for the
        connection: the original is detached. A wrapper that is no socket
        (a proxy counting bytes, say) leaves the original as it is."""
        wrapper = self.handler.connection
        if wrapper is not self.connection and isinstance(wrapper, socket.socket) and self.connection.fileno() == -1:
            self.server.adopt(self, wrapper)

    def _handle(self) -> None:
        self.adopt_wrapper()
        # Whatever the handler sends is the test's, and is cut when the
        # test ends if its client stopped reading (``writing``).
        with self.server.writing(self.connection):
            self._serve_requests()

    def _serve_requests(self) -> None:
        handler, server = self.handler, self.server
        self.parked = False
        while True:
            handler.close_connection = True  # unless the request says otherwise
            server._activity.start()
            self.reading_request, _this_thread.reading = True, self
            handler.handle_one_request()
            self.reading_request = False
            _this_thread.reading = None
            server._activity.finish()  # an exception finishes in the worker, once recorded
            # The answer is out: the acceptor lets the loop go before it
            # closes the connection, with which its client goes on to the
            # next (_acceptor_answers).
            server._acceptor_answers(False)
            if handler.close_connection:
                return
            if file_holds_data(self.connection, handler.rfile):
                continue
            self.idle_since = time.monotonic()
            arrived = server.await_request(self.connection, self.idle_deadline())
            if arrived is None:
                self.parked = True
                return
            if not arrived:  # idle for the handler's timeout: closes
                return

    def _own_handle(self) -> None:
        """The handler class's own ``handle()``, its writes the test's (``writing``)."""
        self.adopt_wrapper()
        with self.server.writing(self.connection):
            type(self.handler).handle(self.handler)

    def _one_request(self, serve_one: Callable[[], None]) -> None:
        """Serve one request for a handler with a ``handle`` of its own,
        which keeps its thread for the whole connection.

        The request is busy while it is served, not while the handler waits
        for it: the end of a test waits for that test's requests alone, and
        what a request raises is the error of the test that made it, however
        long the client keeps the connection.
        """
        handler, server = self.handler, self.server
        connection = self.connection
        worker: _Worker | None = getattr(_this_thread, "worker", None)
        server._activity.finish()
        if worker is not None:
            worker.holds_connection = True
        try:
            arrived = file_holds_data(connection, handler.rfile) or bool(
                # As long as reading the request line would: the handler's timeout.
                _ready_to_read((connection.fileno(),), connection.gettimeout())
            )
        finally:
            if worker is not None:
                worker.holds_connection = False
        if not arrived:  # what http.server does when reading the request line times out
            handler.log_error(_TIMED_OUT, TimeoutError("timed out"))
            handler.close_connection = True
            return
        server._activity.start()
        self.reading_request, _this_thread.reading = True, self
        serve_one()
        self.reading_request = False
        _this_thread.reading = None
        server._activity.finish()  # one that raised finishes in the worker, once recorded

    def cut_read(self) -> None:
        """End the connection of a request the client left half sent as
        the test ended: what came of it is no request."""
        self.reading_cut = True
        _shut_down(self.connection, self.descriptor, self.ends)

    def _parse_request(self, parse: Callable[[], bool]) -> bool:
        """The handler's ``parse_request``, which reads the request's head
        and (recording it) its body: once it returns, the request is read."""
        try:
            return parse()
        finally:
            self.reading_request = False
            _this_thread.reading = None

    def _log_error(self, format: str, *args: Any) -> None:
        """The handler's ``log_error``, which reports a ``TimeoutError`` of
        the handler's own.

        ``http.server`` catches every ``TimeoutError`` of a request,
        taking it for the client's connection timing out, and only logs
        "Request timed out": one from a call the handler made (a service
        that did not answer in time) failed nothing, and the client got no
        answer. Logged while it is being handled, it goes to
        ``handle_error`` first, which drops it if it came from the client's
        connection after all. (Per connection, not per request: wrapping
        each request's ``do_`` method cost a tenth of a request's time.)
        """
        if format == _TIMED_OUT and sys.exc_info()[0] is not None:
            self.server.handle_error(self.connection, self.address)
        handler = self.handler
        if handler is not None:
            type(handler).log_error(handler, format, *args)

    def idle_deadline(self) -> float | None:
        """When the connection, waiting for a request, is to close: after the
        handler's ``timeout`` (``StreamRequestHandler``'s, None by default).

        Under ``http.server`` that is the socket's timeout, and reading the
        next request times out; here the wait for it ends then, whether a
        worker or the serving loop waits.
        """
        limit = getattr(self.handler or self.handler_class, "timeout", None)
        return None if limit is None else self.idle_since + limit

    def client_sent_its_last(self) -> bool:
        """Whether the client said its request was its last and sent it
        whole: no body announced, nothing after it. Then nothing more comes
        that could make the kernel reset the connection on its close."""
        handler = self.handler
        headers = getattr(handler, "headers", None)
        if headers is None:
            return False
        options = headers.get("Connection", "").lower()
        http_10 = getattr(handler, "request_version", "") == "HTTP/1.0"
        if "close" not in options and not (http_10 and "keep-alive" not in options):
            return False
        if headers.get("Transfer-Encoding") or headers.get("Content-Length", "0").strip() not in ("", "0"):
            return False
        return not _socket_has_data(self.connection)

    def _finish(self) -> None:
        if self.parked:  # the connection lives on: only send what is buffered
            self.handler.wfile.flush()
            self._files_open = True
        else:
            self._files_open = False
            type(self.handler).finish(self.handler)

    def close(self) -> None:
        """Close what the handler left open and take serverlayer's methods off it."""
        handler, self.handler = self.handler, None
        if handler is None:
            return
        for name in ("handle", "finish", "parse_request", "handle_one_request"):
            handler.__dict__.pop(name, None)
        if self._files_open:
            self._files_open = self.parked = False
            type(handler).finish(handler)  # the user's, which may raise


#: The ``_Worker`` whose thread this is, in a worker's thread.
_this_thread = threading.local()


class _Worker:
    """A thread that runs what the server hands it, one item at a time."""

    def __init__(self, server: HandlerServer, name: str, start: bool = True) -> None:
        self.server = server
        self.inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        #: Set when the worker is to end once its current item is done.
        self.retiring = False
        #: Set while it waits for a request of a handler that keeps its
        #: thread for its connection (``_Conversation._one_request``): it
        #: ends with the connection, no sooner.
        self.holds_connection = False
        self.thread = threading.Thread(target=self._run_recorded, name=name, daemon=True)
        if start:
            self.thread.start()

    def _run_recorded(self) -> None:
        try:
            self._run()
        except BaseException as error:
            # A fault of ours, past what handle_error records of handlers:
            # recorded, it fails the test, where the thread's traceback on
            # stderr alone would have passed unnoticed.
            self.server._errors.record(f"{self.thread.name} failed", (type(error), error, error.__traceback__))

    def _run(self) -> None:
        _this_thread.worker = self
        while (item := self.inbox.get()) is not None:
            try:
                item()
            finally:
                self.server._activity.finish()
            if not self.server.worker_idle(self):
                return

    def wake(self) -> None:
        """Have the worker see that it is retiring, if it waits for work."""
        self.inbox.put(None)


class _Acceptor(_Worker):
    """A worker that accepts connections and serves their first requests itself.

    Handed from the serving loop to a worker, a request on a new connection
    costs a thread switch and the loop's turn: more than the rest of a small
    request's work. The acceptor waits on the listening sockets beside the
    loop, registered first and exclusively (``EPOLLEXCLUSIVE``), so that the
    kernel wakes it alone while it waits, and the loop alone while it serves:
    an application calling its own server is still accepted.
    """

    def __init__(self, server: HandlerServer, name: str, accepting: Any, wake_fd: int) -> None:
        self._accepting = accepting
        self._wake_fd = wake_fd
        # Started by the server once it is the server's acceptor: what it
        # says about answering (``_acceptor_answers``) counts only then.
        super().__init__(server, name, start=False)

    def _run(self) -> None:
        _this_thread.worker = self
        server = self.server
        while not (self.retiring or server._stopping):
            events = self._accepting.poll(server.pending_idle_left())
            pending = server.pending
            if not events:  # the connection waited on idle for its handler's timeout
                server.hand_over_pending()  # the loop closes it
            elif pending is not None and any(fd == pending.descriptor for fd, _ in events):
                server.serve_pending()  # its connection came before any new one
            for fd, _ in events:
                if fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):  # a retired acceptor's wake, read already
                        os.eventfd_read(fd)
                elif fd in server._listening:
                    # The one it was woken for. Those that came while it was
                    # answered, the loop accepted; any left, the next poll()
                    # finds at once (without a failed accept() each time).
                    server._accept_and_serve(fd)
        if not server._stopping:
            server.hand_over_waiting()

    def wake(self) -> None:
        os.eventfd_write(self._wake_fd, 1)


def _watch_listening(epoll: Any, sockets: Sequence[socket.socket], watching: bool) -> None:
    """Register ``epoll`` on the listening ``sockets`` after the acceptor's
    (``EPOLLEXCLUSIVE``), or unregister it. Registered while a connection
    waits, it wakes whoever waits on it at once."""
    for listening in sockets:
        try:
            if watching:
                epoll.register(listening, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            else:
                epoll.unregister(listening)
        except (OSError, ValueError):  # closed by the stop (an acceptor outlived it)
            return


def _takes_more(connection: socket.socket) -> bool:
    """Whether ``connection``'s socket has room for more to send now: its
    client reads what it is sent (a write blocks only while it has none)."""
    if not hasattr(select, "poll"):
        return bool(select.select([], [connection], [], 0)[1])
    poller = select.poll()
    poller.register(connection, select.POLLOUT)
    return bool(poller.poll(0))


class _TestsWrite:
    """``HandlerServer.writing``: a plain class, as it runs for every answer
    of a content layer (a generator-based context manager costs more)."""

    __slots__ = ("server", "connection")

    def __init__(self, server: HandlerServer, connection: socket.socket) -> None:
        self.server = server
        self.connection = connection

    def __enter__(self) -> None:
        server, connection = self.server, self.connection
        with server._writing_lock:
            server._writing[connection] = server._writing.get(connection, 0) + 1

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        server, connection = self.server, self.connection
        with server._writing_lock:
            depth = server._writing[connection] - 1  # blocks nest: a content answer inside its request's
            if depth:
                server._writing[connection] = depth
            else:
                del server._writing[connection]
            cut = connection in server._cut
            if cut:
                server._cut.discard(connection)
        if cut and exc_type is None:
            raise BrokenPipeError(errno.EPIPE, "the test ended while its answer was sent to a client not reading it")


def _own_methods(server_class: type) -> frozenset[str]:
    """The public methods and read-only properties serverlayer gives
    ``server_class``, beyond socketserver's (whose names a test may replace,
    as on any socketserver server)."""
    socketservers = (socketserver.BaseServer, socketserver.TCPServer, http.server.HTTPServer)
    theirs = {name for klass in socketservers for name in vars(klass)}
    return frozenset(
        name
        for klass in server_class.__mro__
        if klass.__module__.startswith("serverlayer.")
        for name, member in vars(klass).items()
        if not name.startswith("_")
        and name not in theirs
        and (callable(member) or (isinstance(member, property) and member.fset is None))
    )


class HandlerServer(SocketserverStops, socketserver.BaseServer):
    """Serves connections with a request handler on worker threads.

    The serving loop watches the listening socket and every connection
    between requests; a connection whose client sends something goes to a
    worker, which answers what arrived and gives the connection back. So
    any number of keep-alive connections share the workers fairly, and an
    idle, silent or slow client only ever holds up itself.

    ``threads`` workers start with the server and stay; when a request
    finds none free, another starts. The test runner warns about threads a
    test leaves behind, so those extra workers end, and are joined, when
    the test ends (``test_ended``). So does the acceptor (``_Acceptor``),
    which the loop starts when it accepts a connection, where epoll has
    ``EPOLLEXCLUSIVE``.
    """

    #: Set by a TLS front that forwards its connections here: who is really
    #: at the other end of each, and the port its clients connect to.
    forwarded_clients: ForwardedClients | None = None
    published_port: int | None = None
    #: Set by the layer: the host clients connect to (``http_host``).
    published_host: str | None = None
    #: What connections from now on are served with (``_serve_handler_class``).
    handler_class: type[http.server.BaseHTTPRequestHandler]
    _handler_shares_threads: bool
    _handler_sets_up: bool
    _logs_to_stderr: bool

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        handler_class: type[http.server.BaseHTTPRequestHandler],
        *,
        handler_arguments: dict[str, Any],
        requests: RequestLog,
        errors: ErrorLog,
        threads: int,
        thread_name: str,
    ) -> None:
        host, port = sockets[0].getsockname()[:2]
        super().__init__((host, port), handler_class)
        self._serve_handler_class(handler_class)
        #: Keyword arguments the handler class is called with, besides the connection.
        self._handler_arguments = handler_arguments
        # Not "requests": tests keep state of their own on the server, which
        # handlers reach as self.server, and "httpd.requests = []" with
        # "self.server.requests.append(...)" is the commonest, as under
        # http.server and gocept.httpserverlayer.
        self._request_log = requests
        #: One listening socket per address of the layer's host, all on one port.
        self.sockets = list(sockets)
        self.socket = self.sockets[0]
        # http.server handlers and wsgiref read these.
        self.server_name = host
        self._errors = errors
        self._activity = Activity()
        errors.left_running = self._activity.left_running
        self._stopping = False
        self._aborted: set[socket.socket] = set()
        self._wake_reader, self._wake_writer = socket.socketpair()
        # A byte already waiting wakes the loop as well as another would:
        # a sender never waits for the loop to read (which, stopping, it
        # no longer does).
        self._wake_writer.setblocking(False)
        #: Readable while workers waiting on connections are to park them.
        self._recall_reader, self._recall_writer = socket.socketpair()
        self._recalling = False
        #: Set from ``end_waits`` until ``test_ended``: no worker waits.
        self._test_ending = False
        #: Set by ``test_ended`` for the loop to act on what came before
        #: the test ended (``_catch_up``).
        self._catching_up: threading.Event | None = None
        #: Whether the loop acts on what its last look found (a list set
        #: in place: through the server's ``__setattr__`` twice a turn
        #: costs every request), and what it looks at, where the end of a
        #: test can look too (an epoll object's descriptor; -1 elsewhere).
        self._loop_acting = [False]
        self._loop_waits_on = -1
        #: Set from ``test_ended`` until the next test's ``allow_waits``:
        #: no acceptor starts, as zope.testrunner looks for the threads the
        #: test left behind after its tear-down.
        self._between_tests = False
        #: From ``end_waits`` on, how long the end of the test waits for the
        #: workers: a WebSocket closing at the test's end reads what its
        #: client sent before it saw the close, until then at most.
        self._ending_deadline: Deadline | None = None
        #: The threads waiting on connections (``wait_readable``): a list
        #: changed in place, not a count, which every request would change
        #: through the server's ``__setattr__`` (and not a set: an empty
        #: one costs every idle server 216 bytes, a list 56).
        self._waiting: list[int] = []
        #: Connections a handler is writing a test's answer to (``writing``),
        #: and those of them the end of the test cut. A lock of their own,
        #: taken twice for every answer of a content layer: a plain Lock is
        #: entered without running Python code, the Condition above is not.
        self._writing_lock = threading.Lock()
        self._writing: dict[socket.socket, int] = {}
        self._cut: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        #: Every open connection.
        self._connections: dict[socket.socket, _Conversation] = {}
        #: Connections a worker gives back, for the loop to watch again.
        self._returned: queue.SimpleQueue[_Conversation] = queue.SimpleQueue()
        #: When the connections the loop watches are to close (``_close_idle``), soonest first.
        self._deadlines: list[tuple[float, int, _Conversation]] = []
        self._deadline_order = itertools.count()
        self._thread_name = thread_name
        self._steady_workers = threads
        self._workers_lock = threading.RLock()
        #: Made by the first ``_recall``, which waits on it: a Condition
        #: costs a kilobyte, and most servers sit idle.
        self._workers_changed: threading.Condition | None = None
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        #: Workers a test's end retired while they still served a request.
        self._retired: list[_Worker] = []
        self._started_workers = 0
        with self._workers_lock:
            self._idle = [self._start_worker() for _ in range(threads)]
        self._listening = {listening.fileno(): listening for listening in self.sockets}
        #: Where the acceptor waits (``_Acceptor``): registered on the
        #: listening sockets before the loop is, so that the kernel offers
        #: it a new connection first. None where epoll cannot wake one waiter.
        self._accepting: Any = None
        #: Where the loop waits for connections then, registered second,
        #: and only while the acceptor does not run or answers a request
        #: (``_update_loop_accepting``).
        self._loop_accepting: select.epoll | None = None
        self._loop_registered = False
        #: Held while the loop's registration changes (``_update_loop_accepting``).
        self._registering = threading.Lock()
        self._acceptor: _Acceptor | None = None
        #: Whether the acceptor answers a request now.
        self._acceptor_answering = False
        self._acceptor_wake = -1
        if hasattr(select, "EPOLLEXCLUSIVE"):
            try:
                self._accepting = _exclusive_accepting(self.sockets)
            except OSError:  # a kernel before Linux 4.5
                pass
            else:
                self._loop_accepting = _exclusive_accepting(self.sockets)
                self._loop_registered = True
                self._acceptor_wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._accepting.register(self._acceptor_wake, select.EPOLLIN)

    def _serve_handler_class(self, handler_class: type[http.server.BaseHTTPRequestHandler]) -> None:
        """Make the handlers of connections from now on of ``handler_class``."""
        object.__setattr__(self, "handler_class", handler_class)
        object.__setattr__(self, "_handler_shares_threads",
                           handler_class.handle is http.server.BaseHTTPRequestHandler.handle)
        object.__setattr__(self, "_handler_sets_up", handler_class.setup is not socketserver.StreamRequestHandler.setup)
        #: Whether the handler logs with http.server's ``log_message``, which
        #: writes every request to stderr (a plain ``BaseHTTPRequestHandler``
        #: subclass, ``SimpleHTTPRequestHandler``): quiet unless verbose, as ours.
        object.__setattr__(self, "_logs_to_stderr",
                           handler_class.log_message is http.server.BaseHTTPRequestHandler.log_message)

    def __setattr__(self, name: str, value: Any) -> None:
        # socketserver makes each connection's handler from
        # RequestHandlerClass, so a test could swap it on gocept's
        # HTTPServer; here the server makes them from handler_class, which
        # follows (it was set and ignored).
        if name == "RequestHandlerClass" and "handler_class" in self.__dict__:
            if not _is_handler_class(value):
                raise ConfigurationError(
                    f"{self._errors.owner}: httpd.RequestHandlerClass must be a subclass of"
                    f" http.server.BaseHTTPRequestHandler, not {value!r}."
                )
            self._serve_handler_class(value)
        # A test may keep state of its own on the server, as on gocept's
        # HTTPServer (handlers reach it as self.server), under any name but
        # those of the methods the layer calls: replaced, they failed the
        # layer's tearDown or hung the next request, far from the line
        # that replaced them.
        if name in _SERVER_METHODS:
            raise ConfigurationError(
                f"{self._errors.owner}: httpd.{name} belongs to the server itself, which the layer uses."
                f" Keep the test's state on the server under another name, such as httpd.{name}_state."
            )
        super().__setattr__(name, value)

    def fileno(self) -> int:
        return self.socket.fileno()

    @property
    def stopping(self) -> bool:
        """Whether the server is stopping (or stopped)."""
        return self._stopping

    @property
    def server_port(self) -> int:
        """The port clients connect to: the TLS front's, behind one."""
        return self.published_port or self._bound_port

    @property
    def server_address(self) -> tuple[str, int]:  # type: ignore[override]
        """The host and port clients connect to, as ``server_port``."""
        return (self.published_host or self._bound_host, self.server_port)

    @server_address.setter
    def server_address(self, address: tuple[str, int]) -> None:  # socketserver's __init__ sets it
        self._bound_host, self._bound_port = address[0], address[1]

    # The serving loop.

    def serve(self, ready: Callable[[], None]) -> None:
        self.serving_thread = threading.current_thread()
        self._serve_loop(ready)

    def _serve_loop(self, ready: Callable[[], None]) -> None:
        with selectors.DefaultSelector() as selector:
            loop_accepting = self._loop_accepting
            if loop_accepting is not None:
                selector.register(loop_accepting, selectors.EVENT_READ)
            else:
                for listening in self.sockets:
                    selector.register(listening, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            self._loop_waits_on = selector.fileno() if hasattr(selector, "fileno") else -1
            acting = self._loop_acting
            ready()
            while not self._stopping:
                events = selector.select(self._until_next_deadline())
                acting[0] = True
                for key, _ in events:
                    if self._stopping:
                        break
                    self._on_ready(selector, key)
                if self._deadlines:
                    self._close_idle(selector)
                if self._catching_up is not None:
                    self._catch_up(selector)
                acting[0] = False

    def _on_ready(self, selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        """Act on what ``key`` has ready."""
        loop_accepting = self._loop_accepting
        if loop_accepting is not None and key.fileobj is loop_accepting:
            accepted = [self._accept(selector, self._listening[fd]) for fd, _ in loop_accepting.poll(0)]
            # Only for a connection it took: woken for one the acceptor then
            # took, the loop may look only after the test ended (and retired
            # the acceptor), and an acceptor started then outlives the test.
            if any(accepted):
                self._start_acceptor()
        elif key.fileobj in self.sockets:
            self._accept(selector, key.fileobj)
        elif key.fileobj is self._wake_reader:
            self._watch_returned(selector)
        else:
            self._serve_ready(selector, *key.data)

    def _serve_ready(
        self, selector: selectors.BaseSelector, conversation: _Conversation, serve: Callable[[], None]
    ) -> None:
        """Hand a worker the request that came on ``conversation``'s connection (or close it, ended)."""
        if conversation.lingering:
            self._drain(selector, conversation)
            return
        selector.unregister(conversation.connection)
        conversation.watched_until = None
        if _client_left(conversation.connection):
            self._close(conversation.connection)
        else:
            self._dispatch(serve)

    def _catch_up(self, selector: selectors.BaseSelector) -> None:
        """Act on every request that came before the test ended (``test_ended``).

        The loop may not have looked since: a client that sent (part of) a
        request as its test ended would otherwise get a worker only after
        the end of the test retired the workers, one that outlives the test.
        """
        caught_up, self._catching_up = self._catching_up, None
        assert caught_up is not None
        self._watch_returned(selector)  # the connections workers parked as the test ended
        # Twice: a connection accepted in the first look, its request in the second.
        for _ in range(2):
            for key, _ in selector.select(0):
                self._on_ready(selector, key)
        caught_up.set()

    def _watch(
        self, selector: selectors.BaseSelector, conversation: _Conversation, serve: Callable[[], None] | None
    ) -> None:
        """Watch ``conversation``'s connection for its next request (or,
        lingering, for its client's end), until its deadline."""
        selector.register(conversation.connection, selectors.EVENT_READ, (conversation, serve))
        deadline = conversation.watched_until = conversation.idle_deadline()
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._deadline_order), conversation))

    def _until_next_deadline(self) -> float | None:
        return max(0.0, self._deadlines[0][0] - time.monotonic()) if self._deadlines else None

    def _close_idle(self, selector: selectors.BaseSelector) -> None:
        """Close the watched connections idle past their handler's timeout."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, conversation = heapq.heappop(self._deadlines)
            if conversation.watched_until == deadline:  # not served (or closed) since
                conversation.watched_until = None
                selector.unregister(conversation.connection)
                self._close(conversation.connection)

    def _accept(self, selector: selectors.BaseSelector, listening: socket.socket) -> bool:
        """Accept a connection on ``listening``, in the loop; False if there was none."""
        try:
            connection, address = listening.accept()
        except OSError:  # the client gave up before we got to it, or the acceptor took it
            return False
        conversation = self._converse(connection, address)
        serve = functools.partial(self._serve, conversation, conversation.start)
        if conversation.shares_threads:
            self._watch(selector, conversation, serve)  # HTTP clients speak first
        else:
            self._dispatch(serve)  # a handler of its own may speak first
        return True

    def _start_acceptor(self) -> None:
        """Start the acceptor if it is not running: the loop accepted a connection."""
        with self._workers_lock:
            # Nor as the test ends, or after: it would outlive the test.
            if self._acceptor is not None or self._stopping or self._test_ending or self._between_tests:
                return
            acceptor = self._acceptor = _Acceptor(
                self, f"{self._thread_name} acceptor", self._accepting, self._acceptor_wake
            )
            with self._registering:
                self._acceptor_answering = False
            self._update_loop_accepting()
            self._workers.append(acceptor)
            acceptor.thread.start()

    def _accept_and_serve(self, fd: int) -> bool:
        """Accept a connection on the listening socket ``fd``, in the
        acceptor, and serve the request that came with it; False if there
        was none to accept."""
        try:
            connection, address = self._listening[fd].accept()
        except OSError:  # none, or the loop took it
            return False
        self.hand_over_pending()
        conversation = self._converse(connection, address)
        if conversation.shares_threads and _socket_has_data(connection):
            self._serve_accepted(conversation)
        elif conversation.shares_threads:
            # Its request is still coming: a client in the same process (a
            # test calling its layer) needs the interpreter lock to send it,
            # which the acceptor holds. The acceptor waits for it beside
            # the listening sockets; a connection that comes first goes to
            # the loop instead (it came first, and the acceptor is about to
            # serve the next).
            self._wait_on(conversation)
        else:
            self._dispatch(functools.partial(self._serve, conversation, conversation.start))
        return True

    def _serve_accepted(self, conversation: _Conversation) -> None:
        self._acceptor_answers(True)
        try:
            self._serve(conversation, conversation.start if conversation.handler is None else conversation.resume)
        finally:
            self._activity.finish()
            self._acceptor_answers(False)

    # The loop accepts new connections only while the acceptor answers a
    # request (which may take long: a handler calling its own server waits
    # for the loop to accept) or does not run. The kernel wakes the loop
    # for a connection whenever the acceptor is not waiting for one, also
    # when it is about to look again (with a client in the server's
    # process, it often waits for the interpreter lock to do so): the loop
    # then took two fifths of a client's new connections, each handed to
    # a worker.

    def _acceptor_answers(self, answering: bool) -> None:
        """Say whether the acceptor answers a request now (the acceptor;
        in any other thread, nothing)."""
        # Every worker calls this after each request: it looks without a
        # lock, and the acceptor takes ``_registering`` alone, not
        # ``_workers_lock``, which every worker takes twice a request
        # (``wait_readable``): held across the system calls that
        # (un)register the loop, it kept them waiting (eight client threads
        # in the server's process: a worker blocked on it about four times
        # a request).
        worker = getattr(_this_thread, "worker", None)
        if worker is None or worker is not self._acceptor or answering == self._acceptor_answering:
            return
        with self._registering:
            if worker is self._acceptor:  # not one retired meanwhile
                self._acceptor_answering = answering
                self._register_loop_as_due()

    def _update_loop_accepting(self) -> None:
        """Register the loop's epoll object on the listening sockets, or
        not, as the acceptor's state asks (``_acceptor`` just changed).
        Registered while a connection waits, it wakes the loop at once."""
        with self._registering:
            self._register_loop_as_due()

    def _register_loop_as_due(self) -> None:
        # Called with ``_registering`` held: whoever changes the acceptor's
        # state registers after the change, so the last to register saw it.
        accepts = self._acceptor is None or self._acceptor_answering
        epoll = self._loop_accepting
        if epoll is None or accepts == self._loop_registered or self._stopping:
            return
        self._loop_registered = accepts
        _watch_listening(epoll, self.sockets, accepts)

    #: The connection the acceptor waits for a request on, if any: one it
    #: accepted before its request came, or a keep-alive one whose request
    #: it answered (``_keeps``).
    pending: _Conversation | None = None

    def _wait_on(self, conversation: _Conversation) -> None:
        self.pending = conversation
        self._accepting.register(conversation.descriptor, select.EPOLLIN)

    def pending_idle_left(self) -> float | None:
        """How long the acceptor may wait for the connection it waits on
        before its handler's ``timeout`` passes (None: no limit)."""
        pending = self.pending
        deadline = None if pending is None else pending.idle_deadline()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _keeps(self, conversation: _Conversation) -> bool:
        """Whether the acceptor, having answered a keep-alive request on
        ``conversation``, waits for its next request (or its end) beside
        the listening sockets, rather than giving it back to the loop: a
        client that opens a connection per request and closes it after the
        answer (``requests.get``) then costs the loop nothing."""
        acceptor = self._acceptor
        if acceptor is None or acceptor.retiring or self.pending is not None:
            return False
        if getattr(_this_thread, "worker", None) is not acceptor:
            return False
        self._wait_on(conversation)
        return True

    def serve_pending(self) -> None:
        """Serve the request that came on the connection the acceptor waits on."""
        conversation, self.pending = self.pending, None
        assert conversation is not None
        self._accepting.unregister(conversation.descriptor)
        if _socket_has_data(conversation.connection):
            self._serve_accepted(conversation)
        elif conversation.handler is not None:  # the end of one it kept: the loop never saw it
            self._close(conversation.connection)
        else:  # its end, or an error: the loop closes it
            self._give_back(conversation)

    def hand_over_pending(self) -> None:
        """Have the loop wait for the request of the connection the acceptor waited on."""
        conversation, self.pending = self.pending, None
        if conversation is not None:
            self._accepting.unregister(conversation.descriptor)
            self._give_back(conversation)

    def hand_over_waiting(self) -> None:
        """Give the loop the connections waiting to be accepted, as the
        acceptor ends: the kernel may have offered them to it alone."""
        self.hand_over_pending()
        for listening in self.sockets:
            while True:
                try:
                    connection, address = listening.accept()
                except OSError:  # none left
                    break
                conversation = self._converse(connection, address)
                if conversation.shares_threads:
                    self._give_back(conversation)  # the loop waits for its request
                else:
                    self._dispatch(functools.partial(self._serve, conversation, conversation.start))

    def _converse(self, connection: socket.socket, address: Any) -> _Conversation:
        client_cert = None
        if self.forwarded_clients is not None:
            client_cert = self.forwarded_clients.certificate_of(address)
            address = self.forwarded_clients.client_of(address, address)
        # Handlers write the status line, headers and body separately; with
        # Nagle's algorithm each keep-alive response would wait for the
        # client's delayed ACK (40 ms on Linux).
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if type(connection) is socket.socket:  # the same object, its reads those of a _Connection
            connection.__class__ = _Connection
        conversation = _Conversation(self, connection, address, client_cert)
        with self._connections_lock:
            self._connections[connection] = conversation
        return conversation

    def _watch_returned(self, selector: selectors.BaseSelector) -> None:
        try:
            # Without waiting: the end of a test's catch-up (``_catch_up``)
            # looks whether a wake-up came or not.
            self._wake_reader.recv(4096, _DONT_WAIT)
        except OSError:  # none came (BlockingIOError), or closed: stopping
            pass
        while True:
            try:
                conversation = self._returned.get_nowait()
            except queue.Empty:
                return
            if conversation.connection.fileno() == -1:
                continue
            if conversation.lingering:
                conversation.idle_since = time.monotonic()
                self._watch(selector, conversation, None)
            else:
                serve = conversation.start if conversation.handler is None else conversation.resume
                self._watch(selector, conversation, functools.partial(self._serve, conversation, serve))

    def adopt(self, conversation: _Conversation, connection: socket.socket) -> None:
        """Make ``connection``, which wraps ``conversation``'s socket, its connection."""
        with self._connections_lock:
            self._connections.pop(conversation.connection, None)
            conversation.connection = connection
            self._connections[connection] = conversation

    def _give_back(self, conversation: _Conversation) -> None:
        """Have the loop watch ``conversation``'s connection for its next request."""
        self._returned.put(conversation)
        self._wake_loop()

    def _wake_loop(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:  # full: the loop wakes anyway; or closed: stopping, release closes all
            pass

    # Workers.

    def _start_worker(self) -> _Worker:
        # Called with _workers_lock held.
        self._started_workers += 1
        worker = _Worker(self, f"{self._thread_name} worker {self._started_workers}")
        self._workers.append(worker)
        return worker

    def _dispatch(self, item: Callable[[], None]) -> None:
        """Hand ``item`` to an idle worker, starting one if none is idle."""
        with self._workers_lock:
            worker = self._idle.pop() if self._idle else self._start_worker()
        worker.inbox.put(item)

    def worker_idle(self, worker: _Worker) -> bool:
        """Take ``worker`` back into the pool; False if it is to end instead."""
        with self._workers_lock:
            if worker.retiring:
                return False
            self._idle.append(worker)
            return True

    def await_request(self, connection: socket.socket, deadline: float | None = None) -> bool | None:
        """Wait for the next request on ``connection``: True once it comes,
        False if ``deadline`` (``time.monotonic()``) passes first, None to park it instead."""
        if getattr(_this_thread, "worker", None) is self._acceptor:
            return None  # parked at once: the acceptor waits for it beside the listening sockets (_keeps)
        return self.wait_readable(connection, None if deadline is None else max(0.0, deadline - time.monotonic()))

    def wait_readable(
        self, connection: socket.socket | None, timeout: float | None = None, *, idle: bool = False
    ) -> bool | None:
        """Wait until ``connection`` is readable: True; False if ``timeout``
        passes first; None as soon as the test ends or the server stops.

        A handler that holds its connection between messages (a WebSocket,
        a paced stream) waits here, so that the end of the test frees its
        worker rather than leaving the thread behind. Without a connection
        (one that is readable already, with a request pipelined behind the
        answer being paced) it waits for the timeout, the test's end or the
        stop alone.

        With ``idle``, the request being served counts as finished while it
        waits (an open WebSocket between messages), and as running again
        before the test's end can find the wait over: marked in the lock
        that the end of the test takes, so that its wait for quiet never
        sees the handler idle on its way out of a wait it was recalled from.
        """
        worker: _Worker | None = getattr(_this_thread, "worker", None)
        with self._workers_lock:
            if self._recalling or self._test_ending or self._stopping or (worker is not None and worker.retiring):
                return None
            self._waiting.append(threading.get_ident())
            if idle:
                self._activity.finish()
        try:
            recall = self._recall_reader.fileno()
            ready = _ready_to_read((recall,) if connection is None else (connection.fileno(), recall), timeout)
        finally:
            with self._workers_lock:
                if idle:
                    self._activity.start()
                self._waiting.remove(threading.get_ident())
                if self._recalling and self._workers_changed is not None:  # test_ended waits for the last one
                    self._workers_changed.notify_all()
        if connection is not None and connection.fileno() in ready:
            return True
        return None if ready else False

    def writing(self, connection: socket.socket) -> _TestsWrite:
        """Mark writes to ``connection`` as the test's, to be cut short when
        it ends if the client is not reading them (``with server.writing(connection): ...``).

        A client that stops reading blocks a write, and no wait of the
        server's can end that: the worker would outlive its test. When the
        test ends (``end_waits``, and ``test_ended`` for writes begun since)
        the server ends its side of such a connection if its client leaves
        what was sent unread (the socket takes no more), which ends the
        write with ``BrokenPipeError``, as a client gone would. A write that
        ended meanwhile raises it as it leaves the block, so that the
        handler does not keep the connection for the next test.

        Every request a worker serves runs inside such a block (of the
        handler's connection once its ``setup()`` ran), so that any handler's
        writes are cut; blocks nest, and the content and static layers mark
        their answers too, for a cut to end the answer it cut.
        """
        return _TestsWrite(self, connection)

    def _cut_writes(self) -> None:
        """End the writes under way (``writing``) whose client is not reading."""
        with self._writing_lock:
            for connection in self._writing:
                try:
                    if _takes_more(connection):
                        continue  # the client reads: the write ends by itself
                    connection.shutdown(socket.SHUT_WR)
                except (OSError, ValueError):  # gone already
                    continue
                self._cut.add(connection)

    def _cut_reads(self) -> None:
        """End the connections whose client sent part of a request and
        nothing more: the test that sent it is over, and the worker reading
        the rest would wait for ever (http.server reads without a timeout).
        A worker reading a ``_Connection`` ends it itself as the test ends;
        this is for the others (a handler's own TLS wrapper).

        Only once the end of the test waited for its requests in vain: a
        request whose bytes have all arrived may still be being read from
        the worker's buffer, which nothing tells apart from a worker waiting
        for more; by then such a request is served."""
        with self._connections_lock:
            stalled = [
                conversation for conversation in self._connections.values()
                if conversation.reading_request and not _socket_has_data(conversation.connection)
            ]
        for conversation in stalled:
            conversation.cut_read()

    def test_ended(self, timeout: float) -> None:
        """Park the connections workers wait on, then end the workers
        started beyond the steady ones, and join them; again for those the
        loop then hands what the test sent last (``_catch_up``).

        A worker still serving a request ends when its request does;
        joining it waits at most ``timeout``, then the test runner names it.
        """
        deadline = Deadline(timeout)
        self._retire_workers(deadline)
        self._loop_caught_up(deadline)
        with self._workers_lock:
            started_since = len(self._workers) > self._steady_workers
        if started_since:
            # Not cutting reads: what the loop handed on came whole or in
            # part, and without a wait for quiet a worker still reading a
            # whole one from its buffer looks the same as one waiting for
            # the rest (which, a _Connection's, cuts itself as it would wait).
            self._retire_workers(deadline, cut_reads=False)
        with self._workers_lock:
            self._test_ending = False
            self._between_tests = True
            self._ending_deadline = None

    def _loop_caught_up(self, deadline: Deadline) -> None:
        """Have the loop act on every request that came before now (``_catch_up``)."""
        loop = getattr(self, "serving_thread", None)
        if self._stopping or loop is None or loop is threading.current_thread() or not loop.is_alive():
            return
        # Most often the loop waits with nothing to act on, and asking it
        # would cost the end of every test a round trip to its thread (four
        # times what the end of a test costs otherwise). What it acted on
        # before this look started its workers by now, which test_ended sees.
        waits_on = self._loop_waits_on
        if waits_on != -1 and not _ready_to_read((waits_on,), 0) and not self._loop_acting[0]:
            return
        caught_up = self._catching_up = threading.Event()
        self._wake_loop()
        caught_up.wait(deadline.remaining())

    def _retire_workers(self, deadline: Deadline, *, cut_reads: bool = True) -> None:
        """End the workers started beyond the steady ones, and join them."""
        if cut_reads:
            self._cut_reads()
        with self._workers_lock:
            self._cut_writes()
            # Retiring first: a worker between a request and its wait for
            # the next one then parks its connection instead of waiting.
            extra = self._workers[self._steady_workers:]
            del self._workers[self._steady_workers:]
            for worker in extra:
                worker.retiring = True
                if worker in self._idle:
                    self._idle.remove(worker)
                    worker.inbox.put(None)
                elif worker is self._acceptor:
                    worker.wake()
            self._acceptor = None
            self._update_loop_accepting()
            self._recall(deadline)
        for worker in extra:
            if not worker.holds_connection:
                worker.thread.join(deadline.remaining())
        with self._workers_lock:
            # Those still serving a request end with it: the stop joins them.
            self._retired = [worker for worker in [*self._retired, *extra] if worker.thread.is_alive()]

    def end_waits(self, timeout: float) -> None:
        """End every worker's wait on its connection (``wait_readable``)
        now, and any it would start before the test has ended: the test is
        over. A content layer's delays and streams then end before the
        end-of-test check waits for the requests still running."""
        with self._workers_lock:
            self._test_ending = True
            self._ending_deadline = Deadline(timeout)
            self._cut_writes()
            self._recall(Deadline(timeout))

    def allow_waits(self) -> None:
        """Let workers wait on their connections again (``end_waits``)."""
        with self._workers_lock:
            self._test_ending = self._between_tests = False
            self._ending_deadline = None

    def _recall(self, deadline: Deadline) -> None:
        """Have the workers waiting on connections stop waiting. Called
        with ``_workers_lock`` held."""
        if self._workers_changed is None:
            self._workers_changed = threading.Condition(self._workers_lock)
        self._recalling = True
        self._recall_writer.send(b"\0")
        self._workers_changed.wait_for(lambda: not self._waiting, deadline.remaining())
        self._recall_reader.recv(1)
        self._recalling = False

    def _serve(self, conversation: _Conversation, serve: Callable[[], None]) -> None:
        """Run ``serve`` (start or resume ``conversation``); then park or close it."""
        if not conversation.shares_threads:
            self._activity.start()  # a handler with its own handle(): busy for the whole connection
        try:
            serve()
        except BaseException:
            self.handle_error(conversation.connection, conversation.address)
            conversation.parked = False
        if conversation.parked and not self._stopping:
            if not self._keeps(conversation):
                self._give_back(conversation)
        elif conversation.client_sent_its_last():
            self._close(conversation.connection)
        else:
            self._linger(conversation)

    def _close(self, connection: socket.socket) -> None:
        with self._connections_lock:
            conversation = self._connections.pop(connection, None)
        try:
            if conversation is not None:
                conversation.close()
        except Exception:  # a handler's finish(), here maybe in the serving loop, which must go on
            self.handle_error(connection, conversation.address if conversation is not None else ("?", 0))
        finally:
            self.shutdown_request(connection)

    # The end of a connection that the server ends.
    #
    # socketserver ends the server's side, then closes the socket, with
    # whatever the client sent after the request its handler answered
    # (more requests, a body the handler did not read) unread: the kernel
    # then resets the connection and drops what it had not sent yet of the
    # answer. Here the server ends its side, and the loop reads and drops
    # what still comes until the client ends its side too, which it does
    # once it has the answer; the server's stop closes at once.

    def _linger(self, conversation: _Conversation) -> None:
        """End the server's side of ``conversation``; close it at the client's end."""
        connection = conversation.connection
        if connection in self._aborted or self._stopping:
            self._close(connection)
            return
        conversation.close()
        try:
            connection.shutdown(socket.SHUT_WR)
        except OSError:  # gone already
            self._close(connection)
            return
        conversation.lingering = True
        self._give_back(conversation)

    def _drain(self, selector: selectors.BaseSelector, conversation: _Conversation) -> None:
        """Drop what the client of a lingering connection sent; close it at its end."""
        connection = conversation.connection
        try:
            data = connection.recv(65536, getattr(socket, "MSG_DONTWAIT", 0))
        except BlockingIOError:
            return
        except OSError:  # reset
            data = b""
        if not data:
            selector.unregister(connection)
            conversation.watched_until = None
            with self._connections_lock:
                self._connections.pop(connection, None)
            connection.close()

    # Errors and connections.

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Record what a handler raised; a client hanging up is no error.

        Also while the server stops: a request the layer's last test left
        running that raises while ``tearDown`` waits for it fails the
        tear-down, as on a wsgi layer (errors.rst). Dropped, it was lost
        at the end of every plain test function under pytest, whose layer
        is torn down after each. What the stop itself does to a handler
        (its connection shut down under it) raises a ``DISCONNECTS`` error,
        or a read finds the end of the stream, which is no error.
        """
        exc_type, exc, tb = sys.exc_info()
        if exc_type is None or exc is None:
            return
        with self._connections_lock:
            conversation = self._connections.get(request)
        handler = conversation.handler if conversation is not None else None
        # While the server stops, a disconnect is what the stop did to the
        # handler's connection (shut down or closed under it).
        if isinstance(exc, DISCONNECTS) and (
            self._stopping
            or _raised_by_connection(
                tb,
                (
                    request,
                    getattr(handler, "connection", None),
                    getattr(handler, "request", None),
                    # The handler's read file: closed by its finish() before
                    # this runs, its SocketIO no longer holds the connection.
                    getattr(getattr(handler, "rfile", None), "raw", None),
                    # Its write file where ``wbufsize`` buffers it: finish()
                    # closes it, and the flush that raised let go of the
                    # connection too (the client hung up on a buffered answer).
                    getattr(getattr(handler, "wfile", None), "raw", None),
                ),
            )
        ):
            return
        command, path = getattr(handler, "command", None), getattr(handler, "path", None)
        serving = f"{command} {path}" if command and path else "a request"
        self._errors.record(
            f"{self.handler_class.__name__} raised while serving {serving} from {client_address[0]}",
            (exc_type, exc, tb),
            left_running=self._activity.left_running,  # also once the layer is set up again
        )
        if verbose():
            super().handle_error(request, client_address)

    def abort_connection(self, connection: socket.socket) -> None:
        """Close ``connection`` with a TCP reset once its handler returns,
        as a crashing server or a middlebox would."""
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._aborted.add(connection)

    def shutdown_request(self, request: Any) -> None:
        if request in self._aborted:
            self._aborted.discard(request)  # no FIN first: the client sees the reset
        else:
            try:
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        request.close()

    # Stopping.

    def wait_quiet(self, timeout: float) -> bool:
        return self._activity.wait_quiet(timeout)

    def give_up(self, test: str = "") -> None:
        self._activity.give_up(test)

    def request_stop(self) -> None:
        self._stopping = True
        self._wake_loop()
        # Wakes the handlers waiting without a connection (``wait_readable``);
        # those waiting on one wake as ``release`` shuts it down. Never read:
        # every wait from now on ends at once.
        try:
            self._recall_writer.send(b"\0", socket.MSG_DONTWAIT)
        except OSError:  # a byte waits already; or released
            pass

    def release(self, timeout: float) -> None:
        for listening in self.sockets:
            listening.close()
        # Unblock workers reading a request or writing to a client that
        # stopped reading.
        with self._connections_lock:
            for connection, conversation in self._connections.items():
                _shut_down(connection, conversation.descriptor, conversation.ends)
        with self._workers_lock:
            workers, self._workers, self._idle = self._workers, [], []
            for worker in workers:
                worker.retiring = True
                worker.wake()
            workers += self._retired
            self._retired = []
        deadline = Deadline(timeout)
        for worker in workers:
            worker.thread.join(deadline.remaining())
        with self._connections_lock:
            connections, self._connections = self._connections, {}
        for connection, conversation in connections.items():
            try:
                conversation.close()
            except Exception as error:  # a handler's finish(): recorded, and the rest still closes
                self._errors.record(
                    f"{self.handler_class.__name__}.finish() raised as the server stopped",
                    (type(error), error, error.__traceback__),
                )
            finally:
                connection.close()
        for sock in (self._wake_reader, self._wake_writer, self._recall_reader, self._recall_writer):
            sock.close()
        if self._accepting is not None:
            self._accepting.close()
            cast(select.epoll, self._loop_accepting).close()
            os.close(self._acceptor_wake)


#: What a test may not set on a custom, static or content layer's ``httpd``.
_SERVER_METHODS = _own_methods(HandlerServer)


def _raised_by_connection(tb: TracebackType | None, connections: Iterable[object]) -> bool:
    """Whether the exception of ``tb`` was raised working on one of
    ``connections`` (a client's): its innermost frame has the connection,
    or an object holding it (a handler, its ``rfile`` and ``wfile``), or
    the server side of a TLS connection (what a handler's ``setup()`` wraps
    the client's connection in, which a client leaving during the
    handshake fails before the handler holds it; a handler's own calls to
    other services are TLS clients).

    A ``ConnectionError`` or ``TimeoutError`` from the client's connection
    means that the client went away, or stalled past the handler's
    ``timeout``. One from a connection of the handler's own, to a service
    that refused, hung up or did not answer in time, is the handler's
    error: its client is still there, and gets no answer. Without a
    traceback to go by, the exception is taken for the client's.
    """
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    ours = [each for each in connections if each is not None]
    for value in tb.tb_frame.f_locals.values():
        if any(value is each for each in ours):
            return True
        if isinstance(value, ssl.SSLSocket) and value.server_side:
            return True
        try:
            held = vars(value).values()  # not getattr: no __getattr__ of the handler's runs
        except TypeError:  # no __dict__
            continue
        if any(item is each for item in held for each in ours):
            return True
    return False


def _is_handler_class(handler: object) -> bool:
    return isinstance(handler, type) and issubclass(handler, http.server.BaseHTTPRequestHandler)


#: What ``custom.Layer`` serves: a handler class, or a partial of one. The
#: partial's type is left open: ``functools.partial`` is invariant, so
#: ``partial[BaseHTTPRequestHandler]`` refused a partial of any subclass
#: (``partial(SimpleHTTPRequestHandler, directory=...)``) under a user's type
#: checker; ``_check_handler`` refuses a partial of anything else at run time.
HandlerFactory = type[http.server.BaseHTTPRequestHandler] | functools.partial[Any]


class Layer(HTTPLayer):
    """Serves ``request_handler``, a ``BaseHTTPRequestHandler`` subclass.

    Publishes ``request_handler`` besides the ``http_*`` resources.
    Any number of connections are served at once: a worker thread starts
    when a request finds none free, and ends with the test. ``threads`` is
    how many workers stay between tests; none by default, which keeps an
    idle server to the one thread of its loop.

    As with gocept.httpserverlayer, positional arguments after the handler
    are plone.testing's ``bases``, ``name`` and ``module``.
    """

    #: A ``BaseHTTPRequestHandler`` subclass, or a ``functools.partial`` of
    #: one with keyword arguments (``partial(SimpleHTTPRequestHandler,
    #: directory=...)``, as Python's documentation serves a directory).
    request_handler: HandlerFactory | None = None
    threads: int = 0

    def __init__(
        self,
        request_handler: HandlerFactory | None = None,
        bases: Iterable[plone.testing.Layer] | None = None,
        name: str | None = None,
        module: str | None = None,
        *,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(bases=bases, name=name, module=module, **kwargs)
        if request_handler is not None:
            self.request_handler = request_handler
        if threads is not None:
            self.threads = threads
        if self.request_handler is not None:
            self._check_handler(self.request_handler)
        whole_number(self.threads, owner=repr(self), setting="threads", minimum=0)

    def _check_handler(self, handler: object) -> None:
        if isinstance(handler, functools.partial) and _is_handler_class(handler.func):
            # gocept.httpserverlayer's HTTPServer called whatever it was
            # given, so a partial of a handler class served there. Here the
            # class is taken apart from its arguments (serverlayer makes the
            # handler object itself); arguments before the connection's
            # would have no place.
            if handler.args:
                raise ConfigurationError(
                    f"{self!r}: request_handler {handler!r} passes positional arguments,"
                    " which would come before the connection's. Give the handler class"
                    " keyword arguments only: functools.partial(Handler, name=value)."
                )
            return
        if not _is_handler_class(handler):
            raise ConfigurationError(
                f"{self!r}: request_handler must be a subclass of"
                f" http.server.BaseHTTPRequestHandler, not {handler!r}."
                " Subclass serverlayer.custom.RequestHandler and pass the class."
            )

    def setUp(self) -> None:
        if self.request_handler is None:
            raise ConfigurationError(
                f"{self!r} has no request handler to serve. Pass one:"
                " custom.Layer(MyHandler), where MyHandler subclasses"
                " serverlayer.custom.RequestHandler."
            )
        self._check_handler(self.request_handler)
        super().setUp()
        self.publish({"request_handler": self.request_handler})

    def handler_arguments(self) -> dict[str, Any]:
        """Keyword arguments the handler class is called with, besides the connection."""
        return {}

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        httpd = resources["httpd"]
        if isinstance(httpd, HandlerServer):
            httpd.published_host = httpd.server_name = host
        return resources

    def testSetUp(self) -> None:
        super().testSetUp()
        httpd = self.own_server()
        if isinstance(httpd, HandlerServer):
            httpd.allow_waits()  # should the last test's check have come after its test_ended

    def check_after_test(self) -> None:
        # The test is over: handlers waiting for their clients (a delay, a
        # stream, a WebSocket) stop, and writes to clients that stopped
        # reading (a page left open with its media half loaded) are cut, so
        # that the server errors' check does not wait for them in vain.
        httpd = self.own_server()
        if isinstance(httpd, HandlerServer):
            httpd.end_waits(self.quiet_timeout)
        super().check_after_test()

    def make_server(self, sockets: Sequence[socket.socket]) -> HandlerServer:
        handler = self.request_handler
        assert handler is not None
        arguments = self.handler_arguments()
        if isinstance(handler, functools.partial):  # its class, called with its keywords
            arguments = {**handler.keywords, **arguments}
            handler = cast("type[http.server.BaseHTTPRequestHandler]", handler.func)
        return HandlerServer(
            sockets,
            handler,
            handler_arguments=arguments,
            requests=self.requests,
            errors=self.server_errors,
            threads=self.threads,
            thread_name=f"serverlayer {self.__module__}.{self.__name__}",
        )
