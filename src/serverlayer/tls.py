"""TLS for every layer, with certificates from a throwaway certificate authority.

One certificate authority per test process, made with trustme on first use
(ECDSA keys, so that making it costs milliseconds), issues each server a
certificate for ``localhost``, ``127.0.0.1``, ``::1`` and the layer's own
host names. Layers with TLS publish the CA as ``ca_bundle`` (a PEM file for
``requests``' ``verify=`` or ``curl --cacert``) and ``ssl_context`` (a
client context that trusts it), so tests verify certificates instead of
switching verification off.

Code that cannot be handed a CA (a library deep inside the application)
trusts it while ``TRUST_TEST_CA`` is set up: that layer points the
environment variables OpenSSL, requests and curl read at a bundle of the
system's CAs plus the test CA, and restores them in ``tearDown``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import ssl
import tempfile
import threading
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import plone.testing
import trustme

from serverlayer.reporting import ErrorLog
from serverlayer.server import AsyncioServer, ForwardedClients, Server, ServerThread

#: Names every server certificate carries, whatever the layer's host.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: What TRUST_TEST_CA sets: OpenSSL's default CA file (Python's ssl module,
#: urllib), requests' and curl's.
TRUST_ENVIRONMENT = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def certificate_names(*hosts: str) -> tuple[str, ...]:
    """The loopback names plus ``hosts``, without wildcards or repeats."""
    names = list(LOOPBACK_NAMES)
    for host in hosts:
        if host and host not in names and not _is_wildcard(host):
            names.append(host)
    return tuple(names)


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class CertificateAuthority:
    """The test process's certificate authority and the files it needs."""

    def __init__(self) -> None:
        self._ca = trustme.CA()
        self._directory = tempfile.mkdtemp(prefix="serverlayer-ca-")
        weakref.finalize(self, shutil.rmtree, self._directory, ignore_errors=True)
        self.ca_bundle = os.path.join(self._directory, "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_bundle)
        self._server_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def server_context(self, names: tuple[str, ...]) -> ssl.SSLContext:
        """A server context with a certificate for ``names``, made once per set of names."""
        with self._lock:
            context = self._server_contexts.get(names)
            if context is None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                self._ca.issue_cert(*names).configure_cert(context)
                # The HTTP layers speak HTTP/1.1 only: a client that offers
                # HTTP/2 as well (curl, httpx) settles on HTTP/1.1 at once.
                # SMTP layers share the context; their clients offer no
                # ALPN, and one offering other protocols gets none.
                context.set_alpn_protocols(["http/1.1"])
                self._server_contexts[names] = context
            return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (and only this CA)."""
        return ssl.create_default_context(cafile=self.ca_bundle)

    def system_bundle(self) -> str:
        """A PEM file with the system's CAs and this one, written once."""
        path = os.path.join(self._directory, "system-and-test-ca.pem")
        with self._lock:
            if not os.path.exists(path):
                defaults = ssl.get_default_verify_paths()
                system = ""
                for candidate in (defaults.cafile, defaults.openssl_cafile):
                    if candidate and os.path.exists(candidate):
                        with open(candidate, encoding="ascii", errors="replace") as file:
                            system = file.read()
                        break
                with open(path, "w", encoding="ascii") as file:
                    file.write(system.rstrip("\n") + "\n" + self._ca.cert_pem.bytes().decode("ascii"))
        return path


_authority: CertificateAuthority | None = None
_authority_lock = threading.Lock()


def certificate_authority() -> CertificateAuthority:
    """The process's CA, made on first use."""
    global _authority
    with _authority_lock:
        if _authority is None:
            _authority = CertificateAuthority()
        return _authority


class TLSFront(AsyncioServer):
    """Terminates TLS on the layer's sockets and forwards each connection in
    plain text to the server behind it, on an internal loopback socket.

    waitress speaks no TLS; one front for every HTTP layer keeps their HTTP
    behaviour the same with and without it. A client that fails the
    handshake, or speaks plain HTTP, loses its connection; the server goes
    on serving everybody else.

    The server behind sees the front's connections, from a loopback port of
    the front's; it finds the real client in its ``forwarded_clients`` and
    the port clients connect to in its ``published_port``, so that it can
    tell the application what it would tell it over plain HTTP.
    """

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        backend: Server,
        backend_socket: socket.socket,
        *,
        context: ssl.SSLContext,
        errors: ErrorLog,
        thread_name: str,
    ) -> None:
        super().__init__(sockets, errors=errors)
        self.backend = backend
        self.context = context
        self._backend_socket = backend_socket
        self._backend_address = backend_socket.getsockname()[:2]
        self.clients = ForwardedClients()
        backend.forwarded_clients = self.clients  # type: ignore[attr-defined]
        backend.published_port = self.socket.getsockname()[1]  # type: ignore[attr-defined]
        self._backend_thread = ServerThread(backend, name=f"{thread_name} behind TLS")
        self._thread_name = thread_name
        # asyncio keeps only weak references to running tasks; a connection's
        # tasks must live until it is over.
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> asyncio.base_events.Server:
        return await asyncio.start_server(self._forward, sock=sock, ssl=self.context)

    def serve(self, ready: Callable[[], None]) -> None:
        try:
            self._backend_thread.start(owner=self._thread_name)
        except BaseException:
            self.loop.close()  # it will never run; its descriptors go now
            raise
        super().serve(ready)

    def _keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _open_backend(self, client: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the backend from an address registered as
        ``client``'s before it connects, so that the backend finds the
        client however early it looks: when it accepts, or at a request."""
        sock = socket.socket(self._backend_socket.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((self._backend_address[0], 0))
            self.clients.register(sock.getsockname(), client)
            await asyncio.get_running_loop().sock_connect(sock, self._backend_address)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            self.clients.forget(sock.getsockname())
            sock.close()
            raise

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        if current is not None:
            self._keep(current)  # type: ignore[arg-type]
        client_transport = client_writer.transport
        self.transports.add(client_transport)  # type: ignore[arg-type]
        try:
            backend_reader, backend_writer = await self._open_backend(client_writer.get_extra_info("peername"))
        except OSError:
            client_writer.close()
            self.transports.discard(client_transport)  # type: ignore[arg-type]
            return
        self.transports.add(backend_writer.transport)  # type: ignore[arg-type]
        front_side = backend_writer.get_extra_info("sockname")
        try:
            await asyncio.gather(
                self._keep(asyncio.create_task(_pump(client_reader, backend_writer))),
                self._keep(asyncio.create_task(_pump(backend_reader, client_writer))),
            )
        finally:
            self.clients.forget(front_side)  # first: what follows may be cancelled
            for writer in (client_writer, backend_writer):
                writer.close()
            for writer in (client_writer, backend_writer):
                await _closed(writer)
                self.transports.discard(writer.transport)  # type: ignore[arg-type]

    def wait_quiet(self, timeout: float) -> bool:
        return self.backend.wait_quiet(timeout)

    def test_ended(self, timeout: float) -> None:
        self.backend.test_ended(timeout)

    def release(self, timeout: float) -> None:
        super().release(timeout)
        self._backend_thread.stop(timeout=timeout)
        self._backend_socket.close()


#: How long a connection may take to finish its TLS shutdown before it is cut.
CLOSE_TIMEOUT = 1.0


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Wait until ``writer``'s connection is closed, cutting it if its peer
    never finishes the TLS shutdown; its socket must not outlive it."""
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
        writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then pass the end on."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:  # TLS cannot half-close
            writer.close()
    except (ConnectionError, ssl.SSLError):
        writer.close()


class TrustLayer(plone.testing.Layer):
    """Makes code that builds its own TLS contexts trust the test CA.

    While set up, ``SSL_CERT_FILE`` (read by OpenSSL, so by Python's ssl
    module and urllib), ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE`` name a
    bundle of the system's CAs plus the test CA, and urllib's default opener
    is made anew; ``tearDown`` restores what the variables were. A client
    that made its TLS context before (a long-lived session, a connection
    pool) keeps the CAs it had. Stack it with a TLS layer: ``bases=(HTTPS_LAYER, TRUST_TEST_CA)``.
    """

    def setUp(self) -> None:
        bundle = certificate_authority().system_bundle()
        self._saved = {name: os.environ.get(name) for name in TRUST_ENVIRONMENT}
        for name in TRUST_ENVIRONMENT:
            os.environ[name] = bundle
        _forget_urllib_opener()
        self["ca_bundle"] = certificate_authority().ca_bundle

    def tearDown(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _forget_urllib_opener()
        del self["ca_bundle"]


def _forget_urllib_opener() -> None:
    """Make ``urlopen()`` read the CA settings again.

    Since Python 3.12 its default opener makes its TLS context once, when
    the first ``urlopen()`` of the process builds it; ``install_opener(None)``
    is the documented way to have the next call build a new one.
    """
    urllib.request.install_opener(None)  # type: ignore[arg-type]


#: Trust the test CA for the duration of a layer.
TRUST_TEST_CA = TrustLayer(name="TRUST_TEST_CA")
