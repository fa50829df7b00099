"""Serve a WSGI application over real HTTP/1.1 with waitress.

    >>> from serverlayer import wsgi
    >>> def app(environ, start_response):
    ...     start_response('200 OK', [('Content-Type', 'text/plain')])
    ...     return [b'hello']
    >>> APP_LAYER = wsgi.Layer(app, name='APP_LAYER')

waitress gives keep-alive, chunked responses and several requests at once,
so a browser can fetch assets in parallel and an application can call its
own server without deadlocking.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

from serverlayer.errors import ConfigurationError
from serverlayer.layer import HTTPLayer, positive_number
from serverlayer.recording import RecordingMiddleware
from serverlayer.reporting import ErrorLog, ErrorLogHandler, verbose
from serverlayer.server import Activity, Deadline, ForwardedClients

StartResponse = Callable[..., Callable[[bytes], Any]]
WSGIApplication = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: Headers that describe one connection rather than the response (RFC 9110
#: section 7.6.1). A WSGI application must not send them; waitress refuses
#: a response that does.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


class FixupMiddleware:
    """Drops hop-by-hop headers from an application's responses.

    Applications written for servers that tolerate them (or that set
    ``Connection: close`` themselves) otherwise fail under waitress, which
    follows PEP 3333 and refuses such responses.
    """

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def clean_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], Any]:
            headers = [(name, value) for name, value in headers if name.lower() not in HOP_BY_HOP_HEADERS]
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return self.app(environ, clean_start_response)


class _AccessLog:
    """Logs each request to stderr, for ``$SERVERLAYER_VERBOSE``."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        statuses: list[str] = []

        def logging_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, logging_start_response)
        except BaseException as exc:
            statuses.append(f"500, the application raised {type(exc).__name__}")
            raise
        finally:
            sys.stderr.write(
                f"{environ.get('REMOTE_ADDR', '-')} \"{environ['REQUEST_METHOD']}"
                f" {environ.get('PATH_INFO', '')} {environ.get('SERVER_PROTOCOL', '')}\""
                f" {statuses[-1] if statuses else '-'}\n"
            )


# waitress's channels and tasks log through a class attribute shared by all
# servers in the process. These subclasses log through their own server's
# logger, so that each layer sees only its own errors.


class _WSGITask(WSGITask):
    @property
    def logger(self) -> logging.Logger:  # type: ignore[override]
        return self.channel.server.logger  # type: ignore[no-any-return]

    def get_environment(self) -> dict[str, Any]:
        """waitress's environ, telling behind a TLS front what it tells over
        plain HTTP: the client's address and port, and the published port
        (not the front's connection and the hidden port behind it)."""
        if self.environ is not None:
            return self.environ
        environ: dict[str, Any] = super().get_environment()
        server = self.channel.server
        if server.forwarded_clients is not None:
            client = server.forwarded_clients.client_of(self.channel.addr, self.channel.addr)
            environ["REMOTE_ADDR"] = environ["REMOTE_HOST"] = client[0]
            environ["REMOTE_PORT"] = str(client[1])
            environ["SERVER_PORT"] = str(server.published_port)
        return environ


class _ErrorTask(ErrorTask):
    @property
    def logger(self) -> logging.Logger:  # type: ignore[override]
        return self.channel.server.logger  # type: ignore[no-any-return]


class _OutbufLock(threading.Condition):
    """waitress's ``outbuf_lock`` (a Condition over an RLock) that knows how
    deep it is held, so that the loop can leave a channel alone meanwhile.

    ``wait`` lets go of the lock entirely; it wakes the loop first, since
    the waiter waits for the loop to send (or close) what is buffered.
    """

    def __init__(self, channel: _Channel) -> None:
        self._rlock = threading.RLock()
        super().__init__(self._rlock)
        # Condition.__init__ bound the RLock's acquire and release to the
        # instance, which would bypass the methods below.
        del self.acquire, self.release
        self.channel = channel
        #: How many times the owner holds the lock (an RLock is re-entered),
        #: 0 while it is free or its owner waits.
        self.depth = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._rlock.acquire(blocking, timeout):
            return False
        self.depth += 1
        return True

    def release(self) -> None:
        self.depth -= 1
        free = self.depth == 0
        self._rlock.release()
        if free:
            self.channel.lock_freed()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def wait(self, timeout: float | None = None) -> bool:
        depth, self.depth = self.depth, 0
        self.channel.server.pull_trigger()
        try:
            return super().wait(timeout)
        finally:
            self.depth = depth


