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

import contextlib
import inspect
import logging
import operator
import os
import select
import socket
import threading
import time
import wsgiref.simple_server
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import plone.testing
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask

from serverlayer.custom import _exclusive_accepting, _socket_has_data, _takes_more, _watch_listening
from serverlayer.errors import ConfigurationError
from serverlayer.layer import HTTPLayer, identity, positive_number, refuse_bound_application
from serverlayer.recording import REQUEST_HEAD, RecordingMiddleware, RequestLog, is_latin_1
from serverlayer.reporting import ErrorLog, ErrorLogHandler, server_logger, verbose
from serverlayer.server import Activity, Deadline, ForwardedClients, ServerThread, SocketserverStops

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


class LogWSGIRequestHandler(wsgiref.simple_server.WSGIRequestHandler):
    """gocept.httpserverlayer's request handler class, kept for its name and
    its one job here: logging each request.

    waitress serves here, not wsgiref, so no handler object reads requests.
    After each response the server makes an object of the layer's
    ``request_handler_class`` for that alone and calls its
    ``log_request(code, size)``, as wsgiref's server did. So a subclass that
    decides whether (gocept.selenium's, under
    ``$GOCEPT_SELENIUM_VERBOSE_LOGGING``) or how to log still logs. This one
    logs to stderr under ``$SERVERLAYER_VERBOSE`` or
    ``$GOCEPT_HTTP_VERBOSE_LOGGING``.
    """

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if verbose():
            super().log_request(code, size)


#: What a ``request_handler_class`` may override: it is only ever asked to log.
_LOGGING_METHODS = frozenset(
    {"log_request", "log_message", "log_error", "address_string", "log_date_time_string"}
)


def no_test_running(owner: object, start_response: StartResponse) -> list[bytes]:
    """Answer 503: ``owner`` (a Zope layer) serves the database of the
    running test, and between tests there is none; a request committing
    into the fixture's would change every later test."""
    message = f"{owner!r} serves the database of the running test, and no test is running.\n".encode()
    start_response(
        "503 Service Unavailable",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(message)))],
    )
    return [message]


def _check_request_handler_class(layer: plone.testing.Layer, handler_class: object) -> None:
    """Refuse a handler class whose behaviour waitress would silently skip."""
    base = wsgiref.simple_server.WSGIRequestHandler
    if not (isinstance(handler_class, type) and issubclass(handler_class, base)):
        raise ConfigurationError(
            f"{layer!r}: request_handler_class must be a subclass of"
            f" wsgiref.simple_server.WSGIRequestHandler, not {handler_class!r}."
            " Subclass serverlayer.wsgi.LogWSGIRequestHandler; only its"
            " log_request and log_message are used."
        )
    ignored = sorted(
        name
        for klass in handler_class.__mro__
        if klass not in base.__mro__ and klass is not LogWSGIRequestHandler
        for name in vars(klass)
        if hasattr(base, name) and name not in _LOGGING_METHODS
        and not (name.startswith("__") and name != "__init__")
    )
    if ignored:
        raise ConfigurationError(
            f"{layer!r}: request_handler_class {handler_class.__qualname__}"
            f" overrides {', '.join(ignored)}, which nothing would call: this"
            " layer serves with waitress, not wsgiref, and uses the class only"
            " to log requests (log_request, log_message). Do the rest in WSGI"
            " middleware around your application instead."
        )


