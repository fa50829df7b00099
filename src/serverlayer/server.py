"""The lifecycle every serverlayer server shares.

A layer binds its listening sockets here, one at every address of its
host, so that a busy or unresolvable address fails in ``setUp`` with a
message saying where the address came from. The server then runs on a named daemon thread, and ``start`` returns
only once the serving loop runs, or raises what the loop raised. Stopping
wakes the loop at once instead of waiting for a poll interval, then lets the
server close its sockets and join its threads within a bounded time.

Each kind of server (waitress for WSGI, the thread pool behind the custom
and static layers, aiosmtpd for mail) implements the small ``Server``
protocol below and nothing else of the lifecycle.
"""

from __future__ import annotations

import asyncio
import asyncio.constants
import asyncio.selector_events
import errno
import logging
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from serverlayer.errors import AddressInUseError, ConfigurationError, SetUpError
from serverlayer.reporting import ErrorLog, verbose

#: How long ``start`` waits for a serving loop to come up. The wait ends as
#: soon as the loop runs or fails; the bound only matters for a loop that
#: hangs before serving.
READY_TIMEOUT = 10.0


class Server(Protocol):
    """What the lifecycle needs from a concrete server."""

    def serve(self, ready: Callable[[], None]) -> None:
        """Serve until ``request_stop`` is called; call ``ready`` once serving."""

    def request_stop(self) -> None:
        """Make ``serve`` return promptly. Called from another thread."""

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no request is being handled; False if ``timeout`` ran out."""

    def test_ended(self, timeout: float) -> None:
        """Give back what the test needed beyond an idle server (threads it
        started), waiting at most ``timeout`` for work still running."""

    def give_up(self, test: str = "") -> None:
        """Wait no more for the requests running now (``wait_quiet``): their
        test has ended, and its end waited for them in vain. ``test`` names
        it, for the errors those requests raise later (``ErrorLog.left_running``)."""

    def release(self, timeout: float) -> None:
        """Close every socket and join every thread, after ``serve`` returned.

        Work still running after ``timeout`` seconds is abandoned, so that a
        request that never ends cannot hang ``tearDown``.
        """


#: How often ``bind`` lets the system pick a port again when a name resolves
#: to several addresses and the picked port is taken at one of the others.
#: An attempt fails only if another program holds that very port there, so
#: a handful is plenty.
BIND_ATTEMPTS = 10

#: Why an address cannot be listened on at all, whatever the port: the
#: machine has no such address (IPv6 switched off, a stale hosts entry).
_UNAVAILABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def format_address(host: str, port: int) -> str:
    """``host:port`` as it goes into a URL: IPv6 literals get brackets."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


#: One address to listen on: family, socket type, protocol and the address
#: as ``getaddrinfo`` gives it.
Address = tuple[int, int, int, tuple[Any, ...]]