class _Channel(HTTPChannel):
    """waitress's channel, logging through its own server's logger, with a
    loop that does not spin while a worker writes.

    Upstream (waitress 3.0.2, ``send_bytes=1``) a worker sends its response
    itself, inside ``write_soon``, holding ``outbuf_lock``. Meanwhile the
    loop finds the channel writable (bytes are buffered), and its
    ``handle_write`` cannot take the lock, so it sends nothing and select()
    returns at once, again and again: with two busy keep-alive clients,
    some twenty to forty loop turns per request instead of one or two, and
    far fewer requests per second. Here the channel is not writable while
    anyone holds the lock, and a thread that lets go of it with something
    left to send (or close) wakes the loop, so that it looks again. A
    worker never waits for a loop that is not watching: ``wait`` frees the
    lock (``writable`` becomes true) and wakes the loop before it waits.
    """

    task_class = _WSGITask
    error_task_class = _ErrorTask

    def __init__(
        self, server: WaitressServer, sock: socket.socket, addr: Any, adj: Adjustments, map: Any = None
    ) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.outbuf_lock = _OutbufLock(self)

    def writable(self) -> bool:
        if self.outbuf_lock.depth:
            return False  # the holder wakes the loop when it lets go
        return bool(super().writable())

    def lock_freed(self) -> None:
        """Wake the loop if ``writable`` may have turned it away while the
        lock was held and there is now something to send (or close).

        The loop itself looks again anyway before it next waits.
        """
        if threading.get_ident() != self.server.loop_thread and super().writable():
            self.server.pull_trigger()

    def service(self) -> None:
        # waitress logs what the application raised (so the layer records
        # it) inside service(): the request is over when service() returns.
        self.server.activity.start()
        try:
            super().service()
        finally:
            self.server.activity.finish()

    @property
    def logger(self) -> logging.Logger:  # type: ignore[override]
        return self.server.logger  # type: ignore[no-any-return]


class _Dispatcher(ThreadedTaskDispatcher):
    """waitress's worker pool, with named threads that can be joined."""

    def __init__(self, thread_name: str, logger: logging.Logger) -> None:
        super().__init__()
        self.thread_name = thread_name
        self.logger = logger
        # waitress warns "Task queue depth is N" whenever every worker is
        # busy, which under load is every request, on the loop thread that
        # all requests wait for. Only a verbose run wants to read it.
        self.queue_logger = logger.getChild("queue")
        self.queue_logger.setLevel(logging.DEBUG if verbose() else logging.ERROR)
        self.started: list[threading.Thread] = []

    def start_new_thread(self, target: Callable[[int], None], thread_no: int) -> None:
        thread = threading.Thread(
            target=target, args=(thread_no,), name=f"{self.thread_name} worker {thread_no}", daemon=True
        )
        thread.start()
        self.started.append(thread)


