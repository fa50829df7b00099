"""Capture mail with a real SMTP server, built on aiosmtpd.

    >>> from serverlayer import smtp
    >>> MAIL_LAYER = smtp.Layer(name='MAIL_LAYER')

The layer publishes ``smtp_host``, ``smtp_port``, ``smtp_address``, the
server as ``smtpd`` and ``outbox``: every message received during the
current test, in arrival order, as ``email.message.EmailMessage`` objects
that also carry their SMTP envelope.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import logging
import mailbox
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

from serverlayer import tls
from serverlayer.arrivals import Arrivals, Unread
from serverlayer.errors import ConfigurationError, MailTimeoutError, ServerLayerError
from serverlayer.layer import ServerLayer, tls_resources
from serverlayer.reporting import ErrorLog, ErrorLogHandler
from serverlayer.server import AsyncioServer, ServerThread

#: aiosmtpd's default; a message above it is refused with 552.
DEFAULT_DATA_SIZE_LIMIT = 32 * 1024 * 1024

Credentials = Callable[[str, str], bool] | Mapping[str, str]


class ReceivedMessage(EmailMessage):
    """A message as the server received it.

    It is an ``EmailMessage`` parsed with ``email.policy.default``
    (``msg['Subject']``, ``msg.get_content()``, ``msg.iter_attachments()``)
    that also carries what only the SMTP conversation knows: the envelope
    sender and recipients (Bcc recipients appear only here), the MAIL and
    RCPT options (aiosmtpd accepts no RCPT options, so that list stays
    empty), the authenticated user and the raw bytes as received.
    """

    mail_from: str = ""
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[str]
    raw: bytes = b""
    authenticated_as: str | None = None

    def __init__(self, policy: email.policy.Policy | None = None) -> None:
        super().__init__(policy=policy)  # EmailMessage's default for None: email.policy.default
        self.rcpt_tos, self.mail_options, self.rcpt_options = [], [], []

    def summary(self) -> str:
        """One line for failure messages: envelope and subject."""
        return f"from {self.mail_from} to {', '.join(self.rcpt_tos)}: {self['Subject']!r}"


@dataclasses.dataclass(frozen=True)
class Arrival(Unread[ReceivedMessage]):
    """What the server keeps of a message while it answers the client.

    Parsing waits until a test reads the message: it would otherwise cost
    every message its share of the server's time before the 250 reply.
    """

    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]
    authenticated_as: str | None

    @classmethod
    def from_envelope(cls, envelope: Envelope, session: Session | None = None) -> Arrival:
        authenticated = session is not None and session.authenticated
        return cls(
            raw=envelope.original_content or b"",
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            authenticated_as=str(session.auth_data) if authenticated else None,  # type: ignore[union-attr]
        )

    def parse(self) -> ReceivedMessage:
        # SMTP carries lines ending in CRLF; parsed content reads as a local
        # mailbox would give it, with plain newlines. ``raw`` keeps the bytes.
        message = email.message_from_bytes(
            self.raw.replace(b"\r\n", b"\n"), _class=ReceivedMessage, policy=email.policy.default
        )
        assert isinstance(message, ReceivedMessage)
        message.raw = self.raw
        message.mail_from = self.mail_from
        message.rcpt_tos = list(self.rcpt_tos)
        message.mail_options = list(self.mail_options)
        message.rcpt_options = list(self.rcpt_options)
        message.authenticated_as = self.authenticated_as
        return message


class Outbox(Arrivals[ReceivedMessage]):
    """Messages received during the current test, in arrival order.

    Safe to read while the server adds to it; ``wait_for(count, match=...,
    timeout=...)`` waits for mail that is still on its way.
    """

    noun = "message"
    timeout_error = MailTimeoutError


def _open_maildir(path: str) -> mailbox.Maildir:
    """A Maildir at ``path``, which may be missing or an empty directory.

    ``mailbox.Maildir(create=True)`` makes its folders only when ``path``
    does not exist yet.
    """
    for folder in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, folder), exist_ok=True)
    return mailbox.Maildir(path, create=False)


class _Handler:
    """aiosmtpd hooks: store each message, refuse what the test asked to refuse."""

    def __init__(self, outbox: Outbox, errors: ErrorLog, maildir: str | None, auth_required: bool) -> None:
        self.outbox = outbox
        self.errors = errors
        self.maildir = _open_maildir(maildir) if maildir else None
        self.auth_required = auth_required
        self.refused_recipients: set[str] = set()
        self.data_reply: str | None = None

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self.refused_recipients:
            return f"550 5.1.1 <{address}>: Recipient address rejected"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        arrival = Arrival.from_envelope(envelope, session)
        if self.maildir is not None:
            self.maildir.add(arrival.raw)
        self.outbox.append(arrival)
        return "250 OK: message accepted"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd hands a client's failed STARTTLS handshake (a client
        # without the test CA, say) here as TLSSetupException and then
        # closes the connection. That is the client's failure, as a failed
        # handshake over implicit TLS or HTTPS is, not a server error.
        if isinstance(error, TLSSetupException):
            return "454 4.7.0 TLS handshake failed"
        self.errors.record("The SMTP server raised", (type(error), error, error.__traceback__))
        return f"500 Error: ({type(error).__name__}) {error}"


class _Connection(SMTP):  # type: ignore[misc]
    """aiosmtpd's protocol, registering its connection so that stopping can close it."""

    def __init__(self, *args: Any, transports: set[asyncio.Transport], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transports = transports
        self._first_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._first_transport is None:  # STARTTLS calls this again with the TLS transport
            self._first_transport = transport
            self._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._first_transport is not None:
            self._transports.discard(self._first_transport)
        super().connection_lost(error)


class SMTPServer(AsyncioServer):
    """An aiosmtpd server on its own event loop, on the layer's sockets."""

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        *,
        outbox: Outbox,
        errors: ErrorLog,
        hostname: str,
        data_size_limit: int | None,
        maildir: str | None,
        credentials: Credentials | None,
        auth_required: bool,
        starttls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        implicit_tls_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(sockets, errors=errors)
        self.starttls_context = starttls_context
        self.require_starttls = require_starttls
        self.implicit_tls_context = implicit_tls_context
        self.outbox = outbox
        self.handler = _Handler(outbox, errors, maildir, auth_required)
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.credentials = credentials
        self._log_handler = ErrorLogHandler(errors)

    # What a test may change; ``reset`` undoes it before the next test.

    def refuse_recipients(self, *addresses: str) -> None:
        """Answer RCPT for these addresses with 550, as a server that does
        not know them would."""
        self.handler.refused_recipients.update(address.lower() for address in addresses)

    def fail_data(self, code: int = 451, text: str | None = None) -> None:
        """Answer every DATA with ``code`` (451: try later, 554: refused)
        instead of accepting the message."""
        if not 400 <= code <= 599:
            raise ConfigurationError(f"fail_data({code}): use an SMTP error code from 400 to 599, such as 451 or 554.")
        default_text = "4.3.0 Temporary failure, try again later" if code < 500 else "5.3.0 Message refused"
        self.handler.data_reply = f"{code} {text or default_text}"

    def reset(self) -> None:
        """Accept every recipient and message again."""
        self.handler.refused_recipients.clear()
        self.handler.data_reply = None

    # The lifecycle (serverlayer.server.Server).

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if callable(self.credentials):
            accepted = bool(self.credentials(username, password))
        else:
            accepted = self.credentials is not None and self.credentials.get(username) == password
        return AuthResult(success=accepted, handled=False, auth_data=username if accepted else None)

    def _protocol(self) -> _Connection:
        options: dict[str, Any] = {}
        if self.credentials is not None:
            # Offered without TLS too: test servers listen on loopback.
            options.update(authenticator=self._authenticate, auth_require_tls=False)
        if self.starttls_context is not None:
            options.update(tls_context=self.starttls_context, require_starttls=self.require_starttls)
        return _Connection(
            self.handler,
            transports=self.transports,
            loop=self.loop,
            hostname=self.hostname,
            ident="serverlayer SMTP",
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=True,
            **options,
        )

    async def start(self, sock: socket.socket) -> asyncio.base_events.Server:
        return await self.loop.create_server(self._protocol, sock=sock, ssl=self.implicit_tls_context)

    def serve(self, ready: Callable[[], None]) -> None:
        # aiosmtpd logs every server's errors through one module-wide logger;
        # take the records of this server's thread.
        self._log_handler.thread_id = threading.get_ident()
        logging.getLogger("mail.log").addHandler(self._log_handler)
        try:
            super().serve(ready)
        finally:
            logging.getLogger("mail.log").removeHandler(self._log_handler)


class Layer(ServerLayer):
    """A real SMTP server that keeps every message it receives in ``outbox``.

    Keywords:

    - ``data_size_limit``: largest message accepted, in bytes (552 above it);
      ``None`` for no limit.
    - ``maildir``: also write every message to this Maildir, to look at
      after a failed run.
    - ``auth``: offer AUTH PLAIN and LOGIN, checking credentials against a
      ``{username: password}`` mapping or a ``check(username, password)``
      function. ``auth_required=True`` refuses mail before AUTH (530).
    - ``starttls=True`` offers STARTTLS, ``require_starttls=True`` refuses
      everything but EHLO, STARTTLS, NOOP and QUIT until the client has
      started TLS, ``implicit_tls=True`` speaks TLS from the first byte
      (SMTPS). The certificate comes from the test process's certificate
      authority, published as ``ca_bundle`` and ``ssl_context``.
    """

    resource_prefix = "smtp"
    server_resource = "smtpd"
    host_environment = ("SERVERLAYER_SMTP_HOST",)
    public_host_environment = ("SERVERLAYER_SMTP_PUBLIC_HOST",)

    data_size_limit: int | None = DEFAULT_DATA_SIZE_LIMIT
    maildir: str | None = None
    auth: Credentials | None = None
    auth_required: bool = False

    def __init__(
        self,
        *,
        data_size_limit: int | None = DEFAULT_DATA_SIZE_LIMIT,
        maildir: str | os.PathLike[str] | None = None,
        auth: Credentials | None = None,
        auth_required: bool = False,
        starttls: bool = False,
        require_starttls: bool = False,
        implicit_tls: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if implicit_tls and (starttls or require_starttls):
            raise ConfigurationError(
                f"{self!r}: implicit_tls=True speaks TLS from the start, so STARTTLS has no"
                " place; use either implicit_tls or starttls/require_starttls."
            )
        self.starttls = starttls or require_starttls
        self.require_starttls = require_starttls
        self.implicit_tls = implicit_tls
        if data_size_limit is not None and (not isinstance(data_size_limit, int) or data_size_limit < 1):
            raise ConfigurationError(
                f"{self!r}: data_size_limit={data_size_limit!r} must be a number of bytes, or None for no limit."
            )
        if auth is not None and not (callable(auth) or isinstance(auth, Mapping)):
            raise ConfigurationError(
                f"{self!r}: auth={auth!r} must be a {{username: password}} mapping or a"
                " function check(username, password) returning True for valid credentials."
            )
        if auth_required and auth is None:
            raise ConfigurationError(
                f"{self!r}: auth_required=True needs credentials to check; pass auth= as well."
            )
        self.data_size_limit = data_size_limit
        self.maildir = None if maildir is None else os.fspath(maildir)
        self.auth = auth
        self.auth_required = auth_required

    @property
    def tls(self) -> bool:
        return self.starttls or self.implicit_tls

    def build_server(self, sockets: Sequence[socket.socket], host: str) -> SMTPServer:
        # The greeting and the certificate name the host clients are told to
        # use (``smtp_host``), as a mail server's greeting names its own.
        hostname = self.published_host(host)
        context = None
        if self.tls:
            addresses = [sock.getsockname()[0] for sock in sockets]
            names = tls.certificate_names(host, hostname, *addresses)
            context = tls.certificate_authority().server_context(names)
        return SMTPServer(
            sockets,
            outbox=Outbox(),
            errors=self.server_errors,
            hostname=hostname,
            data_size_limit=self.data_size_limit,
            maildir=self.maildir,
            credentials=self.auth,
            auth_required=self.auth_required,
            starttls_context=context if self.starttls else None,
            require_starttls=self.require_starttls,
            implicit_tls_context=context if self.implicit_tls else None,
        )

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        resources["outbox"] = running.server.outbox  # type: ignore[attr-defined]
        if self.tls:
            resources.update(tls_resources(tls.certificate_authority()))
        return resources

    def testSetUp(self) -> None:
        super().testSetUp()
        if self._running is not None:
            server = self._running.server
            assert isinstance(server, SMTPServer)
            server.reset()
            server.outbox.clear()


#: A ready layer with the default settings.
SMTP_SERVER = Layer(name="SMTP_SERVER")


def _print_message(message: ReceivedMessage, stream: Any) -> None:
    print("---------- MESSAGE FOLLOWS ----------", file=stream)
    print(f"X-Envelope-From: {message.mail_from}", file=stream)
    print(f"X-Envelope-To: {', '.join(message.rcpt_tos)}", file=stream)
    if message.authenticated_as:
        print(f"X-Authenticated-As: {message.authenticated_as}", file=stream)
    stream.write(message.raw.replace(b"\r\n", b"\n").decode("utf-8", "replace").rstrip("\n") + "\n")
    print("------------ END MESSAGE ------------", file=stream, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serverlayer.smtp``: a mail sink that prints what it receives.

    What ``python -m smtpd -n -c DebuggingServer`` did before Python 3.12
    removed the smtpd module. Stop it with Ctrl-C.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m serverlayer.smtp",
        description="Receive mail over SMTP and print every message; nothing is delivered.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=1025,
                        help="port to listen on, 0 for any free one (default: %(default)s)")
    parser.add_argument("--maildir", help="also store every message in this Maildir")
    options = parser.parse_args(argv)
    layer = Layer(name="serverlayer_smtp_main", host=options.host, port=options.port, maildir=options.maildir)
    try:
        layer.setUp()
    except ServerLayerError as error:
        parser.exit(2, f"{parser.prog}: {error}\n")
    print(f"Listening for mail on {layer['smtp_address']}; Ctrl-C stops.", flush=True)
    outbox: Outbox = layer["outbox"]
    shown = 0
    try:
        while True:
            _print_message(outbox.wait_for(shown + 1, timeout=None)[shown], sys.stdout)
            shown += 1
    except KeyboardInterrupt:
        return 0
    finally:
        layer.tearDown()


if __name__ == "__main__":
    sys.exit(main())