class _AppSlot:
    """The application a server serves, which can be swapped while it serves.

    gocept.httpserverlayer's wsgiref server had ``set_app``, and projects
    keep one server for a whole run and give each test its own application.
    An application set during a test (``test_started`` .. ``test_ended``)
    is served until that test ends; one set outside a test, by a layer's
    ``setUp`` say, is the one every test starts with.

    Without an application every request gets a 503 that says how to give
    the layer one: gocept's layer set up without one, too.
    """

    def __init__(self, app: WSGIApplication | None, owner: str) -> None:
        self.app = self.between_tests = app
        self.owner = owner
        self.in_test = False
        #: Set by the layer: the ``wsgi_app`` resource its bases publish now
        #: (it read the resource in setUp alone), for the 503's message.
        self.published_now: Callable[[], object] | None = None
        #: Set by the layer: its bases' names, when it found no ``wsgi_app``
        #: resource; for the 503's message.
        self.bases = ""

    def set(self, app: WSGIApplication | None) -> None:
        if app is not None and not callable(app):
            raise ConfigurationError(f"{self.owner}: the WSGI application {app!r} is not callable.")
        _refuse_asgi(app, self.owner)
        self.app = app
        if not self.in_test:
            self.between_tests = app

    def test_started(self) -> None:
        self.in_test = True

    def test_ended(self) -> None:
        self.in_test = False
        self.app = self.between_tests

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        app = self.app
        if app is not None:
            answer = app(environ, start_response)
            if isinstance(answer, (bytes, str)):
                # ``return body`` for ``return [body]``: waitress iterates
                # it, and fails with "object of type 'int' has no len()"
                # (bytes) or "can't concat str to bytes" (str).
                hint = "[body]" if isinstance(answer, bytes) else "[body.encode()]"
                raise TypeError(
                    f"{self.owner}: the application {app!r} returned a {type(answer).__name__} as its body,"
                    f" where PEP 3333 wants an iterable of bytes: return {hint}."
                )
            return answer
        body = (
            f"{self.owner} has no WSGI application to answer"
            f" {environ['REQUEST_METHOD']} {environ.get('REQUEST_URI', '')}"
            f" (Host: {environ.get('HTTP_HOST', '-')}). Give it one: wsgi.Layer(app), the"
            " wsgi_app attribute or a wsgi_app resource of a base layer, or"
            " layer['httpd'].set_app(app) from a test.\n"
            + (self._published_too_late() or self._bases_not_set_up())
        ).encode()
        start_response(
            "503 Service Unavailable",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def _bases_not_set_up(self) -> str:
        """What to say when the layer has bases: one that publishes
        ``wsgi_app`` in its setUp may simply not have been set up, as
        ``with layer:`` and ``layer.setUp()`` set up the layer alone, and the
        advice above would tell the user to write what they wrote."""
        if not self.bases:
            return ""
        return (
            f"If one of its base layers ({self.bases}) publishes wsgi_app in its setUp, it was not set up"
            " before this layer: `with layer:` and layer.setUp() set up this layer alone. Set the bases up"
            " first, as zope-testrunner does.\n"
        )

    def _published_too_late(self) -> str:
        """What to say of a ``wsgi_app`` resource that a base layer published
        after the layer set up (in its testSetUp, say): the advice above
        would tell the test to publish what it does publish."""
        try:
            published = self.published_now() if self.published_now is not None else None
        except Exception:  # resources change under a test's set-up and tear-down: no advice then
            return ""
        if published is None:
            return ""
        return (
            "A base layer publishes a wsgi_app resource now, but had none when this layer set up,"
            " which is when the layer reads it: publish it in the base layer's setUp, or give it"
            " with layer['httpd'].set_app(app) in the base layer's testSetUp.\n"
        )


# waitress's channels and tasks log through a class attribute shared by all
# servers in the process. These subclasses log through their own server's
# logger, so that each layer sees only its own errors.


class _NotingWarnings(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A task's logger, which notes on the task that waitress warned: a
    task warns only that the application's body did not fit its response."""

    def __init__(self, task: _WSGITask) -> None:
        super().__init__(task.channel.server.logger, None)
        self.task = task

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.task.warned = True
        super().warning(msg, *args, **kwargs)


class _WSGITask(WSGITask):
    #: Set when waitress warned of the application's body (``_NotingWarnings``).
    warned = False
    #: The body bytes of a chunked answer, which waitress does not count
    #: (``content_bytes_written`` counts those of a known length alone).
    chunked_bytes = 0

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[override,type-arg]
        return _NotingWarnings(self)

    _content_length: int | None = None

    def _set_content_length(self, length: int | None) -> None:
        # waitress takes the length of a body returned as a list of one
        # item for its Content-Length, even when the application wrote
        # with start_response's ``write`` before: the head went out without
        # one (chunked), and waitress then counted the body against the
        # length no client was told, closed the connection and warned of
        # too few bytes. A length decided once the head is sent tells nothing.
        if not self.wrote_header:
            self._content_length = length

    # Read several times per response: a getter of C code, no Python frame.
    content_length = property(operator.attrgetter("_content_length"), _set_content_length)  # type: ignore[assignment]

    def get_environment(self) -> dict[str, Any]:
        """waitress's environ, telling behind a TLS front what it tells over
        plain HTTP: the client's address and port, and the published port
        (not the front's connection and the hidden port behind it).

        Over TLS it also has what mod_ssl and nginx tell applications about
        the client's certificate: ``SSL_CLIENT_VERIFY`` (``SUCCESS`` or
        ``NONE``) and, with a certificate, ``SSL_CLIENT_S_DN``,
        ``SSL_CLIENT_I_DN``, ``SSL_CLIENT_M_SERIAL`` and ``SSL_CLIENT_CERT``.
        """
        if self.environ is not None:
            return self.environ
        environ: dict[str, Any] = super().get_environment()
        server = self.channel.server
        if server.records:
            environ[REQUEST_HEAD] = self.request.head  # for RecordingMiddleware alone
        if server.forwarded_clients is not None:
            peer = self.channel.addr
            client = server.forwarded_clients.client_of(peer, peer)
            environ["REMOTE_ADDR"] = environ["REMOTE_HOST"] = client[0]
            environ["REMOTE_PORT"] = str(client[1])
            environ["SERVER_PORT"] = str(server.published_port)
            environ["HTTPS"] = "on"
            certificate = server.forwarded_clients.certificate_of(peer)
            environ["SSL_CLIENT_VERIFY"] = "NONE" if certificate is None else "SUCCESS"
            if certificate is not None:
                environ["SSL_CLIENT_S_DN"] = certificate.subject
                environ["SSL_CLIENT_I_DN"] = certificate.issuer
                environ["SSL_CLIENT_M_SERIAL"] = f"{certificate.serial:X}"
                environ["SSL_CLIENT_CERT"] = certificate.pem
        return environ

    #: Set while waitress builds the response's head.
    _building_head = False

    def build_response_header(self) -> bytes:
        # waitress writes a response's head (status line and headers) as
        # soon as the application writes anything, and its body after it:
        # two sends, so a small response reaches the client in two packets
        # (TCP_NODELAY is on), and each send hands the interpreter lock to
        # the waiting client and back. Here the channel keeps the head and
        # sends it with the first body bytes (``_Channel.write_soon``).
        status = self.status
        if not (status[:3].isdigit() and status[3:4] in ("", " ")):
            # waitress sends whatever status it is given: "2000 OK" made the
            # status line "HTTP/1.1 2000 OK", which no client reads, and the
            # test saw only its client's error (wsgiref refused it).
            raise AssertionError(
                f"the application's status {status!r} is no HTTP status: PEP 3333 wants three digits,"
                " a space and a reason, such as '200 OK'"
            )
        request = self.request
        if request.chunked and b"\ncontent-length:" in request.head.lower():
            # RFC 9112 section 6.1: a request with both Transfer-Encoding and
            # Content-Length may be an attempt at request smuggling, and
            # the server must close the connection after answering it (as
            # the layers on http.server do); waitress keeps it open.
            self.set_close_on_finish()
        self._building_head = True
        try:
            head = super().build_response_header()
        except UnicodeEncodeError:
            # waitress encodes the whole head at once, and its error gives a
            # position in it, naming no header.
            unencodable = [f"status {status!r}"] if not is_latin_1(status) else []
            unencodable += [f"header {name}: {value!r}" for name, value in self.response_headers
                            if not is_latin_1(name + value)]
            what = unencodable[0] if unencodable else "response head"
            raise ValueError(
                f"the application's {what} is not latin-1, which PEP 3333 wants (HTTP sends"
                " bytes): percent-encode the value (RFC 8187's filename*=UTF-8''... in a"
                " Content-Disposition)"
            ) from None
        finally:
            self._building_head = False
        self.channel.head = _closing_says_so(self, head)
        return b""

    def set_close_on_finish(self) -> None:
        # waitress ends an HTTP/1.1 connection after every response without
        # a Content-Length: chunked ones, and 204 and 304, which have no
        # body. Their clients know where they end (the last chunk, the end
        # of the head), so the connection stays open for the next request,
        # unless the client asked to close it; a browser revalidating its
        # cache (304) need not connect again for each.
        if (
            self._building_head
            and self.version == "1.1"
            and "close" not in _options(self.request.headers.get("CONNECTION", ""))
            and (self.chunked_response or not self.has_body)
        ):
            return
        super().set_close_on_finish()

    def write(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray)):
            # waitress fails deep in its own buffers, with "can't concat str
            # to bytes" and the like, which do not name the body.
            hint = ": encode it" if isinstance(data, str) else ""
            raise TypeError(
                f"the application's body gave a {type(data).__name__} ({data!r:.40}),"
                f" where PEP 3333 wants bytes{hint}"
            )
        # What a file wrapper's body must not be sent for (below).
        self.channel.bodiless = self.request.command == "HEAD" or not self.has_body
        self.channel.chunked = self.chunked_response
        if data and self.request.command == "HEAD":
            # waitress sends the application's body in answer to HEAD too,
            # which the client takes for the start of the next response.
            # The head still says what a GET gets (its Content-Length).
            data = b""
        super().write(data)
        if self.chunked_response:
            self.chunked_bytes += len(data)
        head = self.channel.head
        if head:  # no body bytes came with it
            self.channel.head = b""
            self.channel.write_soon(head)

    def finish(self) -> None:
        if self.request.command == "HEAD":
            self.chunked_response = False  # no body: not even the last chunk
        super().finish()

    def execute(self) -> None:
        super().execute()
        # waitress only warns (below ERROR, so no server error) when the
        # application's body does not fit its response: the client then got
        # other bytes than the application meant, and the test may pass on
        # them. Reported as the application's error, so the test fails.
        problem = self._body_mismatch() if self.warned else None
        if problem is not None:
            self.logger.error("%s %s: %s", self.request.command, self.request.path, problem)

    def _body_mismatch(self) -> str | None:
        """What waitress warned of about the body the application returned,
        if it is the application's mistake."""
        length, written = self.content_length, self.content_bytes_written
        if self.logged_write_no_body:
            return (f"the application sent a body with {self.status}, which has none; it was dropped."
                    " Send no body with 1xx, 204 and 304.")
        if self.logged_write_excess:
            return (f"the application sent more than the {length} bytes its Content-Length header"
                    f" announced; the client got the first {length} alone. Set the body's real length.")
        if not self.has_body or self.channel.check_client_disconnected():
            # A 304 may announce the length a 200 would have (RFC 9110
            # section 8.6); and an application may stop a body whose client
            # left (waitress.client_disconnected) or was cut at the test's end.
            return None
        return (f"the application's body ended after {written} of the {length} bytes its"
                " Content-Length header announced; the client waited for the rest until the"
                " connection closed. Set the body's real length.")

    def service(self) -> None:
        """Serve the request, then have the server log it (wsgiref logged
        each request through its handler class; waitress does not)."""
        failed = True
        try:
            super().service()
            failed = False
            self.channel.hang_up_after(self)
        finally:
            self.channel.server.request_served(self, failed)



def _body_size(task: WSGITask) -> int:
    """How many body bytes ``task`` sent, as wsgiref's log said."""
    size: int = task.content_bytes_written + getattr(task, "chunked_bytes", 0)
    if not size and task.content_length and task.has_body and task.request.command != "HEAD":
        size = task.content_length  # a wsgi.file_wrapper, which the loop sends past the task
    return size


def _closing_says_so(task: WSGITask | ErrorTask, head: bytes) -> bytes:
    """``head`` without the ``Connection: Keep-Alive`` that upstream adds for
    an HTTP/1.0 keep-alive client even to an answer after which it closes
    (an error): the client read both ``close`` and ``Keep-Alive``."""
    if task.close_on_finish and task.version == "1.0":
        return head.replace(b"\r\nConnection: Keep-Alive\r\n", b"\r\n", 1)
    return head


class _ErrorTask(ErrorTask):
    @property
    def logger(self) -> logging.Logger:  # type: ignore[override]
        return self.channel.server.logger  # type: ignore[no-any-return]

    def build_response_header(self) -> bytes:
        return _closing_says_so(self, super().build_response_header())

    def service(self) -> None:
        super().service()
        self.channel.hang_up_after(self)


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
        #: Whether a worker waits for room in the channel's buffers.
        self.waiting = False

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

    # ``with`` is how waitress takes the lock, several times a request:
    # what acquire and release do, without calling them.

    def __enter__(self) -> bool:
        self._rlock.acquire()
        self.depth += 1
        return True

    def __exit__(self, *exc_info: object) -> None:
        self.depth -= 1
        free = self.depth == 0
        self._rlock.release()
        if free:
            self.channel.lock_freed()

    def wait(self, timeout: float | None = None) -> bool:
        channel = self.channel
        if channel.server.activity.left_running() is not None:
            # The test this request served has ended (its end gave up on
            # it), and its client reads no more: a stall the end of the
            # test would have cut (``cut_stalled_writes``), come later.
            # Left waiting, it would hold its worker for good.
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                if not _takes_more(channel.socket):
                    channel.socket.shutdown(socket.SHUT_RDWR)
        depth, self.depth = self.depth, 0
        channel.server.pull_trigger()
        self.waiting = True
        try:
            return super().wait(timeout)
        finally:
            self.waiting = False
            self.depth = depth


class _RequestParser(HTTPRequestParser):
    """waitress's request parser, keeping the head as the client sent it.

    Upstream parses the head (request line and header fields, its
    ``header_plus``) into CGI names for the environ: repeated fields
    joined with ", ", names upper-cased, a chunked body's
    Transfer-Encoding dropped and a Content-Length made up for it. A
    recorded request has the fields as sent, so the parser also keeps the
    head's bytes: a reference, which the recording parses only when a test
    reads the request.
    """

    #: The request line and header fields, as waitress parsed them.
    head = b""

    def parse_header(self, header_plus: bytes) -> None:
        self.head = header_plus
        super().parse_header(header_plus)
        if self.version == "1.0" and "TRANSFER_ENCODING" in self.headers:
            # Upstream reads an HTTP/1.0 request's body by its Content-Length
            # alone: a chunked body reached the application empty, and its
            # chunks were read as the next request. RFC 9112 section 6.1:
            # the framing of such a request is faulty.
            raise ParsingError(
                "an HTTP/1.0 request has no Transfer-Encoding (RFC 9112 section 6.1):"
                " send it as HTTP/1.1, or with a Content-Length"
            )


def _refuse_asgi(app: object, owner: str) -> None:
    """Refuse an ASGI application (a coroutine function, or an object whose
    ``__call__`` is one): served, its every request would fail, with
    "missing 1 required positional argument: 'send'" or a coroutine never
    awaited, and nothing would say to serve it with the asgi layer."""
    call = getattr(app, "__call__", None)  # noqa: B004 - what it is matters, not whether it exists
    if inspect.iscoroutinefunction(app) or (not inspect.isclass(app) and inspect.iscoroutinefunction(call)):
        raise ConfigurationError(
            f"{owner}: {app!r} is an ASGI application, which a WSGI server cannot call."
            " Serve it with serverlayer.asgi.Layer (pip install 'serverlayer[asgi]')."
        )


def _options(connection: str) -> list[str]:
    """The options of a ``Connection`` header field, in lower case."""
    return [option.strip() for option in connection.lower().split(",")]


def _ends_connection(request: Any) -> bool:
    """Whether a request's own headers end its connection after its answer
    (the rule of waitress's ``Task.build_response_header``)."""
    connection = request.headers.get("CONNECTION", "").lower()
    return bool(connection == "close" if request.version == "1.1" else connection != "keep-alive")


#: Linux's TCP_INFO, whose first byte is the connection's state, and the
#: state of a connection its peer reset (``_Channel.check_client_disconnected``).
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_TCP_CLOSE = 7


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
    parser_class = _RequestParser

    def __init__(
        self, server: WaitressServer, sock: socket.socket, addr: Any, adj: Adjustments, map: Any = None
    ) -> None:
        #: Whether the acceptor makes the channel: the loop is not to see it
        #: before the acceptor read its request, or a readable it saw first
        #: would find nothing left to read (which waitress takes for a
        #: broken connection). The acceptor has it join (``join``).
        self.joins_later = getattr(server.serving, "accepting", False)
        super().__init__(server, sock, addr, adj, map)
        self.outbuf_lock = _OutbufLock(self)
        #: Taken by whoever reads the connection's requests, the loop or
        #: the worker that holds it (``hold``).
        self.read_lock = threading.Lock()
        self.read_waiting()

    def add_channel(self, map: Any = None) -> None:
        if not self.joins_later:
            super().add_channel(map)

    def join(self) -> None:
        """Have the loop serve the connection too (one the acceptor made)."""
        self.joins_later = False
        self.add_channel()

    def read_waiting(self) -> bool:
        """Take up what the client sent with its connection (or since);
        False at its end, or if it broke.

        A client sends its request as soon as it connects, so it is usually
        there by the time the connection is accepted. waitress leaves it to
        the loop's next turn; reading it here saves that turn.
        """
        try:
            data = self.socket.recv(self.adj.recv_bytes)
        except BlockingIOError:  # nothing yet (the socket does not block)
            return True
        except OSError:  # gone: the loop finds out
            return False
        if not data:
            return False
        self.last_activity = time.time()
        self.received(data)
        return True

    #: A response's head, waiting for the first bytes of its body.
    head = b""

    #: Whether the response being sent has no body (HEAD, 204, 304).
    bodiless = False

    #: Whether the response being sent is chunked.
    chunked = False

    def write_soon(self, data: Any) -> int:
        if isinstance(data, ReadOnlyFileBasedBuffer) and self.bodiless:
            # waitress hands an application's wsgi.file_wrapper to the
            # channel whole, past the task's write that leaves out the body
            # of a HEAD, 204 or 304 answer: its bytes went out, and the
            # client read them as the next answer on the connection.
            data.close()
            data = b""
        if isinstance(data, ReadOnlyFileBasedBuffer) and self.chunked and data.remain:
            # An application that wrote with start_response's ``write``
            # first had its head sent chunked (no Content-Length), and
            # waitress sends a file wrapper returned then as it is, without
            # a chunk's framing: the client could not read the answer. Sent
            # as one chunk of the file's size (``prepare`` measured it).
            super().write_soon(f"{data.remain:X}\r\n".encode())
            super().write_soon(data)
            return int(super().write_soon(b"\r\n"))
        head = self.head
        if not (head and data):
            return int(super().write_soon(data))
        self.head = b""
        if isinstance(data, bytes) and len(data) <= self.sendbuf_len:
            return int(super().write_soon(head + data)) - len(head)
        super().write_soon(head)  # a file wrapper, or a large body: no copy
        return int(super().write_soon(data))

    # A keep-alive connection stays watched while its request runs.
    #
    # Upstream (channel_request_lookahead=0) the loop stops watching a
    # connection while its request runs, so the worker wakes the loop once
    # it is done, for it to watch again: two loop turns per request, the
    # second one competing with the client's next request for the
    # interpreter lock. Here the server reads one request ahead (waitress's
    # channel_request_lookahead=1), and a worker done with a connection
    # that the loop still watches and that needs nothing else from it does
    # not wake it (``WaitressServer.pull_trigger``). Reading ahead, waitress
    # would take the end of a client's side that arrives while its request
    # runs (``shutdown(SHUT_WR)`` after sending, as ``nc -N`` does) for a
    # client that is gone, and drop the answer; here that client still gets
    # its answers, then the end (``handle_read``, ``hang_up_after``).

    connected: bool  # wasyncore's; False once the connection is over

    #: Whether the loop's latest turn watches the socket for reading.
    watched = False
    #: Whether the client ended its side while a request of its ran.
    client_done = False

    # The end of a connection that the server ends.
    #
    # Upstream closes the socket once the last answer is handed to the
    # kernel, with whatever the client sent after its last request (more
    # requests, the rest of a body) unread: the kernel then resets the
    # connection and drops what it had not sent yet of that answer, and the
    # client gets a reset, or over TLS a silently shortened answer. Here
    # the server ends its own side, then reads and drops what still comes
    # until the client ends its side too, which it does once it has the
    # answer; the server's stop closes at once.

    #: Whether the server ended its side and waits for the client's end.
    lingering = False

    def handle_close(self) -> None:
        if not self._start_lingering():
            self.close_now()

    def close_now(self) -> None:
        """Close the connection, lingering or not."""
        self.server.lingering_channels.discard(self)
        super().handle_close()
        # A request still arriving (its client left halfway through a
        # large body) holds the part that came in a temporary file, which
        # waitress closes with whole requests alone: left to the garbage
        # collector, it was a ResourceWarning at some later test.
        partial: HTTPRequestParser | None = self.request  # type: ignore[has-type]
        self.request = None
        if partial is not None:
            partial.close()

    def _start_lingering(self) -> bool:
        """End the server's side of a connection it ends after an answer,
        to wait for the client's end; False where it is to close now."""
        if self.lingering or self.server.stop_requested or not self.will_close or self.total_outbufs_len:
            return False
        if self.socket is None or self._fileno is None:  # closed already
            return False
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:  # gone already
            return False
        self.linger()
        return True

    def linger(self) -> None:
        """Wait for the client's end, the server's side ended."""
        self.lingering = True
        self.server.lingering_channels.add(self)
        self.server.began_lingering.append(self)

    def drain(self) -> None:
        """Drop what the client of a lingering connection sent, and close it
        at the client's end."""
        try:
            data = self.socket.recv(self.adj.recv_bytes)
        except BlockingIOError:  # nothing arrived yet
            return
        except OSError:
            data = b""
        if not data:  # the client's end
            self.close_now()
        else:
            self.last_activity = time.time()  # idle is what waitress's channel_timeout bounds

    def handle_write(self) -> None:
        # The loop may have found the channel writable just before its
        # worker sent the rest and ended it (``hang_up_after``); waitress's
        # handle_write would then close it at once.
        if not self.lingering:
            super().handle_write()

    def readable(self) -> bool:
        if self.__dict__.setdefault("owner", "loop") != "loop":
            return False  # the acceptor closed it (closed_by_acceptor)
        # The holds first, then whether one is on: a worker may begin to
        # hold the connection (``hold``) between the two, and its hold is
        # then one this turn did not see (``handle_read``).
        holds = self.holds
        if self.held:
            self.watched = False  # nor when a hold began after this turn's look at held
            return False  # its worker reads it (hold)
        if self.lingering:
            return True
        self.holds_watched = holds
        watched = self.to_be_watched()
        self.watched = watched and not self.held
        return watched

    def to_be_watched(self) -> bool:
        """Whether the loop is to watch the socket for reading now."""
        return (
            not self.client_done
            # Nothing follows a request that ends the connection; watching
            # it, the loop would only wake up for its end.
            and not any(map(_ends_connection, list(self.requests)))
            and bool(super().readable())
        )

    def handle_read(self) -> None:
        if self.lingering:
            self.drain()
            return
        with self.read_lock:
            # Not if a worker holds it (``hold``), or held it since this
            # turn's poll() began: what that saw, the worker may have read,
            # and waitress would take nothing to read for a broken connection.
            if not self.held and self.holds == self.holds_watched:
                self._read()

    def _read(self) -> None:
        if not self.requests:
            super().handle_read()
            return
        try:
            data = self.socket.recv(self.adj.recv_bytes)
        except OSError:
            return  # gone: the worker's next send finds out
        if data:
            self.last_activity = time.time()
            self.received(data)
        else:
            self.client_done = True
            self.watched = False  # from now on, so that the worker wakes the loop when done

    def check_client_disconnected(self) -> bool:
        """``environ["waitress.client_disconnected"]``: whether the client is gone.

        Upstream the loop closes the connection when a read meets the
        client's end, so ``connected`` says it. Here the end of the client's
        stream may be a half-close (``nc -N``, waiting for its answer), and
        the connection stays open for the answer (``handle_read``); a reset
        that follows (the client closed with the answer unread) reaches no
        read of the loop's, which no longer watches it, and a read would
        find the end again (the kernel says so first): the connection's
        state is asked, closed once the reset came.
        """
        if not self.connected:
            return True
        # The loop reads the client's end once it comes, where it watches
        # the connection; one whose first request the acceptor answers, it
        # does not watch yet.
        if (self.watched and not self.client_done) or not _TCP_INFO:
            return False
        try:
            return self.socket.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] == _TCP_CLOSE
        except OSError:  # closed under us
            return True

    def loop_needs_nothing(self) -> bool:
        """Whether the loop watches this connection already (or a worker
        holds it) and has nothing to send or close for it."""
        watched = self.watched or self.held
        return watched and not (self.total_outbufs_len or self.will_close or self.close_when_flushed)

    def loop_needed_for(self) -> str | None:
        """What the loop would have to do for the connection (send what is
        buffered, close it, wait for its client's end), if anything."""
        if self.lingering:
            return "lingering"
        if self.total_outbufs_len:
            return "sending"
        if self.will_close or self.close_when_flushed or not self.connected:
            return "closing"
        if self.requests:
            return "answering"
        return None

    def hang_up_after(self, task: WSGITask | ErrorTask) -> None:
        """End the connection at once after a task that ends it
        (``Connection: close``, HTTP/1.0, an error, the last request of a
        client that ended its side), once all is sent.

        Upstream the worker pulls the trigger when it is done and the loop
        closes the connection in a turn of its own: with a connection per
        request, a turn per request that competes with the client's next
        connection for the interpreter lock. Here the worker ends the
        server's side itself (the client sees the end at once) and marks
        the channel disconnected and lingering, so that waitress pulls no
        trigger; the loop watches it from its next turn, whatever starts it
        (the next connection, another request, the stop, or at the latest
        its poll() timeout, a second), and closes it once the client's end
        arrives (``handle_read``): usually in the turn that accepts the
        client's next connection. Anything left to send stays with the
        loop, which ends the connection after it, as upstream.
        """
        last = task.close_on_finish or (self.client_done and len(self.requests) <= 1)
        if not last:
            return
        with self.outbuf_lock:
            if self.total_outbufs_len or not self.connected:
                return
            self.will_close = True  # for the loop: close it (lock_freed does not wake it)
            self.connected = False
            if self.closed_by_acceptor(task):
                closing = True
            else:
                closing = False
                try:
                    self.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    return  # the client is gone already: the loop closes it
                self.linger()  # the loop waits for the client's end, as after _start_lingering
        if closing:
            self.close_now()

    #: Who closes the connection, once one of them claimed it: "loop" once
    #: the loop looked at it, "acceptor" once the acceptor closed it.
    owner: str | None = None

    def closed_by_acceptor(self, task: WSGITask | ErrorTask) -> bool:
        """Whether the acceptor, serving this connection's first request,
        closes it now: the client said the request was its last and sent
        it whole, so nothing more comes (that the kernel would answer with
        a reset), and the loop never looked at the connection.

        Only then: a socket closed outside the loop while the loop's poll()
        watched its descriptor could make the loop take a new connection
        given the same descriptor for readable, read nothing, and close it.
        """
        if threading.get_ident() != self.server.acceptor_ident:
            return False
        request = task.request
        if not (request.headers.get("CONNECTION", "").lower() == "close" or request.version == "1.0"):
            return False
        if self.request is not None or len(self.requests) > 1 or _socket_has_data(self.socket):
            return False
        return self.__dict__.setdefault("owner", "acceptor") == "acceptor"

    def writable(self) -> bool:
        if self.lingering or self.owner == "acceptor":
            return False
        if self.outbuf_lock.depth:
            return False  # the holder wakes the loop when it lets go
        if self.client_done and not self.requests:
            # The client's end came while its last request ran, too late
            # for its worker to end the connection: close once all is sent.
            self.close_when_flushed = True
        return bool(super().writable())

    def lock_freed(self) -> None:
        """Wake the loop if ``writable`` may have turned it away while the
        lock was held and there is now something to send (or close).

        The loop itself looks again anyway before it next waits. A
        connection that is over (``hang_up_after``, or its client gone)
        waits for the loop's next turn, as upstream.
        """
        if threading.get_ident() != self.server.loop_thread and self.connected and super().writable():
            self.server.pull_trigger()

    def service(self) -> None:
        self.answer()
        self.hold()

    # A keep-alive connection's next request, read by the worker that
    # answered the last one.
    #
    # Upstream the loop reads every request and hands it to a worker: for
    # a client that sends its requests one after another on one connection,
    # three threads take turns per request (the client's, the loop, the
    # worker), where a server with a thread per connection needs two. Here
    # a worker done with a request waits for the connection's next one
    # itself, as long as another worker stays idle for the requests the
    # loop reads and the server has fewer connections than workers; the
    # loop leaves the connection alone meanwhile. The
    # worker gives the connection back to the loop as soon as the loop has
    # a request that no idle worker is left for, when anything but a
    # request arrives (the client's end, a reset), when the answer left
    # something for the loop to send or close, once the connection was idle
    # for waitress's ``channel_timeout``, and when the server stops.

    #: Whether a worker waits for the connection's next request (``hold``).
    held = False
    #: How many times a worker held it; as many when the loop last watched it.
    holds = 0
    holds_watched = 0

    def holdable(self) -> bool:
        """Whether a worker may wait for the connection's next request: the
        connection has nothing for the loop to do, and nothing waits for a
        worker."""
        return (
            self.connected
            and not (self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed)
            and not (self.client_done or self.lingering or self.server.stop_requested)
        )

    def hold(self) -> None:
        """Wait for the connection's next requests in this worker, and
        answer them, until the loop needs the worker or the connection
        needs the loop."""
        server = self.server
        waiting = server.task_dispatcher.waits.get(threading.current_thread())
        if waiting is None or not self.holdable():  # not a worker (the acceptor), or not now
            return
        if len(server.active_channels) >= server.adj.threads:
            # More connections than workers to spare: their requests would
            # keep taking the worker back (a wake-up and a loop turn each),
            # which costs more than holding saves (a tenth of the requests
            # of 8 keep-alive clients with 4 workers).
            return
        poller, wake = waiting
        with self.read_lock:
            # Not if another worker holds it already: one that answered a
            # request the loop read while this worker's ran.
            if self.held or not (self.holdable() and server.task_dispatcher.begin_hold(wake)):
                return
            self.held = True
            self.holds += 1
            self.watched = False
        try:
            sock = self.socket
            if sock is not None and sock.fileno() != -1:  # not closed meanwhile (the server's stop)
                self._serve_held(sock, poller, wake)
        finally:
            with self.read_lock:
                self.held = False
            server.task_dispatcher.end_hold()
            if self.connected and not server.stop_requested:
                server.pull_trigger()  # the loop watches it again

    def _serve_held(self, sock: socket.socket, poller: select.poll, wake: int) -> None:
        server = self.server
        serving = server.serving
        dispatcher = server.task_dispatcher
        fd = sock.fileno()
        poller.register(fd, select.POLLIN)
        try:
            while True:
                if server.stop_requested:
                    # Set before the stop woke the holders (wake_holders); a
                    # hold begun after that wake-up has none coming, and
                    # closing the socket does not end a poll() on it.
                    return
                idle_for = self.adj.channel_timeout - (time.time() - self.last_activity)
                ready = poller.poll(max(0.0, idle_for) * 1000)
                if not ready or server.stop_requested or any(each == wake for each, _ in ready):
                    return  # idle too long (the loop's maintenance closes it), wanted elsewhere, or stopping
                try:
                    data = sock.recv(self.adj.recv_bytes)
                except BlockingIOError:
                    continue
                except OSError:
                    return  # a reset: the loop's read finds it too
                if not data:
                    return  # the client's end: the loop's read finds it too
                self.last_activity = time.time()
                serving.holding = self
                try:
                    self.received(data)
                    answering = serving.__dict__.get("next_request", False)
                    if answering:
                        # Not a holder while it answers: the loop's wake-up
                        # for a request no idle worker is left for would
                        # wait for the answer (which may itself wait for
                        # that request: an application calling its server),
                        # while another holder only waits for its client.
                        dispatcher.end_hold()
                    while serving.__dict__.pop("next_request", False):
                        self.answer()
                finally:
                    serving.holding = None
                if not self.holdable() or (answering and not dispatcher.begin_hold(wake)):
                    return
        finally:
            poller.unregister(fd)

    def answer(self) -> None:
        """Answer the connection's first waiting request (waitress's ``service``)."""
        # waitress logs what the application raised (so the layer records
        # it) inside service(): the request is over when service() returns.
        self.server.activity.start()
        serving = self.server.serving
        serving.channel = self  # for pull_trigger
        try:
            super().service()
        finally:
            serving.channel = None
            self.server.activity.finish()

    @property
    def logger(self) -> logging.Logger:  # type: ignore[override]
        return self.server.logger  # type: ignore[no-any-return]