def resolve(host: str, port: int, *, owner: str, source: str) -> list[Address]:
    """The addresses to listen on for ``host``, in the resolver's order, each once.

    A name may stand for several addresses: ``localhost`` is ``::1`` and
    ``127.0.0.1`` on Debian and Ubuntu. Clients try them in an order of
    their own, so a server must listen on all of them.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(
            f"{owner}: cannot listen on host {host!r} ({source}): {exc.strerror}."
            + (_url_host_hint(host) or " Use an IP address such as 127.0.0.1 or ::1, or a name that"
               " this machine resolves.")
        ) from exc
    addresses: list[Address] = []
    for family, socktype, proto, _, sockaddr in infos:
        address = (int(family), int(socktype), proto, tuple(sockaddr))
        if address not in addresses:  # /etc/hosts may name an address twice
            addresses.append(address)
    if [address[3][0] for address in addresses] == ["::"]:
        # Every interface, IPv4 ones too: the layer publishes this machine's
        # name, which most often resolves to an IPv4 address alone. A socket
        # of its own, not one dual-stack socket, whose IPv4 clients the
        # application would see as ::ffff:127.0.0.1.
        wildcard = addresses[0]
        addresses.append((int(socket.AF_INET), wildcard[1], wildcard[2], ("0.0.0.0", port)))
    return addresses


def _url_host_hint(host: str) -> str:
    """What to write instead of a host written as a URL writes it (with
    brackets, a port or a scheme), or as socketserver's every-interface
    ``""``; empty if it is none of these. The resolver's "Name or service
    not known" alone puzzles whoever wrote ``localhost:8080``: localhost
    resolves."""
    if not host:
        return (
            " An empty host is no address here: for every interface use '0.0.0.0' (IPv4)"
            " or '::' (IPv6), for this machine alone 127.0.0.1 (the default)."
        )
    if "://" in host:
        parts = urllib.parse.urlsplit(host)
        if not parts.hostname:
            return ""
        try:
            port = f", and the port as port={parts.port}" if parts.port is not None else ""
        except ValueError:  # no port number
            port = ""
        return f" Give the host alone: {parts.hostname!r}{port} (no scheme, no path)."
    name, colon, port = host.rpartition(":")
    bracketed = name.startswith("[") and name.endswith("]")
    if colon and port.isdigit() and (bracketed or (name and ":" not in name)):
        return f" Give the port as port={port}, and the host alone: {name[1:-1] if bracketed else name!r}."
    if host.startswith("[") and host.endswith("]"):
        return f" Write an IPv6 address without brackets: {host[1:-1]!r}."
    return ""


class _BindFailure(Exception):
    """Listening on ``address`` at ``port`` failed with ``error``."""

    def __init__(self, address: str, port: int, error: OSError) -> None:
        super().__init__(address, port, error)
        self.address = address
        self.port = port
        self.error = error


def _set_listening_options(sock: socket.socket) -> None:
    """Set what a listening socket needs before it is bound."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        # Without it, [::] would take the port at 0.0.0.0 too, which a
        # wildcard name also resolves to, and which gets a socket of its own.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _bind_address(address: Address, port: int) -> tuple[Any, ...]:
    """What to bind for ``address`` at ``port``: an IPv6 address keeps its
    flow info and scope id, which a link-local one needs (its interface)."""
    sockaddr = address[3]
    return (sockaddr[0], port, *sockaddr[2:])


#: Connections the kernel completes before the server accepts them. A burst
#: of clients larger than this (a test gathering hundreds of requests at
#: once) loses connection attempts, which clients repeat only a second
#: later; the kernel caps it (net.core.somaxconn, 4096 on current Linux).
LISTEN_BACKLOG = 1024


