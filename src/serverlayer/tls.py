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

The same CA issues client certificates for layers that ask for them
(``client_certs="optional"`` or ``"required"``), so that mutual TLS works
without a second authority to configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import re
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import plone.testing
import trustme

from serverlayer.errors import ConfigurationError
from serverlayer.reporting import ErrorLog
from serverlayer.server import LISTEN_BACKLOG, AsyncioServer, ForwardedClients, Server, ServerThread

#: Names every server certificate carries, whatever the layer's host.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: What TRUST_TEST_CA sets: OpenSSL's default CA file (Python's ssl module,
#: urllib), requests' and curl's.
TRUST_ENVIRONMENT = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
#: What ``client_certs=`` asks of clients, as the server's verify mode.
CLIENT_CERT_MODES = {"optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
#: The identity of the ``client_cert`` resource.
DEFAULT_CLIENT = "test-client"
#: What ``issue_client_cert`` accepts: an e-mail address or a host-like name.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


@dataclasses.dataclass(frozen=True)
class ClientCertificate:
    """The certificate a client presented in its TLS handshake, as an
    application's certificate-based login would look at it."""

    #: The subject as an RFC 4514 string, most specific part first
    #: (``CN=alice,OU=test clients,O=serverlayer``), as mod_ssl's
    #: ``SSL_CLIENT_S_DN`` has it.
    subject: str
    issuer: str
    #: The subject's common name, if it has one.
    common_name: str | None
    #: The subject alternative names' values: host names, e-mail addresses, IP addresses.
    sans: tuple[str, ...]
    serial: int
    #: The certificate in PEM form, as ``SSL_CLIENT_CERT`` has it.
    pem: str

    @classmethod
    def from_der(cls, der: bytes) -> ClientCertificate:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        certificate = x509.load_der_x509_certificate(der)
        try:
            alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = tuple(str(name.value) for name in alternatives)
        except x509.ExtensionNotFound:
            sans = ()
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cls(
            subject=certificate.subject.rfc4514_string(),
            issuer=certificate.issuer.rfc4514_string(),
            common_name=str(common_names[0].value) if common_names else None,
            sans=sans,
            serial=certificate.serial_number,
            pem=ssl.DER_cert_to_PEM_cert(der),
        )

    @classmethod
    def from_pem(cls, pem: str) -> ClientCertificate:
        return cls.from_der(ssl.PEM_cert_to_DER_cert(pem))


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
        self._server_contexts: dict[tuple[tuple[str, ...], str | None], ssl.SSLContext] = {}
        #: The certificate (PEM) each of those contexts presents.
        self._server_certificates: dict[ssl.SSLContext, str] = {}
        self._client_certs: dict[str, str] = {}
        self._lock = threading.Lock()

    def server_certificate(self, context: ssl.SSLContext) -> str | None:
        """The certificate (PEM) a context of ``server_context`` presents; None for another context."""
        return self._server_certificates.get(context)

    def server_context(
        self, names: tuple[str, ...], client_certs: str | None = None, *, owner: str = ""
    ) -> ssl.SSLContext:
        """A server context with a certificate for ``names``, made once per
        set of names; with ``client_certs`` (a key of ``CLIENT_CERT_MODES``)
        it asks clients for a certificate from this CA.

        A name no certificate can hold raises ``ConfigurationError``, which
        ``owner`` (the layer) begins.
        """
        with self._lock:
            context = self._server_contexts.get((names, client_certs))
            if context is None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                leaf = self._issue_for_hosts(names, owner)
                leaf.configure_cert(context)
                self._server_certificates[context] = leaf.cert_chain_pems[0].bytes().decode()
                if client_certs is not None:
                    context.verify_mode = CLIENT_CERT_MODES[client_certs]
                    context.load_verify_locations(cafile=self.ca_bundle)
                # The HTTP layers speak HTTP/1.1 only: a client that offers
                # HTTP/2 as well (curl, httpx) settles on HTTP/1.1 at once.
                # SMTP layers share the context; their clients offer no
                # ALPN, and one offering other protocols gets none.
                context.set_alpn_protocols(["http/1.1"])
                # No TLS 1.3 session tickets: the server sends them right
                # after the handshake, and a client that reads on one thread
                # while it sends its first request on another (websockets'
                # sync client) then uses its SSL object from two threads at
                # once, which OpenSSL does not allow: one connection in a few
                # hundred lost its request and hung. A test server has no
                # use for resuming sessions.
                context.num_tickets = 0
                self._server_contexts[names, client_certs] = context
            return context

    def _issue_for_hosts(self, names: tuple[str, ...], owner: str) -> trustme.LeafCert:
        """A server certificate for ``names``; ``ConfigurationError`` naming
        the first that none can hold.

        trustme puts a name that is no IP address into the certificate as a
        DNS name, which idna refuses unless it is letters, digits, hyphens
        and dots: Docker Compose's ``web_1`` failed setUp with idna's
        "Codepoint U+005F at position 4 of 'web_1' not allowed", which said
        neither where the name came from nor what to do.
        """
        try:
            return self._ca.issue_cert(*names)
        except ValueError as error:  # idna's refusals are UnicodeErrors, so ValueErrors
            culprit, reason = ", ".join(names), error
            for name in names:
                try:
                    self._ca.issue_cert(name)
                except ValueError as refusal:
                    culprit, reason = repr(name), refusal
                    break
            raise ConfigurationError(
                f"{owner + ': ' if owner else ''}{culprit} cannot be named in a TLS certificate"
                f" ({reason}): a certificate names a host by an IP address, or by a name of"
                " letters, digits, hyphens and dots (no '_', no port, no brackets). Give the"
                " layer such a host, and public_host= (or SERVERLAYER_HTTP_PUBLIC_HOST,"
                " SERVERLAYER_SMTP_PUBLIC_HOST) for the name clients use, if this one is not it."
            ) from error

    def client_context(self, client_cert: str | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA (and only this CA), and
        presents ``client_cert`` (a file ``client_cert()`` wrote) if given."""
        context = ssl.create_default_context(cafile=self.ca_bundle)
        if client_cert is not None:
            context.load_cert_chain(client_cert)
        return context

    def client_cert(self, name: str = DEFAULT_CLIENT) -> str:
        """A PEM file with a private key and a client certificate for
        ``name`` (its common name, and its subject alternative name), issued
        once per name: what requests' ``cert=``, httpx's ``cert=`` and
        ``curl --cert`` take, and ``SSLContext.load_cert_chain``.

        ``name`` is an e-mail address or a host-like name (letters, digits,
        dots and hyphens) of 64 characters at most, as certificates carry them.
        """
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
            raise ConfigurationError(
                f"A client certificate cannot be issued for {name!r}: name an"
                " e-mail address ('alice@example.org') or use letters, digits,"
                " dots and hyphens ('alice', 'billing-service')."
            )
        with self._lock:
            path = self._client_certs.get(name)
            if path is None:
                try:
                    certificate = self._ca.issue_cert(
                        name, common_name=name, organization_name="serverlayer", organization_unit_name="test clients"
                    )
                except ValueError as error:
                    # What the pattern above lets through and a certificate
                    # cannot hold: cryptography's "Attribute's length must
                    # be >= 1 and <= 64" or idna's "Label too long" and
                    # "Empty Label" said neither which name nor why.
                    raise ConfigurationError(
                        f"A client certificate cannot be issued for {name!r} ({error}): the name is"
                        " its common name, which holds at most 64 characters, and a host-like"
                        " name's parts between dots hold 1 to 63 each."
                    ) from error
                path = os.path.join(self._directory, f"client-{len(self._client_certs)}.pem")
                certificate.private_key_and_cert_chain_pem.write_to_path(path)
                self._client_certs[name] = path
            return path

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
        return await asyncio.start_server(self._forward, sock=sock, ssl=self.context, backlog=LISTEN_BACKLOG)

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

    async def _open_backend(
        self, client: Any, certificate: ClientCertificate | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the backend from an address registered as
        ``client``'s before it connects, so that the backend finds the
        client however early it looks: when it accepts, or at a request."""
        sock = socket.socket(self._backend_socket.family, socket.SOCK_STREAM)
        try:
            # Sent at once: with Nagle's algorithm on, a request's body waits
            # behind its head for the backend's delayed ACK, some 40 ms.
            # (asyncio turns it off only on sockets made with proto IPPROTO_TCP.)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sock.bind((self._backend_address[0], 0))
            self.clients.register(sock.getsockname(), client, certificate)
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
            backend_reader, backend_writer = await self._open_backend(
                client_writer.get_extra_info("peername"), presented_certificate(client_transport)
            )
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

    def give_up(self, test: str = "") -> None:
        self.backend.give_up(test)

    def release(self, timeout: float) -> None:
        super().release(timeout)
        self._backend_thread.stop(timeout=timeout)
        self._backend_socket.close()


def presented_certificate(transport: asyncio.BaseTransport) -> ClientCertificate | None:
    """The certificate the client of a TLS ``transport`` presented (and the
    server verified), or ``None``."""
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return ClientCertificate.from_der(der) if der else None


#: The TLS versions as ssl.SSLObject.version() names them, and as the ASGI
#: TLS extension numbers them (the protocol's own version numbers).
_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

#: Each server context's cipher suites: OpenSSL's name to the IANA number.
_cipher_suites: weakref.WeakKeyDictionary[ssl.SSLContext, dict[str, int]] = weakref.WeakKeyDictionary()


def asgi_tls_extension(
    ssl_object: ssl.SSLObject, client_cert: ClientCertificate | None, server_cert: str | None
) -> dict[str, Any]:
    """What asgiref's TLS extension (``scope["extensions"]["tls"]``) tells an
    ASGI application of its client's TLS connection, which uvicorn does not:
    a certificate login reads ``client_cert_name`` or ``client_cert_chain``
    there, as a WSGI one reads ``SSL_CLIENT_S_DN``. Python's ssl module has
    the client's own certificate, not the chain it sent."""
    cipher = ssl_object.cipher()
    suites = _cipher_suites.get(ssl_object.context)
    if suites is None:  # OpenSSL's id holds the IANA number in its low 16 bits
        suites = _cipher_suites[ssl_object.context] = {
            each["name"]: each["id"] & 0xFFFF for each in ssl_object.context.get_ciphers()
        }
    return {
        "server_cert": server_cert,
        "client_cert_chain": [client_cert.pem] if client_cert is not None else [],
        "client_cert_name": client_cert.subject if client_cert is not None else None,
        "client_cert_error": None,  # a certificate that fails verification fails the handshake
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": suites.get(cipher[0]) if cipher is not None else None,
    }


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
    """Copy until end of stream, then pass the end on: a reset as a reset."""
    try:
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                _reset(writer)
                return
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:  # TLS cannot half-close
            writer.close()
    except OSError:  # reset, not connected any more (ENOTCONN from write_eof), TLS errors
        writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s connection with a TCP reset (``SO_LINGER`` 0), as
    the other side's was: a server's ``respond(reset=True)`` reaches its
    client as the reset it is, not as an orderly close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


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


#: The handlers of the opener ``urlopen()`` builds for itself, in ``build_opener()``.
_URLLIB_DEFAULT_HANDLERS = frozenset({
    urllib.request.ProxyHandler, urllib.request.UnknownHandler, urllib.request.HTTPHandler,
    urllib.request.HTTPDefaultErrorHandler, urllib.request.HTTPRedirectHandler, urllib.request.FTPHandler,
    urllib.request.FileHandler, urllib.request.HTTPErrorProcessor, urllib.request.DataHandler,
    urllib.request.HTTPSHandler,
})


def _forget_urllib_opener() -> None:
    """Make ``urlopen()`` read the CA settings again.

    Since Python 3.12 its default opener makes its TLS context once, when
    the first ``urlopen()`` of the process builds it; ``install_opener(None)``
    is the documented way to have the next call build a new one. An opener
    the suite installed (cookies, authentication, proxies of its own) is
    kept: dropping it would change every later request of the suite.
    """
    installed = getattr(urllib.request, "_opener", None)  # urllib keeps it there, and nowhere public
    if installed is None or _is_urllib_default(installed):
        urllib.request.install_opener(None)  # type: ignore[arg-type]


def _is_urllib_default(opener: urllib.request.OpenerDirector) -> bool:
    handlers = getattr(opener, "handlers", None)  # an OpenerDirector's, untyped
    if handlers is None:  # an opener of the suite's own making
        return False
    for handler in handlers:
        if type(handler) not in _URLLIB_DEFAULT_HANDLERS:
            return False
        proxies = getattr(handler, "proxies", None)  # a ProxyHandler's
        if isinstance(handler, urllib.request.ProxyHandler) and proxies != urllib.request.getproxies():
            return False
    return True


#: Trust the test CA for the duration of a layer.
TRUST_TEST_CA = TrustLayer(name="TRUST_TEST_CA")