class _Dispatcher(ThreadedTaskDispatcher):
    """waitress's worker pool, with named threads that can be joined."""

    def __init__(self, thread_name: str, logger: logging.Logger, *, holds: bool) -> None:
        super().__init__()
        self.thread_name = thread_name
        #: Whether workers hold connections (``_Channel.hold``).
        self.holds = holds
        self.logger = logger
        # waitress warns "Task queue depth is N" whenever every worker is
        # busy, which under load is every request, on the loop thread that
        # all requests wait for. Only a verbose run wants to read it.
        self.queue_logger = server_logger(f"{logger.name}.queue", logger)
        self.queue_logger.setLevel(logging.DEBUG if verbose() else logging.ERROR)
        self.started: list[threading.Thread] = []
        #: Each worker's poller for the connection it holds, with its
        #: wake-up descriptor registered (``_Channel.hold``).
        self.waits: dict[threading.Thread, tuple[select.poll, int]] = {}
        #: The wake-up descriptors of the workers that hold a connection now, by thread.
        self.holders: dict[int, int] = {}

    def begin_hold(self, wake: int) -> bool:
        """Count this worker as holding a connection, woken through
        ``wake`` once it is wanted elsewhere; False if no other worker would
        stay idle for the loop's requests."""
        with contextlib.suppress(BlockingIOError):  # a wake-up come too late for the last hold
            os.eventfd_read(wake)
        with self.lock:
            idle = len(self.threads) - self.stop_count - self.active_count
            if idle - len(self.queue) < 1:
                return False
            self.holders[threading.get_ident()] = wake
            return True

    def end_hold(self) -> None:
        with self.lock:
            self.holders.pop(threading.get_ident(), None)

    def add_task(self, task: Any) -> None:
        super().add_task(task)
        if self.holders:
            with self.lock:
                idle = len(self.threads) - self.stop_count - self.active_count
                if self.holders and len(self.queue) > idle:
                    os.eventfd_write(self.holders.popitem()[1], 1)

    def wake_holders(self) -> None:
        """Have every worker that holds a connection give it back."""
        with self.lock:
            for wake in self.holders.values():
                os.eventfd_write(wake, 1)
            self.holders.clear()

    def close_waits(self) -> None:
        """Close the workers' wake-up descriptors, the workers joined."""
        for _, wake in self.waits.values():
            os.close(wake)
        self.waits.clear()

    def start_new_thread(self, target: Callable[[int], None], thread_no: int) -> None:
        thread = threading.Thread(
            target=target, args=(thread_no,), name=f"{self.thread_name} worker {thread_no}", daemon=True
        )
        if self.holds:
            wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            self.waits[thread] = (poller, wake)
        thread.start()
        self.started.append(thread)