def _listen(address: Address, port: int) -> socket.socket:
    """A socket listening on ``address`` at ``port``; raises OSError."""
    family, socktype, proto, _ = address
    sock = socket.socket(family, socktype, proto)
    try:
        _set_listening_options(sock)
        sock.bind(_bind_address(address, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen_everywhere(addresses: list[Address], port: int) -> list[socket.socket]:
    """One socket per address, all on ``port``, or on the one the system
    picks at the first address for port 0; raises ``_BindFailure``.

    An address the machine does not have is left out while another listens.
    """
    sockets: list[socket.socket] = []
    unavailable: _BindFailure | None = None
    try:
        for address in addresses:
            try:
                sock = _listen(address, port)
            except OSError as exc:
                failure = _BindFailure(address[3][0], port, exc)
                if exc.errno in _UNAVAILABLE and len(addresses) > 1:
                    unavailable = unavailable or failure
                    continue
                raise failure from exc
            sockets.append(sock)
            port = sock.getsockname()[1]
        if unavailable is not None and not sockets:
            raise unavailable from unavailable.error
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_hint(failure: _BindFailure) -> str:
    """What to do about a failure to listen other than a port in use."""
    code, address = failure.error.errno, failure.address
    if code in _UNAVAILABLE:
        return " This machine has no such address: use 127.0.0.1, ::1, or an address it has."
    if code == errno.EINVAL and address.lower().startswith("::ffff:"):
        return f" That is an IPv4 address written as IPv6: use {address[7:]}."
    if code == errno.EINVAL and address.lower().startswith("fe80:"):
        return f" A link-local address needs its interface, as in {address}%lo; 127.0.0.1 or ::1 need none."
    return ""


def bind(host: str, port: int, *, owner: str, source: str) -> list[socket.socket]:
    """Sockets listening on ``port`` at every address ``host`` resolves to.

    All of them listen on the same port, so that the one published host and
    port reach the server whichever address a client tries first. With
    port 0, when the port the system picked at the first address is taken
    at another, every socket is closed and the system picks again, up to
    ``BIND_ATTEMPTS`` times. An address this machine does not have (``::1``
    with IPv6 switched off) is left out, as long as another one listens.

    ``owner`` names the layer and ``source`` says where host and port were
    configured; both go into the error messages.
    """
    addresses = resolve(host, port, owner=owner, source=source)
    ips = [address[3][0] for address in addresses]
    if ips != [host]:  # a name: say what it stands for
        source = f"{host!r} is {' and '.join(ips)}; {source}"
    attempts = BIND_ATTEMPTS if port == 0 and len(addresses) > 1 else 1
    for _ in range(attempts):
        try:
            return _listen_everywhere(addresses, port)
        except _BindFailure as failure:
            if port == 0 and failure.error.errno == errno.EADDRINUSE:
                continue  # taken at a later address: let the system pick again
            where = format_address(failure.address, failure.port)
            if failure.port == 0:
                where += " (any free port)"
            if failure.error.errno == errno.EADDRINUSE:
                raise AddressInUseError(
                    f"{owner}: cannot listen on {where} ({source}): the port is"
                    " already in use. Stop whatever listens there, choose another"
                    " port, or use port 0 to let the system pick a free one."
                ) from failure.error
            raise SetUpError(
                f"{owner}: cannot listen on {where} ({source}): {failure.error.strerror}."
                + _bind_hint(failure)
            ) from failure.error
    raise AddressInUseError(
        f"{owner}: cannot listen on one port at every address of {host!r}"
        f" ({source}): {attempts} times, the port the system picked at the"
        " first was in use at another. Set the host to one of these addresses,"
        " or choose a port that is free at all of them."
    )


class Activity:
    """Which threads are handling a request right now.

    A request is not over when the client has its response: an application
    may still be closing its response, or a handler cleaning up, and raise.
    The layer waits for quiet before it checks a test's server errors, so
    that such an error is reported in the test that made the request and
    not in the next one.

    A request still running when its test has ended (a client that stopped
    reading a download, a handler waiting for ever) is given up on
    (``give_up``) and not waited for again: each later test's end would
    wait as long, in vain. An error it raises later says so (``left_running``).
    """

    def __init__(self) -> None:
        # Taken directly (not through the Condition, whose ``with`` is
        # Python code): every request starts and finishes.
        self._lock = threading.Lock()
        #: Made by the first wait: a Condition costs a kilobyte, and most
        #: servers sit idle (the memory benchmark's fifty).
        self._changed: threading.Condition | None = None
        self._busy: set[int] = set()
        #: Threads whose request a wait for quiet gave up on, and the test
        #: whose end did.
        self._given_up: dict[int, str] = {}
        #: Threads in ``wait_quiet``; only they need waking.
        self._waiting = 0

    def start(self) -> None:
        with self._lock:
            self._busy.add(threading.get_ident())

    def finish(self) -> None:
        with self._lock:
            me = threading.get_ident()
            self._busy.discard(me)
            self._given_up.pop(me, None)
            if self._waiting and self._changed is not None and self._busy <= self._given_up.keys():
                self._changed.notify_all()

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no request runs but those given up on; False if ``timeout`` ran out first."""
        with self._lock:
            if self._changed is None:
                self._changed = threading.Condition(self._lock)
            self._waiting += 1
            try:
                return self._changed.wait_for(lambda: self._busy <= self._given_up.keys(), timeout)
            finally:
                self._waiting -= 1

    def give_up(self, test: str = "") -> None:
        """Wait no more for the requests running now: their test (named
        ``test``) has ended, and its end waited for them."""
        with self._lock:
            for thread in self._busy:
                self._given_up.setdefault(thread, test)

    def left_running(self) -> str | None:
        """The test (its name, or "") whose end gave up on the request this
        thread serves; None if none did."""
        return self._given_up.get(threading.get_ident())


class ForwardedClients:
    """Who is really at the other end of each connection a TLS front forwards.

    The front connects to the server behind it from a loopback address of
    its own. Before it forwards a byte, it registers that address with its
    client's (and the certificate the client presented, if any), so that
    the server can tell its application what it would tell it without the
    front; it forgets the address when the connection ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}

    def register(self, front_side: tuple[Any, ...], client: tuple[Any, ...], certificate: Any = None) -> None:
        """``client`` is behind the connection the front made from ``front_side``."""
        with self._lock:
            self._clients[front_side[:2]] = (client, certificate)

    def forget(self, front_side: tuple[Any, ...]) -> None:
        with self._lock:
            self._clients.pop(front_side[:2], None)

    def client_of(self, peer: tuple[Any, ...], default: tuple[Any, ...]) -> tuple[Any, ...]:
        """The client behind a connection whose peer is ``peer`` (as
        ``accept`` gave it), else ``default``."""
        with self._lock:
            forwarded = self._clients.get(peer[:2])
        return default if forwarded is None else forwarded[0]

    def certificate_of(self, peer: tuple[Any, ...]) -> Any:
        """The ``tls.ClientCertificate`` the client behind ``peer`` presented, or ``None``."""
        with self._lock:
            forwarded = self._clients.get(peer[:2])
        return None if forwarded is None else forwarded[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)


class SocketserverStops:
    """``shutdown()`` and ``server_close()``, as socketserver's servers
    have them: gocept.httpserverlayer's ``httpd`` (wsgiref's
    ``WSGIServer``, ``HTTPServer``) had them, and a test may stop the
    server with them to see its client cope with one gone. ``serve``
    notes its thread in ``serving_thread``. (socketserver's ``BaseServer``,
    the custom layer's base, waits in ``shutdown`` for ``serve_forever``,
    which these servers do not run: it waited for ever.)"""

    sockets: list[socket.socket]
    #: The thread running ``serve``, for ``shutdown`` to wait for (an Event
    #: would cost every idle server a lock and a condition).
    serving_thread: threading.Thread | None = None

    def request_stop(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop serving, and return once the serving loop has ended. The
        listening sockets stay open, as under socketserver, until
        ``server_close`` or the layer's ``tearDown``."""
        self.request_stop()
        thread = self.serving_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def server_close(self) -> None:
        """Stop serving (``shutdown``) and close the listening sockets, so
        that new clients are refused. The layer's ``tearDown`` releases
        the rest as always."""
        self.shutdown()
        for sock in self.sockets:
            sock.close()


class Deadline:
    """A point in time that several joins share."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())


class ServerThread:
    """Runs a ``Server`` on a named daemon thread.

    ``failure`` holds what the serving loop raised, if it died; the layer
    reports it like any other server-side error.
    """

    def __init__(self, server: Server, *, name: str) -> None:
        self.server = server
        self.failure: BaseException | None = None
        # ``start`` makes the Event it waits on, for the thread to hold only
        # while it needs it: an idle server keeps a kilobyte less.
        self._ready: threading.Event | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.server.serve(self._became_ready)
        except BaseException as exc:
            self.failure = exc
        finally:
            # Wake ``start`` if the loop died before it became ready.
            self._became_ready()

    def _became_ready(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.set()

    def start(self, *, owner: str) -> None:
        """Start serving; return once the loop runs, or raise why it can't."""
        self._ready = ready = threading.Event()
        self.thread.start()
        became_ready = ready.wait(READY_TIMEOUT)
        if self.failure is not None or not became_ready:
            if self.failure is not None:
                self.thread.join(READY_TIMEOUT)  # the loop is over; let its thread end
                raise SetUpError(
                    f"{owner}: the server failed while starting:"
                    f" {self.failure!r}"
                ) from self.failure
            still_starting: Callable[[], str | None] | None = getattr(self.server, "still_starting", None)
            waiting = still_starting() if still_starting is not None else None
            raise SetUpError(
                f"{owner}: the server did not start serving within"
                f" {READY_TIMEOUT} seconds" + (f": {waiting}." if waiting else ".")
            )

    def stop(self, *, timeout: float) -> None:
        """Stop serving, then close every socket and join every thread."""
        if self.thread.is_alive():
            self.server.request_stop()
            self.thread.join(timeout)
        self.server.release(timeout)


#: How many closed connections a listening socket may remember before it
#: looks which of its connections are still open.
PRUNE_AT_LEAST = 64


#: How many connections a server accepts in one loop turn, at most:
#: asyncio's default for ``create_server`` (its ``backlog``, which it also
#: accepts per turn). A flood of clients then holds up neither the
#: connections already served nor a stop for long.
ACCEPTS_PER_TURN = 100


class _RememberingSocket(socket.socket):
    """A listening socket that remembers the connections it accepted, and
    takes a flood of clients a hundred at a time.

    asyncio hands a TLS connection to its protocol only once the handshake
    is done; one still shaking hands when the server stops would otherwise
    be left for the garbage collector to close.

    asyncio's ``create_server`` accepts connections until none is left or
    its backlog (``LISTEN_BACKLOG``) is reached, in one loop turn, and each
    starts a task (and a TLS handshake). Under a flood of clients that made
    turns of a second, which the connections already served and a stop
    waited for: ``tearDown`` took up to a second. Here the socket says that
    no connection is waiting after ``ACCEPTS_PER_TURN`` in a row (it is
    still readable: the next turn takes the next ones), and once its server
    is stopping (those still waiting are refused as it closes). A blocking
    socket, which no loop serves, accepts on.
    """

    accepted: set[socket.socket]
    #: The size at which ``accepted`` is next rid of closed connections:
    #: twice what remained the last time, so that each accept costs the same
    #: however many connections are open.
    prune_at: int
    #: Connections accepted since a caller was last told that none waits.
    in_a_row: int
    #: Set by the server's stop, from another thread.
    stopping: bool

    def accept(self) -> tuple[socket.socket, Any]:
        if self.stopping or (self.in_a_row >= ACCEPTS_PER_TURN and not self.getblocking()):
            self.in_a_row = 0
            raise BlockingIOError(errno.EAGAIN, "no more connections this loop turn")
        try:
            connection, address = super().accept()
        except OSError:  # none waiting, or the caller pauses (out of descriptors)
            self.in_a_row = 0
            raise
        self.in_a_row += 1
        accepted = self.accepted
        if len(accepted) >= self.prune_at:
            accepted = self.accepted = {known for known in accepted if known.fileno() != -1}
            self.prune_at = 2 * len(accepted) + PRUNE_AT_LEAST
        accepted.add(connection)
        return connection, address


def remembering(sock: socket.socket) -> _RememberingSocket:
    """``sock``, as a socket that remembers what it accepts (it takes the descriptor over)."""
    listening = _RememberingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    listening.accepted = set()
    listening.prune_at = PRUNE_AT_LEAST
    listening.in_a_row = 0
    listening.stopping = False
    return listening


class Listening(Protocol):
    """A socket being served: what ``asyncio.Server`` offers for stopping."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


#: Why accepting fails for a while: the process is out of descriptors or
#: memory. The listening socket stays readable meanwhile, so accepting
#: pauses, as asyncio's does, instead of spinning.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _first_read(transport: asyncio.Transport) -> None:
    """Read what the client sent with its connection, unless its protocol
    paused reading or closed the transport meanwhile."""
    if transport.is_reading():
        transport._read_ready()  # type: ignore[attr-defined]


class PlainAccepting:
    """Serves plain TCP connections on ``sock``: each one's transport is made
    in the loop turn that accepts it, and what the client sent with its
    connection is read in the next, with ``connection_made``.

    asyncio's ``create_server`` runs a task for each connection it accepts,
    which waits a loop turn for the transport's ``connection_made``, and
    reads what the client sent with its connection a turn later again. A
    plain connection has no handshake to wait for, and an HTTP client sends
    its request as soon as it connects; for a client that connects for
    each request (``Connection: close``), those turns and the task were 5
    to 10 percent of the server's work. It relies on two private methods of
    asyncio's selector loop and transports, present in Python 3.10 to 3.13;
    ``accepting_plain`` says whether the loop has them. TLS connections go
    through ``create_server``, which does the handshake.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        transports: set[asyncio.Transport],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        #: Where each transport is registered as it is made, for stopping to abort it.
        self.transports = transports
        sock.setblocking(False)
        self._resume: asyncio.TimerHandle | None = None
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        loop = self.loop
        # A listening socket of ``remembering`` says none waits after
        # ACCEPTS_PER_TURN in a row; asyncio's own bound, for any other.
        for _ in range(LISTEN_BACKLOG):
            try:
                connection, address = self.sock.accept()
                connection.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # none left
            except OSError as exc:
                message = "accepting a connection failed"
                if exc.errno in _OUT_OF_RESOURCES:
                    message += (
                        " (the process is out of file descriptors or memory: close the clients and files"
                        " tests leave open, or raise the limit, ulimit -n); accepting again in"
                        f" {asyncio.constants.ACCEPT_RETRY_DELAY:g} s"
                    )
                loop.call_exception_handler({"message": message, "exception": exc})
                if exc.errno in _OUT_OF_RESOURCES:
                    loop.remove_reader(self.sock.fileno())
                    self._resume = loop.call_later(
                        asyncio.constants.ACCEPT_RETRY_DELAY, loop.add_reader, self.sock.fileno(), self._accept
                    )
                return
            try:
                protocol = self.protocol_factory()
            except Exception as exc:  # noqa: BLE001 - a bug on the server's side: report it, serve on
                connection.close()
                loop.call_exception_handler({"message": "making a connection's protocol failed", "exception": exc})
                continue
            try:
                transport = loop._make_socket_transport(  # type: ignore[attr-defined]
                    connection, protocol, extra={"peername": address}
                )
            except OSError:  # the client left already (asyncio drops these silently too)
                connection.close()
                continue
            self.transports.add(transport)
            # After the transport's connection_made and its start of
            # reading, which it scheduled.
            loop.call_soon(_first_read, transport)

    def close(self) -> None:
        """Stop accepting and close the socket, so that new clients are refused at once."""
        if self._resume is not None:
            self._resume.cancel()
        if self.sock.fileno() != -1:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        """Return at once: the connections accepted are the server's to close (``transports``)."""


def accepting_plain(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``PlainAccepting`` works with ``loop`` (a selector loop)."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop) and hasattr(
        asyncio.selector_events._SelectorSocketTransport, "_read_ready"  # type: ignore[attr-defined]
    )


class _NotFromThread(logging.Filter):
    """Lets through the records of every thread but one."""

    def __init__(self, thread_id: int) -> None:
        super().__init__()
        self.thread_id = thread_id

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread_id


def holding_code(thread_id: int | None, *, limit: int = 12) -> str | None:
    """Where the thread ``thread_id``, an event loop's, is, if it runs code
    of its own rather than wait for events in its selector: the synchronous
    code that holds the loop (a blocking call in a coroutine). None if it
    waits, or is gone."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    if frame is None or (frame.f_code.co_name == "select" and frame.f_code.co_filename.endswith("selectors.py")):
        return None
    return "".join(traceback.format_stack(frame, limit=limit)).rstrip()


class AsyncioServer:
    """A ``Server`` whose connections are served by an asyncio event loop of its own.

    Subclasses start serving on each listening socket in ``start``;
    connections register their transports in ``transports`` so that
    stopping can abort every one, whatever state its conversation is in.
    """

    #: Tasks that did not end when cancelled, which the shutdown leaves
    #: behind rather than wait for them for ever (a subclass says so).
    abandoned: AbstractSet[asyncio.Task[Any]] = frozenset()

    def __init__(self, sockets: Sequence[socket.socket], *, errors: ErrorLog) -> None:
        #: One listening socket per address of the layer's host.
        self.sockets = [remembering(sock) for sock in sockets]
        #: The first of them, which the system picked the port at.
        self.socket = self.sockets[0]
        self.errors = errors
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_exception)
        self.transports: set[asyncio.Transport] = set()
        #: The task that prepares and starts serving, while it runs.
        self._starting: asyncio.Task[None] | None = None
        #: The thread the loop runs in, once it serves.
        self.thread_id: int | None = None
        #: Whether the loop serves (``run_forever``), and whether the stop
        #: came (``_stop``): both set and read in the loop's thread alone.
        self._serving = False
        self._stop_asked = False

    async def prepare(self) -> None:
        """Run on the loop before any socket serves; what it raises fails
        ``setUp``. An application's startup (ASGI lifespan) goes here."""

    async def start(self, sock: socket.socket) -> Listening:
        """Start serving on ``sock``, one of ``self.sockets``."""
        raise NotImplementedError

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("task") in self.abandoned:
            return  # "Task was destroyed but it is pending!": reported as it was abandoned
        error = context.get("exception")
        if isinstance(error, (ConnectionError, TimeoutError, ssl.SSLError, asyncio.CancelledError)):
            return  # a client that hung up or failed its handshake, or the server stopping
        exc_info = None if error is None else (type(error), error, error.__traceback__)
        self.errors.record(str(context.get("message", "asyncio error")), exc_info)

    def serve(self, ready: Callable[[], None]) -> None:
        asyncio.set_event_loop(self.loop)
        # asyncio's transports log what they meet with clients straight to
        # the "asyncio" logger ("socket.send() raised exception." when an
        # application goes on sending to a client that left), and with no
        # handler set up that goes to stderr, into the test run's output.
        # What is a server error reaches the loop's exception handler; the
        # rest of this thread's records are dropped, unless verbose.
        quiet = None if verbose() else _NotFromThread(threading.get_ident())
        if quiet is not None:
            logging.getLogger("asyncio").addFilter(quiet)
        # asyncio serves one socket per server: one server per socket.
        servers: list[Listening] = []

        async def starting() -> None:
            # One run of the loop for all of it: each run_until_complete
            # costs a task and two turns of the loop, a noticeable part of
            # a setUp that takes half a millisecond.
            await self.prepare()
            for sock in self.sockets:
                servers.append(await self.start(sock))

        self.thread_id = threading.get_ident()
        try:
            self._starting = self.loop.create_task(starting())
            self.loop.run_until_complete(self._starting)
            self._starting = None
            if not self._stop_asked:  # in the turn the start finished in: asked before it served
                self._serving = True
                self.loop.call_soon(ready)
                self.loop.run_forever()
                self._serving = False
        finally:
            try:
                self._shut_down(servers)
            finally:
                asyncio.set_event_loop(None)
                if quiet is not None:
                    logging.getLogger("asyncio").removeFilter(quiet)

    def _shut_down(self, servers: list[Listening]) -> None:
        # A server whose socket ``release`` closed already (synchronous code
        # held the loop past the layer's stop_timeout, and tearDown went on
        # without it) cannot be closed: asyncio fails to unregister a closed
        # socket (ValueError), and the shutdown ended there, leaving the loop
        # and its connections open. Closing the loop unregisters it.
        # ``serve`` starts a server per socket, in order; a failed start leaves fewer servers.
        servers = [server for server, sock in zip(servers, self.sockets, strict=False) if sock.fileno() != -1]
        for server in servers:
            server.close()
        for transport in list(self.transports):
            transport.abort()
        tasks = asyncio.all_tasks(self.loop) - self.abandoned
        for task in tasks:
            task.cancel()

        async def closing() -> None:  # one run of the loop, as in ``serve``
            await asyncio.gather(*tasks, return_exceptions=True)
            for server in servers:
                await server.wait_closed()
            await self.loop.shutdown_asyncgens()

        self.loop.run_until_complete(closing())
        self.loop.close()
        for sock in self.sockets:
            for connection in sock.accepted:
                connection.close()

    def wait_quiet(self, timeout: float) -> bool:
        return True  # handlers run on the loop and report before they answer

    def test_ended(self, timeout: float) -> None:
        pass  # the loop's one thread is all it ever has

    def give_up(self, test: str = "") -> None:
        pass  # nothing to wait for (``wait_quiet``)

    def request_stop(self) -> None:
        for sock in self.sockets:
            sock.stopping = True
        try:
            self.loop.call_soon_threadsafe(self._stop)
        except RuntimeError:  # the loop already finished
            pass

    def _stop(self) -> None:
        """In the loop's thread: end the start if it is still under way,
        else the serving.

        The start is cancelled rather than the loop stopped under it: a
        start whose synchronous code held the loop (a blocking call in an
        application's startup) finishes in the very turn the stop comes,
        and asyncio's callback that stops the loop for
        ``run_until_complete`` was then left pending. It stopped the
        shut-down's first run at once, which failed: the loop was never
        closed (ResourceWarnings at garbage collection) nor its tasks ended.
        """
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
            return
        # Once: a stop asked again (two threads at once) that comes after
        # the serving ended would stop the shut-down's first run of the
        # loop, which then failed, leaving the loop and its sockets open.
        self._stop_asked = True
        if self._serving:
            self.loop.stop()

    def release(self, timeout: float) -> None:
        for sock in self.sockets:
            sock.close()