class WaitressServer(TcpWSGIServer):  # type: ignore[misc]
    """waitress's server, on a socket the layer bound, with a loop that stops at once.

    waitress's own ``run`` polls with a timeout and offers no way to stop;
    here the loop checks a flag each time the trigger wakes it.
    """

    channel_class = _Channel
    #: The thread running the loop, once it runs.
    loop_thread: int | None = None
    #: Behind a TLS front (which sets them): who the clients really are,
    #: and the port they connect to.
    forwarded_clients: ForwardedClients | None = None
    published_port: int | None = None

    def __init__(
        self,
        app: WSGIApplication,
        sock: socket.socket,
        *,
        errors: ErrorLog,
        threads: int,
        thread_name: str,
        url_scheme: str = "http",
    ) -> None:
        self.activity = Activity()
        self._trigger_lock = threading.Lock()
        self._trigger_closed = False
        self._stop_requested = False
        logger = logging.getLogger(f"serverlayer.waitress.{thread_name}")
        logger.propagate = False  # never reach a root handler printing to the terminal
        logger.setLevel(logging.DEBUG if verbose() else logging.WARNING)
        self._log_handler = ErrorLogHandler(errors)
        logger.addHandler(self._log_handler)
        dispatcher = _Dispatcher(thread_name, logger)
        adjustments = Adjustments(
            sockets=[sock],
            threads=threads,
            url_scheme=url_scheme,
            # The application sees the request as the client sent it,
            # X-Forwarded-* headers and all.
            clear_untrusted_proxy_headers=False,
        )
        try:
            super().__init__(
                app,
                map={},
                _sock=sock,
                dispatcher=dispatcher,
                adj=adjustments,
                bind_socket=False,
                sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
            )
        except BaseException:
            logger.removeHandler(self._log_handler)
            raise
        self.logger = logger
        dispatcher.set_thread_count(threads)

    def serve(self, ready: Callable[[], None]) -> None:
        self.loop_thread = threading.get_ident()
        ready()
        while not self._stop_requested:
            self.poll_once()

    def poll_once(self) -> None:
        """One turn of the loop: wait until a socket is ready (or the
        trigger is pulled), then serve the ready ones."""
        poll = wasyncore.poll2 if self.adj.asyncore_use_poll else wasyncore.poll
        poll(self.adj.asyncore_loop_timeout, self._map)

    def pull_trigger(self) -> None:
        # Workers pull the trigger after each response. While the server
        # serves, nothing closes the trigger, and a lock here would make
        # the workers queue for it under load. Once it stops, a worker still
        # running must not write to a closed (or reused) pipe: release
        # closes it only after joining the workers, and under this lock.
        if not self._stop_requested:
            self.trigger.pull_trigger()
            return
        with self._trigger_lock:
            if not self._trigger_closed:
                self.trigger.pull_trigger()

    def wait_quiet(self, timeout: float) -> bool:
        return self.activity.wait_quiet(timeout)

    def test_ended(self, timeout: float) -> None:
        pass  # waitress's workers start with the server and stay

    def request_stop(self) -> None:
        self._stop_requested = True
        self.pull_trigger()

    def release(self, timeout: float) -> None:
        deadline = Deadline(timeout)
        self._stop_requested = True  # also when the loop died before it was asked to stop
        # Closing the channels wakes workers blocked writing to them.
        for channel in list(self._map.values()):
            if isinstance(channel, HTTPChannel):
                channel.handle_close()
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=deadline.remaining())
        for thread in self.task_dispatcher.started:
            thread.join(deadline.remaining())
        with self._trigger_lock:
            self._trigger_closed = True
            wasyncore.close_all(self._map)
        self.logger.removeHandler(self._log_handler)


class Layer(HTTPLayer):
    """Serves a WSGI application with waitress.

    The application is the ``wsgi_app`` resource of a base layer if there is
    one, else the ``wsgi_app`` argument or class attribute. ``threads`` is
    how many requests run in the application at once (waitress's default,
    four); idle keep-alive connections hold no thread.
    """

    wsgi_app: WSGIApplication | None = None
    threads: int = 4
    #: gocept.httpserverlayer's wsgi layer listened on $GOCEPT_HTTP_APP_HOST,
    #: its custom and static layers did not; so only the wsgi layers read it.
    host_environment = ("SERVERLAYER_HTTP_HOST", "GOCEPT_HTTP_APP_HOST")

    def __init__(
        self,
        wsgi_app: WSGIApplication | None = None,
        *,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if wsgi_app is not None:
            self.wsgi_app = wsgi_app
        if threads is not None:
            self.threads = threads
        positive_number(self.threads, owner=repr(self), setting="threads")

    def application(self) -> WSGIApplication:
        """The application to serve; the ``wsgi_app`` resource wins."""
        app = self.get("wsgi_app") or self.wsgi_app
        if app is None:
            raise ConfigurationError(
                f"{self!r} has no WSGI application to serve. Pass one,"
                " wsgi.Layer(my_app), set the wsgi_app attribute, or stack the"
                " layer on a base layer that publishes a wsgi_app resource."
            )
        if not callable(app):
            raise ConfigurationError(
                f"{self!r}: the WSGI application {app!r} is not callable."
            )
        return app

    def setUp(self) -> None:
        self.application()  # fail before binding anything
        super().setUp()

    def make_server(self, sock: socket.socket) -> WaitressServer:
        app: WSGIApplication = RecordingMiddleware(self.application(), self.requests)
        if verbose():
            app = _AccessLog(app)
        return WaitressServer(
            app,
            sock,
            errors=self.server_errors,
            threads=self.threads,
            thread_name=f"serverlayer {self.__module__}.{self.__name__}",
            url_scheme=self.scheme,
        )