class _Listener(wasyncore.dispatcher):  # type: ignore[misc]
    """Accepts connections at one more address of the layer's host, for
    ``server`` to serve as if its own socket had accepted them.

    waitress's ``create_server`` makes a whole server per socket, each with
    a trigger and channels of its own; what our WaitressServer adds (the
    stoppable loop, the trigger lock, request activity, the TLS front's
    clients) would then be split between them. So one WaitressServer
    serves every connection, and its other sockets only accept.
    """

    def __init__(self, server: WaitressServer, sock: socket.socket) -> None:
        super().__init__(sock, map=server._map)
        self.server = server
        self.accepting = True  # the layer's bind already made it listen

    @property
    def logger(self) -> logging.Logger:  # type: ignore[override]
        return self.server.logger  # type: ignore[no-any-return]

    def readable(self) -> bool:
        # The server's connection limit counts the connections of every socket.
        return bool(self.server.readable())

    def writable(self) -> bool:
        return False

    def handle_accept(self) -> None:
        try:
            accepted = self.accept()
        except OSError:  # the client left before we got to it
            return
        if accepted is not None:
            self.server.adopt(*accepted)


class _ExclusiveListener(wasyncore.file_dispatcher):  # type: ignore[misc]
    """Accepts connections at every address of the layer's host, for the
    loop, where the kernel offers them to the acceptor first
    (``WaitressServer.accept_and_serve``): an epoll object that waits on
    the listening sockets, registered after the acceptor's, and
    exclusively, so that the kernel wakes the loop only when no acceptor
    waits. The acceptor registers it only while the loop is to accept
    (``WaitressServer.loop_accepts``)."""

    def __init__(self, server: WaitressServer, accepting: select.epoll) -> None:
        super().__init__(accepting.fileno(), map=server._map)  # watches a copy of its descriptor
        self.server = server
        self.epoll = accepting

    @property
    def logger(self) -> logging.Logger:  # type: ignore[override]
        return self.server.logger  # type: ignore[no-any-return]

    def readable(self) -> bool:
        # Not waitress's count alone: with a connection the acceptor
        # answers, its map is one short, and the listener, readable with
        # nothing it may accept, would make the loop spin.
        return self.server.below_limit and self.server.has_room()

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        self.epoll.poll(0)
        self.server.accept_waiting()

    def close(self) -> None:
        super().close()
        self.epoll.close()


