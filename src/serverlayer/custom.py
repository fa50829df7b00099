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

import functools
import http.server
import queue
import selectors
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from serverlayer.errors import ConfigurationError
from serverlayer.layer import HTTPLayer, positive_number
from serverlayer.recording import recording_handler
from serverlayer.reporting import ErrorLog, verbose
from serverlayer.server import Activity, Deadline

#: Exceptions that only mean the client went away.
DISCONNECTS = (ConnectionError, TimeoutError)

HandlerFactory = Callable[..., socketserver.BaseRequestHandler]

#: How long an idle connection keeps its worker while another one waits.
IDLE_GRACE = 0.25
#: How long a worker waits for more of a request a client has begun to
#: send: a client that stalls half-way must not keep a worker for ever.
READ_TIMEOUT = 1.0
#: How often a worker waiting on an idle connection looks at the queue.
IDLE_CHECK_INTERVAL = 0.05


def _has_buffered_data(connection: socket.socket, rfile: Any) -> bool:
    """Whether ``rfile`` holds, or the socket has ready, bytes of a next request."""
    timeout = connection.gettimeout()
    connection.settimeout(0.0)
    try:
        return bool(rfile.peek(1))
    except OSError:
        return False
    finally:
        connection.settimeout(timeout)


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing unless ``$SERVERLAYER_VERBOSE`` is set.

    ``BaseHTTPRequestHandler`` logs every request to stderr, which buries
    test output.
    """

    def log_message(self, format: str, *args: Any) -> None:
        if verbose():
            super().log_message(format, *args)


class _SharesItsThread:
    """``BaseHTTPRequestHandler.handle``, asking the server before each request.

    So that an idle keep-alive connection, or one that never says anything,
    gives its worker back when another connection needs it.
    """

    server: HandlerServer
    connection: socket.socket
    rfile: Any
    close_connection: bool

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection and self.server.await_next_request(self.connection, self.rfile):
            self.server.activity.start()
            self.handle_one_request()  # type: ignore[attr-defined]
            self.server.activity.finish()  # an exception finishes in _work, once recorded


def sharing_threads(handler: type[http.server.BaseHTTPRequestHandler]) -> type[http.server.BaseHTTPRequestHandler]:
    """``handler`` made to share the pool, unless it handles connections its own way."""
    if handler.handle is not http.server.BaseHTTPRequestHandler.handle:
        return handler
    return type(handler.__name__, (_SharesItsThread, handler), {"__module__": handler.__module__})


class HandlerServer(socketserver.BaseServer):
    """Serves connections with a request handler on a fixed pool of threads.

    A pool started in ``setUp`` rather than ``ThreadingMixIn``'s thread per
    connection: a thread started during a test and still alive when it ends
    (a keep-alive connection, or a handler finishing after the client read
    its response) makes zope.testrunner report that the test "left new
    threads behind". Connections beyond the pool's size wait their turn.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: HandlerFactory,
        *,
        errors: ErrorLog,
        threads: int,
        thread_name: str,
    ) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__((host, port), handler)  # type: ignore[arg-type]
        self.socket = sock
        # http.server handlers and wsgiref read these.
        self.server_name = host
        self.server_port = port
        self._errors = errors
        self.activity = Activity()
        handler_class = getattr(handler, "func", handler)  # unwrap a partial
        self._handler_shares_threads = isinstance(handler_class, type) and issubclass(handler_class, _SharesItsThread)
        self._stopping = False
        #: Set when the server stops: handlers that wait wait on it.
        self.stopped = threading.Event()
        self._aborted: set[socket.socket] = set()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._connections_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._queue: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(
                target=self._work, name=f"{thread_name} worker {number}", daemon=True
            )
            for number in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def fileno(self) -> int:
        return self.socket.fileno()

    def serve(self, ready: Callable[[], None]) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            ready()
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self.socket and not self._stopping:
                        self._accept()

    def _accept(self) -> None:
        try:
            connection, address = self.socket.accept()
        except OSError:  # the client gave up before we got to it
            return
        # Handlers write the status line, headers and body separately; with
        # Nagle's algorithm each keep-alive response would wait for the
        # client's delayed ACK (40 ms on Linux).
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.settimeout(READ_TIMEOUT)  # handlers that set ``timeout`` override it
        with self._connections_lock:
            self._connections.add(connection)
        self._queue.put((connection, address))

    def await_next_request(self, connection: socket.socket, rfile: Any) -> bool:
        """Wait for the next request on ``connection``; False gives the thread back.

        A worker waiting for an idle client lets another connection have
        it once that one has waited and this one has been idle for
        ``IDLE_GRACE`` seconds: a browser keeps more connections open than
        the pool has threads, and one kept waiting for an idle neighbour
        would stall until the browser gave up on the neighbour.
        """
        if _has_buffered_data(connection, rfile):  # pipelined, already read
            return True
        idle_since = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(connection, selectors.EVENT_READ)
            while not self._stopping:
                if selector.select(timeout=IDLE_CHECK_INTERVAL):
                    return True
                if not self._queue.empty() and time.monotonic() - idle_since >= IDLE_GRACE:
                    return False
        return False

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            connection, address = item
            if not self._handler_shares_threads:
                self.activity.start()  # a handler with its own handle(): busy for the whole connection
            try:
                self.finish_request(connection, address)
            except BaseException:
                self.handle_error(connection, address)
            finally:
                self.activity.finish()
                with self._connections_lock:
                    self._connections.discard(connection)
                self.shutdown_request(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Record what a handler raised; a client hanging up is no error."""
        exc_type, exc, tb = sys.exc_info()
        if exc_type is None or exc is None or self._stopping or isinstance(exc, DISCONNECTS):
            return
        handler = getattr(self.RequestHandlerClass, "func", self.RequestHandlerClass)  # unwrap a partial
        handler_name = getattr(handler, "__name__", repr(handler))
        self._errors.record(
            f"{handler_name} raised while serving a request from {client_address[0]}",
            (exc_type, exc, tb),
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

    def wait_quiet(self, timeout: float) -> bool:
        return self.activity.wait_quiet(timeout)

    def request_stop(self) -> None:
        self._stopping = True
        self.stopped.set()
        self._wake_writer.send(b"\0")

    def release(self, timeout: float) -> None:
        self.socket.close()
        # Unblock workers waiting for the next request on a keep-alive
        # connection or writing to a client that stopped reading.
        with self._connections_lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for _ in self._workers:
            self._queue.put(None)
        deadline = Deadline(timeout)
        for worker in self._workers:
            worker.join(deadline.remaining())
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].close()
        self._wake_reader.close()
        self._wake_writer.close()


class Layer(HTTPLayer):
    """Serves ``request_handler``, a ``BaseHTTPRequestHandler`` subclass.

    Publishes ``request_handler`` besides the ``http_*`` resources.
    ``threads`` is how many requests are served at once; an idle keep-alive
    connection gives its thread to a connection that waits for one, so a
    browser's dozen connections share eight threads. Each thread costs
    ``setUp`` time, most of all on a busy machine.
    """

    request_handler: type[http.server.BaseHTTPRequestHandler] | None = None
    threads: int = 8

    def __init__(
        self,
        request_handler: type[http.server.BaseHTTPRequestHandler] | None = None,
        *,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if request_handler is not None:
            self.request_handler = request_handler
        if threads is not None:
            self.threads = threads
        if self.request_handler is not None:
            self._check_handler(self.request_handler)
        positive_number(self.threads, owner=repr(self), setting="threads")

    def _check_handler(self, handler: object) -> None:
        if not (isinstance(handler, type) and issubclass(handler, http.server.BaseHTTPRequestHandler)):
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

    def handler_factory(self) -> HandlerFactory:
        """What the server calls to handle a connection: the handler, recording requests."""
        assert self.request_handler is not None
        handler: HandlerFactory = recording_handler(sharing_threads(self.request_handler), self.requests)
        arguments = self.handler_arguments()
        return functools.partial(handler, **arguments) if arguments else handler

    def make_server(self, sock: socket.socket) -> HandlerServer:
        return HandlerServer(
            sock,
            self.handler_factory(),
            errors=self.server_errors,
            threads=self.threads,
            thread_name=f"serverlayer {self.__module__}.{self.__name__}",
        )