#: How many connections a wsgi layer serves at once; more wait to be accepted.
CONNECTION_LIMIT = 1000


class WaitressServer(SocketserverStops, TcpWSGIServer):  # type: ignore[misc]
    """waitress's server, on the sockets the layer bound, with a loop that stops at once.

    waitress's own ``run`` polls with a timeout and offers no way to stop;
    here the loop checks a flag each time the trigger wakes it. The first
    socket is the server's own, each other one has a ``_Listener``.

    It also answers to what tests used on gocept.httpserverlayer's wsgiref
    server: ``set_app``, ``get_app``, ``server_address`` and
    ``server_port``. Requests pass through the recording of ``requests``
    (when given) before they reach whatever application is set.
    """

    channel_class = _Channel
    #: The thread running the loop, once it runs.
    loop_thread: int | None = None
    #: Behind a TLS front (which sets them): who the clients really are,
    #: and the port they connect to.
    forwarded_clients: ForwardedClients | None = None
    published_port: int | None = None
    #: The host clients are told to use, once the layer published it.
    published_host: str | None = None

    def __init__(
        self,
        app: WSGIApplication | None,
        sockets: Sequence[socket.socket],
        *,
        errors: ErrorLog,
        threads: int,
        thread_name: str,
        url_scheme: str = "http",
        requests: RequestLog | None = None,
        request_handler_class: type[wsgiref.simple_server.WSGIRequestHandler] | None = None,
        owner: str | None = None,
    ) -> None:
        self.app_slot = _AppSlot(app, owner or thread_name)
        served: WSGIApplication = self.app_slot
        #: Whether requests are recorded: each environ then has the head as sent.
        self.records = requests is not None
        if requests is not None:
            served = RecordingMiddleware(served, requests)
        #: Each request is logged through this class's ``log_request``.
        self.request_handler_class = request_handler_class
        self.activity = Activity()
        errors.left_running = self.activity.left_running
        #: ``channel``: the connection this worker thread serves, if any.
        self.serving = threading.local()
        #: The connections waiting for their client's end (``_Channel.lingering``).
        self.lingering_channels: set[_Channel] = set()
        #: Those of them that began to since the loop's last turn.
        self.began_lingering: list[_Channel] = []
        self._trigger_lock = threading.Lock()
        #: Taken to look for room and reserve it (``_reserve_room``).
        self._admitting = threading.Lock()
        #: Taken to close, or to hand on, the connection the acceptor
        #: answers (``answering``).
        self._handing_on = threading.Lock()
        self._trigger_closed = False
        self._stop_requested = False
        logger = server_logger(f"serverlayer.waitress.{thread_name}")
        self._log_handler = ErrorLogHandler(errors, left_running=self.activity.left_running)
        logger.addHandler(self._log_handler)
        dispatcher = _Dispatcher(thread_name, logger, holds=self.holds_connections and hasattr(os, "eventfd"))
        adjustments = Adjustments(
            sockets=list(sockets),
            threads=threads,
            url_scheme=url_scheme,
            # The application sees the request as the client sent it,
            # X-Forwarded-* headers and all.
            clear_untrusted_proxy_headers=False,
            # Keep-alive connections stay watched while a request runs (_Channel).
            channel_request_lookahead=1,
            # waitress accepts no more than 100 connections at once (its
            # sockets included) and leaves the rest waiting until one
            # closes: 100 requests gathered at once by aiohttp or httpx (100
            # connections each by default) waited 15 s for aiohttp to close
            # idle ones. The limit keeps select() below its 1024 descriptors;
            # poll() has no such bound.
            asyncore_use_poll=True,
            connection_limit=CONNECTION_LIMIT,
        )
        try:
            super().__init__(
                served,
                map={},
                _sock=sockets[0],
                dispatcher=dispatcher,
                adj=adjustments,
                bind_socket=False,
                sockinfo=(sockets[0].family, sockets[0].type, sockets[0].proto, sockets[0].getsockname()),
            )
        except BaseException:
            logger.removeHandler(self._log_handler)
            raise
        self.logger = logger
        #: One listening socket per address of the layer's host, all on one port.
        self.sockets = list(sockets)
        self.listening = {sock.fileno(): sock for sock in self.sockets}
        self.listeners: list[wasyncore.dispatcher] = []
        self._accepting = self._exclusive_accepting()
        if self._accepting is None:
            self.listeners = [_Listener(self, sock) for sock in sockets[1:]]
        dispatcher.set_thread_count(threads)
        self.resume_acceptor()

    # The acceptor.
    #
    # Upstream the loop accepts a connection and reads its request, and a
    # worker answers it: for a client that makes a connection per request
    # (gocept's wsgiref server served on one thread), a hand-over from
    # thread to thread that costs more than the rest of a small request.
    # Here, on Linux, a thread of the layer's own, the acceptor, waits on
    # the listening sockets too, registered first and exclusively: the
    # kernel offers a new connection to the acceptor while it waits, and
    # to the loop while it serves, so an application calling its own
    # server is accepted as before. The acceptor reads the request that
    # came with the connection and answers it itself; the connection is
    # the loop's as any other from then on.

    #: Whether an acceptor answers the first requests of new connections,
    #: where the kernel allows it (Linux).
    uses_acceptor = True
    #: The acceptor's thread, while it runs.
    acceptor: threading.Thread | None = None
    acceptor_ident: int | None = None
    #: Whether there was room for more connections at the loop's latest
    #: turn (waitress's ``readable``), for its listener.
    below_limit = True

    def _exclusive_accepting(self) -> select.epoll | None:
        """Register the acceptor's epoll object, then the loop's, on the
        listening sockets; None where the kernel cannot wake one waiter."""
        if not (self.uses_acceptor and hasattr(select, "EPOLLEXCLUSIVE")):
            return None
        try:
            accepting = _exclusive_accepting(self.sockets)
        except OSError:  # a kernel before Linux 4.5
            return None
        self._acceptor_wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        accepting.register(self._acceptor_wake, select.EPOLLIN)
        self.listeners = [_ExclusiveListener(self, _exclusive_accepting(self.sockets))]
        self._loop_accepting = True  # until the acceptor runs
        return accepting

    def readable(self) -> bool:
        # waitress's: its periodic maintenance, and the connection limit.
        self.below_limit = bool(super().readable())
        return self.below_limit and self._accepting is None

    def maintenance(self, now: float) -> None:
        # waitress iterates its channels in a Python loop, which the
        # acceptor, adding a connection meanwhile, would break ("dictionary
        # changed size during iteration"): the same on a copy.
        cutoff = now - self.adj.channel_timeout
        for channel in list(self.active_channels.values()):
            if not channel.requests and not channel.held and channel.last_activity < cutoff:
                channel.will_close = True
        self._lingering_cutoff = cutoff

    def resume_acceptor(self) -> None:
        """Start the acceptor, if the server has one and it is not running."""
        if self._accepting is None or self._stop_requested or self.acceptor is not None:
            return
        self.acceptor = threading.Thread(
            target=self._accept_and_serve, name=f"{self.task_dispatcher.thread_name} acceptor", daemon=True
        )
        self.acceptor.start()

    def _accept_and_serve(self) -> None:
        try:
            self._accept_until_stopped()
        except BaseException:
            # A fault of ours, past the handling of each request: logged,
            # the layer fails the test with it, where the thread's traceback
            # on stderr would have passed unnoticed.
            self.logger.exception("The acceptor of %s failed", self.task_dispatcher.thread_name)

    def _accept_until_stopped(self) -> None:
        self.acceptor_ident = threading.get_ident()
        self.loop_accepts(False)
        accepting = self._accepting
        assert accepting is not None
        try:
            while not self._stop_requested:
                if not self.has_room():
                    # Not after the kernel woke it for a connection: the
                    # loop would not hear of that one. The loop accepts once
                    # there is room, and starts the acceptor again.
                    self.pull_trigger()
                    return
                events = accepting.poll(self.pending_idle_left())
                pending = self.pending
                if not events:  # the connection waited on idle for waitress's channel_timeout
                    self.hand_over_pending()  # the loop's maintenance closes it
                elif pending is not None and any(fd == pending._fileno for fd, _ in events):
                    self.serve_pending()  # its connection came before any new one
                for fd, _ in events:
                    if fd == self._acceptor_wake:
                        with contextlib.suppress(BlockingIOError):  # read by an earlier turn
                            os.eventfd_read(fd)
                    if fd not in self.listening:
                        continue  # the wake-up, or the connection waited on
                    # The one it was woken for. Those that came while it was
                    # answered, the loop accepted; any left, the next poll()
                    # finds at once (without a failed accept() each time).
                    self.accept_and_serve(fd)
        finally:
            try:
                if self._stop_requested:
                    self._close_pending()
                else:
                    self.hand_over_pending()
            finally:  # the loop accepts from now on, and starts another acceptor, also after a fault
                self.loop_accepts(True)
                self.acceptor = None

    def pending_idle_left(self) -> float:
        """How long the acceptor may wait for the connection it waits on
        before it has been idle for waitress's ``channel_timeout`` (-1: no
        such connection, no limit)."""
        pending = self.pending
        if pending is None:
            return -1
        return max(0.0, self.adj.channel_timeout - (time.time() - pending.last_activity))

    # The loop accepts new connections only while the acceptor answers a
    # request (which may take long: an application calling its own server
    # waits for the loop to accept), or does not run. The kernel wakes the
    # loop for a connection whenever the acceptor is not waiting for one,
    # also when it is about to look again (with a client in the server's
    # process, it often waits for the interpreter lock to do so): the loop
    # then took a fifth of the new connections, each handed to a worker,
    # and was woken in vain for as many again.

    #: Whether the loop's epoll object watches the listening sockets.
    _loop_accepting = False

    def loop_accepts(self, accepts: bool) -> None:
        """Have the loop accept new connections too, or not: registered
        while the loop waits, a listening socket with a connection waiting
        wakes it at once. Called by the acceptor alone."""
        if accepts == self._loop_accepting:
            return
        self._loop_accepting = accepts
        _watch_listening(self.listeners[0].epoll, self.sockets, accepts)

    def accept_waiting(self) -> None:
        """Accept the connections waiting, in the loop, while there is room."""
        for listening in self.listening.values():
            while self._reserve_room():
                try:
                    try:
                        connection, address = listening.accept()
                    except ConnectionAbortedError:  # the client left before we got to it
                        continue
                    except OSError:  # none left (the acceptor took them), or none can be had now
                        break
                    self.adopt(connection, address)
                finally:
                    self._give_back_room()
        self.resume_acceptor()
        if not self.has_room():
            self.wake_acceptor()  # to stop, as it would have had it accepted the last

    def wake_acceptor(self) -> None:
        """Have the acceptor look again whether to go on (or stop)."""
        if self._accepting is not None:
            os.eventfd_write(self._acceptor_wake, 1)

    def has_room(self) -> bool:
        """Whether the server is below its connection limit. The connection
        the acceptor waits on or answers counts too: the loop's map lacks
        it; and those the loop and the acceptor are accepting (``reserved``)."""
        outside = self.pending or self.answering
        taken = len(self._map) + (outside is not None and outside.joins_later) + self.reserved
        return taken < self.adj.connection_limit

    #: Places the loop and the acceptor took for the connections they are
    #: accepting, until those count otherwise (in the loop's map, or as the
    #: acceptor's ``pending`` or ``answering``): each looked for room, then
    #: accepted, and both took the last free place.
    reserved = 0

    def _reserve_room(self) -> bool:
        """Take a place for a connection about to be accepted, if there is
        one; the caller gives it back once the connection counts otherwise."""
        with self._admitting:
            if not self.has_room():
                return False
            self.reserved += 1
            return True

    def _give_back_room(self) -> None:
        with self._admitting:  # two threads: not a lost update
            self.reserved -= 1

    # A client's request may come after the acceptor accepted its
    # connection: a client in the same process (a test calling its layer)
    # needs the interpreter lock to send it, which the acceptor holds. The
    # acceptor then waits for it beside the listening sockets, and answers
    # it as it comes; a connection that comes meanwhile goes to the loop
    # instead (it came first, and the acceptor is about to serve the next).

    #: The connection the acceptor waits for a request on, if any.
    pending: _Channel | None = None
    #: The connection whose request the acceptor answers, if the loop has
    #: not seen it (``_take_up``): the stop closes it with the loop's.
    answering: _Channel | None = None

    def accept_and_serve(self, fd: int) -> bool:
        """Accept a connection on the listening socket ``fd``, in the
        acceptor, and answer the request that came with it; False if there
        was none to accept, or no room for it."""
        if not self._reserve_room():
            return False  # the acceptor stops as it looks again; the loop accepts once there is room
        try:
            try:
                connection, address = self.listening[fd].accept()
            except OSError:  # none, or the loop took it
                return False
            self.hand_over_pending()
            serving = self.serving
            serving.accepting = True
            try:
                channel = self.adopt(connection, address)  # the request, if it came whole, to add_task
            finally:
                serving.accepting = False
            answers = channel is not None and self._take_up(channel, True)  # counted from here on
        finally:
            self._give_back_room()
        if answers:
            assert channel is not None
            self._answer(channel)
        return True

    def serve_pending(self) -> None:
        """Take up what came on the connection the acceptor waits on (which
        stays ``pending``, counted, until it answers it or lets it go)."""
        channel = self.pending
        assert channel is not None and self._accepting is not None
        self._accepting.unregister(channel._fileno)
        serving = self.serving
        serving.accepting = True
        try:
            still_open = channel.read_waiting()
        except BaseException:
            self.pending = None  # not to be unregistered again
            raise
        finally:
            serving.accepting = False
        if self._take_up(channel, still_open):
            self._answer(channel)

    def _take_up(self, channel: _Channel, still_open: bool) -> bool:
        """Wait on ``channel`` for its request, let it go (its end, an
        error), or make it the one the acceptor answers: True then."""
        serving = self.serving
        task, serving.accepted = getattr(serving, "accepted", None), None
        if task is None and still_open and not channel.will_close:
            self._wait_on(channel)  # its request is still coming
            return False
        if task is None:  # its end, or an error
            if channel.joins_later and channel.loop_needed_for() is None:
                self._let_go(channel)
                channel.close_now()  # the loop never saw it: nothing of its to undo
            else:
                channel.join()  # in the loop's map before it stops being counted as pending
                self._let_go(channel)
                self.pull_trigger()
            return False
        if len(channel.requests) > 1 or channel.request is not None:
            # Requests pipelined behind it go to workers (waitress's
            # service), or the rest of one is still coming: the loop's.
            channel.join()
        with self._handing_on:
            if self._stop_requested:
                # The stop closes the connection the acceptor answers, and
                # looked for it before it was set: not run (the stop waits
                # for no request taken up after it), closed here.
                self._let_go(channel)
                self._close_untaken(channel)
                return False
            self.answering = channel
            self._let_go(channel)
        return True

    def _answer(self, channel: _Channel) -> None:
        """Answer the request the acceptor took up on ``channel``, then wait
        on it for the next, or give it to the loop. It stays ``answering``
        until then, counted as one of the server's connections."""
        self.loop_accepts(True)
        try:
            try:
                channel.service()
            except BaseException:  # as waitress's workers
                self.logger.exception("Exception when servicing %r", channel)
            if not self._stop_requested:
                self.loop_accepts(False)
        finally:
            # The stop closes the connection the acceptor answers, from its
            # own thread (to wake the acceptor should it wait to write); one
            # the acceptor waits on, the acceptor closes itself. Without the
            # lock, an acceptor that looked for the stop just before it came
            # began to wait on a connection the stop was closing, and then
            # unregistered a closed descriptor (EBADF): to the stop, it is
            # now the one answered or the one waited on, never both.
            with self._handing_on:
                try:
                    if channel.joins_later and channel._fileno is not None:  # else the loop's already, or closed
                        self._hand_on(channel)
                finally:
                    self.answering = None  # counted as pending or in the loop's map from now on

    def _hand_on(self, channel: _Channel) -> None:
        """Wait on ``channel``, answered, for its next request, or give it
        to the loop (to send or read what is left, or close it)."""
        needed = channel.loop_needed_for()
        if self._stop_requested:
            needed = "closing"  # the stop closes the loop's connections
        if needed is None:
            self._wait_on(channel)  # for its next request, or its end
            return
        channel.join()
        if needed != "lingering":  # the loop looks at those from its next turn, as after a worker's
            self.pull_trigger()

    @staticmethod
    def _close_untaken(channel: _Channel) -> None:
        """Close ``channel`` with the requests it read and nobody will
        answer (their bodies may be in temporary files)."""
        for request in channel.requests:
            request.close()
        channel.requests = []
        channel.close_now()

    def _wait_on(self, channel: _Channel) -> None:
        """Wait for what comes next on ``channel`` beside the listening sockets."""
        self.pending = channel
        assert self._accepting is not None
        self._accepting.register(channel._fileno, select.EPOLLIN)

    def _close_pending(self) -> None:
        """Close the connection the acceptor waits on (the server stops),
        with the part of a request that came (``_Channel.close_now``)."""
        channel, self.pending = self.pending, None
        if channel is not None and channel._fileno is not None:
            assert self._accepting is not None
            self._accepting.unregister(channel._fileno)
            channel.close_now()

    def _let_go(self, channel: _Channel) -> None:
        """Stop waiting on ``channel``, if the acceptor did."""
        if self.pending is channel:
            self.pending = None

    def hand_over_pending(self) -> None:
        """Have the loop wait for the request of the connection the acceptor waited on."""
        channel = self.pending
        if channel is not None and channel._fileno is not None:  # not closed by the stop meanwhile
            assert self._accepting is not None
            self._accepting.unregister(channel._fileno)
            channel.join()  # in the loop's map before it stops being counted as pending
            self.pull_trigger()
        self.pending = None

    def add_task(self, task: Any) -> None:
        serving = self.serving
        if getattr(serving, "accepting", False):
            serving.accepted = task  # the acceptor answers it (accept_and_serve)
            return
        if getattr(serving, "holding", None) is task:
            serving.next_request = True  # the worker holding it answers it (_Channel.hold)
            return
        super().add_task(task)

    #: Whether a worker done with a keep-alive connection's request waits
    #: for the next one itself (``_Channel.hold``), where the system allows.
    holds_connections = True

    def adopt(self, connection: socket.socket, address: Any) -> _Channel | None:
        """Serve ``connection``, which another of the layer's sockets accepted."""
        try:
            self.set_socket_options(connection)
        except OSError:  # the client left already
            connection.close()
            return None
        channel: _Channel = self.channel_class(self, connection, address, self.adj, map=self._map)
        return channel

    # What gocept.httpserverlayer's server (wsgiref's WSGIServer) offered.

    def set_app(self, app: WSGIApplication | None) -> None:
        """Serve ``app`` from the next request on; during a test, until it ends."""
        self.app_slot.set(app)

    def get_app(self) -> WSGIApplication | None:
        """The application served (without serverlayer's recording in front)."""
        return self.app_slot.app

    @property
    def server_address(self) -> tuple[str, int]:
        """The host and port clients connect to."""
        return (self.published_host or str(self.effective_host), self.server_port)

    @property
    def server_port(self) -> int:
        """The port clients connect to: the TLS front's, behind one."""
        return self.published_port or int(self.effective_port)

    def request_served(self, task: WSGITask, failed: bool) -> None:
        """Log a request through ``request_handler_class``, as wsgiref did.

        The handler object exists for this call alone: it has the
        attributes its logging methods read, and no connection.
        """
        handler_class = self.request_handler_class
        environ = task.environ
        if handler_class is None or environ is None:
            return
        handler = handler_class.__new__(handler_class)
        handler.server = self  # type: ignore[assignment]
        port = environ.get("REMOTE_PORT") or ""
        handler.client_address = (environ["REMOTE_ADDR"], int(port) if port.isdigit() else 0)
        handler.command = environ["REQUEST_METHOD"]
        handler.path = environ["REQUEST_URI"]
        handler.request_version = environ["SERVER_PROTOCOL"]
        handler.requestline = f"{handler.command} {handler.path} {handler.request_version}"
        # waitress answers 500 when the application fails before it started
        # its response.
        code = "500" if failed and not task.wrote_header else task.status.split(" ", 1)[0]
        handler.log_request(code, _body_size(task))

    def serve(self, ready: Callable[[], None]) -> None:
        self.loop_thread = threading.get_ident()
        self.serving_thread = threading.current_thread()
        ready()
        while not self._stop_requested:
            self.poll_once()

    def poll_once(self) -> None:
        """One turn of the loop: wait until a socket is ready (or the
        trigger is pulled), then serve the ready ones."""
        if self.began_lingering:
            self._close_those_ended()
        if self.lingering_channels:
            self._end_lingering()
        if self.acceptor is None and self._accepting is not None and self.has_room():
            # It stopped at the connection limit. A kernel that keeps a
            # woken waiter registered until it runs (older ones) may have
            # offered it one more connection that the loop never heard
            # of: the acceptor finds it as it waits again.
            self.resume_acceptor()
        poll = wasyncore.poll2 if self.adj.asyncore_use_poll else wasyncore.poll
        poll(self.adj.asyncore_loop_timeout, self._map)

    # A connection the server ended waits for its client's end
    # (``_Channel.lingering``), which a client may never send: a socket a
    # test leaked, say. Upstream closes such connections at once; here
    # they are closed once idle for waitress's ``channel_timeout`` (as it
    # closes idle keep-alive connections), and the longest idle first when
    # they would keep new clients from being accepted.

    #: Set by waitress's periodic maintenance: close what lingered since.
    _lingering_cutoff: float | None = None


    def _close_those_ended(self) -> None:
        """Close the connections that began to wait for their client's end
        since the last turn, and whose client ended its side already.

        A client that sends one request per connection ends it as soon as
        it has the answer, and connects again: by the turn that accepts its
        next connection, the end of the last one has arrived. Watched for
        it, that connection would take a turn of its own, one more per
        request; looked at here, once, it is closed in this turn.
        """
        # Workers append to the list: the swap takes it under the GIL; one
        # appended to the old list meanwhile is watched as any other.
        began, self.began_lingering = self.began_lingering, []
        for channel in began:
            if channel.lingering and channel.socket is not None:
                channel.drain()

    def _end_lingering(self) -> None:
        """Close the connections waiting for their client's end that were
        idle since waitress's last cleanup, or that take the last free
        connections."""
        cutoff, self._lingering_cutoff = self._lingering_cutoff, None
        excess = len(self._map) - self.adj.connection_limit + 1
        if cutoff is None and excess <= 0:
            return
        # Workers add to the set: list() takes it at once, under the GIL.
        for number, channel in enumerate(sorted(list(self.lingering_channels), key=lambda each: each.last_activity)):
            if number < excess or (cutoff is not None and channel.last_activity < cutoff):
                channel.close_now()

    def pull_trigger(self) -> None:
        # A worker wakes the loop after each request, and whenever it leaves
        # something for the loop to send; not for a connection the loop
        # watches already and has nothing to do for (see _Channel).
        channel = getattr(self.serving, "channel", None)
        if channel is not None and channel.joins_later:
            # The acceptor answers it, and the loop has not seen it yet.
            if channel.loop_needed_for() is None:
                return  # the acceptor waits for what comes next (_answer)
            channel.join()
        elif channel is not None and channel.loop_needs_nothing():
            return
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

    @property
    def stop_requested(self) -> bool:
        """Whether the server is to stop (or stopped)."""
        return self._stop_requested

    def wait_quiet(self, timeout: float) -> bool:
        return self.activity.wait_quiet(timeout)

    def test_ended(self, timeout: float) -> None:
        # waitress's workers start with the server and stay. A stream whose
        # buffer filled only while the end of the test waited for quiet
        # still holds one: cut it too, or later tests have a worker fewer.
        self.cut_stalled_writes()

    def cut_stalled_writes(self) -> None:
        """End the connections whose client stopped reading an answer
        still being written (a page left open with a long stream half
        read): their worker waits in waitress's ``write_soon`` for room
        that never comes, and the end of the test would wait for it in
        vain. Shut down, the socket fails the loop's next send, waitress
        closes the channel, and the worker's write raises
        ``ClientDisconnected``, which ends its request."""
        for channel in list(self.active_channels.values()):
            if not getattr(channel.outbuf_lock, "waiting", False):
                continue  # no worker waits for it (a wsgi.file_wrapper is sent by the loop alone)
            try:
                if not _takes_more(channel.socket):
                    channel.socket.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):  # closed meanwhile
                continue

    def give_up(self, test: str = "") -> None:
        self.activity.give_up(test)

    def request_stop(self) -> None:
        self._stop_requested = True
        self.task_dispatcher.wake_holders()
        self.pull_trigger()
        if self._accepting is not None:
            os.eventfd_write(self._acceptor_wake, 1)

    def release(self, timeout: float) -> None:
        deadline = Deadline(timeout)
        self._stop_requested = True  # also when the loop died before it was asked to stop
        self.task_dispatcher.wake_holders()
        # Closing the channels wakes workers blocked writing to them.
        for channel in list(self._map.values()):
            if isinstance(channel, HTTPChannel):
                channel.handle_close()
        with self._handing_on:  # the acceptor closes the one it waits on (_answer)
            if self.answering is not None:
                self.answering.handle_close()
        if self._accepting is not None:
            os.eventfd_write(self._acceptor_wake, 1)
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=deadline.remaining())
        for thread in [*self.task_dispatcher.started, self.acceptor]:
            if thread is not None:
                thread.join(deadline.remaining())
        with self._trigger_lock:
            self._trigger_closed = True
            wasyncore.close_all(self._map)
        if self._accepting is not None:
            self._accepting.close()
            os.close(self._acceptor_wake)
        self.task_dispatcher.close_waits()
        # The handler stays: a request still running now (past the
        # timeout, its thread left behind) may raise later. Its logger
        # without a handler, logging's last resort printed the traceback to
        # stderr; recorded, it fails the test during which it comes, should
        # the layer be set up again (pytest does so for each plain test
        # function), and is forgotten by the layer's next setUp otherwise.


class Layer(HTTPLayer):
    """Serves a WSGI application with waitress.

    The application is the ``wsgi_app`` resource of a base layer if there is
    one, else the ``wsgi_app`` argument or class attribute. Without any, the
    layer still sets up, and answers 503 until a test gives it one with
    ``layer['httpd'].set_app(app)``, as gocept.httpserverlayer's did.
    ``threads`` is how many requests run in the application at once
    (waitress's default, four); an idle keep-alive connection holds a
    worker only while another is idle and there are fewer connections
    than workers, and not once a request needs it.

    Positional arguments after the application are plone.testing's
    ``bases``, ``name`` and ``module``; a tuple or list first is taken as
    the bases (it cannot be an application), so gocept's
    ``Layer((BASE,), 'NAME')`` works too.
    """

    wsgi_app: WSGIApplication | None = None
    threads: int = 4
    #: Each request is logged through its ``log_request``; see
    #: ``LogWSGIRequestHandler``.
    request_handler_class: type[wsgiref.simple_server.WSGIRequestHandler] = LogWSGIRequestHandler
    #: gocept.httpserverlayer's wsgi layer listened on $GOCEPT_HTTP_APP_HOST,
    #: its custom and static layers did not; so only the wsgi layers read it.
    host_environment = ("SERVERLAYER_HTTP_HOST", "GOCEPT_HTTP_APP_HOST")

    def __init__(
        self,
        wsgi_app: WSGIApplication | Sequence[plone.testing.Layer] | None = None,
        *layer_arguments: Any,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(wsgi_app, (tuple, list)):
            layer_arguments = (wsgi_app, *layer_arguments)
            wsgi_app = None
        if len(layer_arguments) > 3:
            raise TypeError(
                f"wsgi.Layer takes an application and then at most bases, name"
                f" and module, but got {len(layer_arguments)} more arguments."
            )
        for key, value in zip(("bases", "name", "module"), layer_arguments, strict=False):
            if key in kwargs:
                raise TypeError(f"wsgi.Layer got two values for {key!r}.")
            kwargs[key] = value
        super().__init__(**kwargs)
        if wsgi_app is not None:
            self.wsgi_app = wsgi_app  # type: ignore[assignment]
        if threads is not None:
            self.threads = threads
        positive_number(self.threads, owner=repr(self), setting="threads")

    def application(self) -> WSGIApplication | None:
        """The application to serve; the ``wsgi_app`` resource wins."""
        app = self.get("wsgi_app") or self.wsgi_app
        if app is not None and not callable(app):
            raise ConfigurationError(
                f"{self!r}: the WSGI application {app!r} is not callable."
            )
        _refuse_asgi(app, repr(self))
        refuse_bound_application(self, app, "wsgi_app", ["environ", "start_response"])
        return app

    def setUp(self) -> None:
        self.application()  # fail before binding anything
        _check_request_handler_class(self, self.request_handler_class)
        super().setUp()

    def make_server(self, sockets: Sequence[socket.socket]) -> WaitressServer:
        handler_class: type[wsgiref.simple_server.WSGIRequestHandler] | None = self.request_handler_class
        if handler_class is LogWSGIRequestHandler and not verbose():
            # It would log nothing, and asking for each request whether to
            # costs a noticeable part of a small request's time. Like the
            # rest of serverlayer's logging, this is decided at setUp.
            handler_class = None
        return WaitressServer(
            self.application(),
            sockets,
            errors=self.server_errors,
            threads=self.threads,
            thread_name=f"serverlayer {self.__module__}.{self.__name__}",
            url_scheme=self.scheme,
            requests=self.requests,
            request_handler_class=handler_class,
            owner=repr(self),
        )

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        httpd = resources["httpd"]
        if isinstance(httpd, WaitressServer):
            if self.get("wsgi_app") is None:  # one published later is not served: the 503 says so
                httpd.app_slot.published_now = lambda: self.get("wsgi_app")
                httpd.app_slot.bases = ", ".join(identity(base) for base in self.__bases__)
            httpd.published_host = host
            # SERVER_NAME, which applications fall back on without a Host
            # header (wsgiref.util.application_uri): waitress says
            # "waitress.invalid"; gocept's wsgiref server named its host.
            # An IPv6 address in brackets, as in a URL.
            httpd.server_name = f"[{host}]" if ":" in host else host
        return resources

    def testSetUp(self) -> None:
        super().testSetUp()
        httpd = self.own_server()
        if isinstance(httpd, WaitressServer):
            httpd.app_slot.test_started()

    def check_after_test(self) -> None:
        httpd = self.own_server()
        if isinstance(httpd, WaitressServer):
            httpd.cut_stalled_writes()  # the test is over: no wait for them
        super().check_after_test()

    def testTearDown(self) -> None:
        try:
            super().testTearDown()
        finally:
            # What a test set with set_app ends with it.
            httpd = self.own_server()
            if isinstance(httpd, WaitressServer):
                httpd.app_slot.test_ended()
