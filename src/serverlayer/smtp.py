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
import collections
import dataclasses
import email
import email.policy
import functools
import logging
import mailbox
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException, syntax

from serverlayer import tls
from serverlayer.arrivals import Arrivals, Unread
from serverlayer.errors import (
    AddressInUseError,
    ConfigurationError,
    MailTimeoutError,
    ServerLayerError,
    ServerSideError,
)
from serverlayer.layer import ServerLayer, flag, tls_resources
from serverlayer.reporting import ErrorLog, ErrorLogHandler
from serverlayer.server import LISTEN_BACKLOG, AsyncioServer, Listening, ServerThread, holding_code
from serverlayer.smtp_failures import (
    COMMAND_STAGES,
    Arrangement,
    Arrangements,
    Match,
    Transcript,
    command_subject,
    failing_reply,
    reply,
    unbracketed,
)

#: aiosmtpd's default; a message above it is refused with 552.
DEFAULT_DATA_SIZE_LIMIT = 32 * 1024 * 1024

Credentials = Callable[[str, str], bool] | Mapping[str, str]


class ReceivedMessage(EmailMessage):
    """A message as the server received it.

    It is an ``EmailMessage`` parsed with ``email.policy.default``
    (``msg['Subject']``, ``msg.get_content()``, ``msg.iter_attachments()``)
    that also carries what only the SMTP conversation knows: the envelope
    sender and recipients (Bcc recipients appear only here), the MAIL and
    RCPT options (RCPT's are the delivery status notification parameters,
    NOTIFY= and ORCPT=, of all recipients in turn), the authenticated user
    and the raw bytes as received.
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
            mail_from=sender_of(envelope),
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
    #: The server's transcripts, whose refusals explain mail that never came.
    transcripts: list[Transcript] = []

    def why_missing(self) -> str:
        refusals = [f"  {refusal}" for transcript in list(self.transcripts) for refusal in transcript.refusals]
        if not refusals:
            return ""
        return "\nThe server refused, without the test arranging it:\n" + "\n".join(refusals)


def sender_of(envelope: Envelope | None) -> str:
    """The envelope's sender; the null reverse-path of a bounce as "", as
    smtplib writes it and the ``mail`` stage matches it (aiosmtpd keeps
    it as "<>", an empty one meaning no MAIL yet)."""
    sender = "" if envelope is None else envelope.mail_from or ""
    return "" if sender == "<>" else sender


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

    def __init__(self, outbox: Outbox, errors: ErrorLog, maildir: mailbox.Maildir | None, auth_required: bool,
                 arrangements: Arrangements) -> None:
        self.outbox = outbox
        self.errors = errors
        self.maildir = maildir
        # Not ``auth_required``: aiosmtpd offers every handler attribute
        # named ``auth_*`` as an AUTH mechanism (it offered "REQUIRED").
        self.refuses_unauthenticated = auth_required
        self.arrangements = arrangements
        self.refused_recipients: set[str] = set()
        self.data_reply: str | None = None
        #: Counts the tests: a message belongs to the one during which its MAIL came.
        self.test = 0
        #: Held while a message is stored, and while a new test starts (the test's thread).
        self.lock = threading.Lock()

    async def handle_EHLO(
        self, server: _Connection, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # Commands may be pipelined (RFC 2920): aiosmtpd reads them one by
        # one from its buffer either way, but does not say so.
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", "250-DSN", responses[-1]]

    async def handle_MAIL(
        self, server: _Connection, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.refuses_unauthenticated and not session.authenticated:
            return "530 5.7.0 Authentication required"  # the application's failure: reported
        # The message belongs to the test during which its transaction
        # began; one that ends in a later test (the earlier one did not
        # wait for it, or a delay held it) is in no test's outbox.
        server.message_test = self.test
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: _Connection, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self.refused_recipients:
            return server.arranged(f"550 5.1.1 <{address}>: Recipient address rejected")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: _Connection, session: Session, envelope: Envelope) -> str:
        server.transcript.client(f"<message, {len(envelope.original_content or b'')} bytes>")
        if isinstance(server, LMTP):
            return await self._deliver_per_recipient(server, session, envelope)
        if server.arrangements.active:
            arrangement = server.take("message", sender_of(envelope), cuts=False)
            arranged = None if arrangement is None else await server.act_on(arrangement)
            if arranged is not None:
                assert arrangement is not None
                return server.arranged(arranged, split=arrangement.split)
        if self.data_reply is not None:
            return server.arranged(self.data_reply)
        self._store(Arrival.from_envelope(envelope, session), server.message_test)
        return "250 OK: message accepted"

    async def _deliver_per_recipient(self, server: Any, session: Session, envelope: Envelope) -> str:
        """LMTP's answer to a message: a reply for each recipient (RFC 2033),
        failing those the test arranged (``match`` sees the recipient)."""
        replies, delivered = [], []
        for recipient in envelope.rcpt_tos:
            arrangement = server.take("message", recipient, cuts=False)
            arranged = None if arrangement is None else await server.act_on(arrangement)
            refusal = arranged if arranged is not None else self.data_reply
            if refusal is not None:
                replies.append(server.arranged(refusal, split=None if arrangement is None else arrangement.split))
            else:
                delivered.append(recipient)
                replies.append(f"250 2.1.5 <{recipient}> delivered")
        if delivered:
            self._store(
                dataclasses.replace(Arrival.from_envelope(envelope, session), rcpt_tos=tuple(delivered)),
                server.message_test,
            )
        return "\r\n".join(replies)

    def _store(self, arrival: Arrival, test: int) -> None:
        if self.maildir is not None:
            self.maildir.add(arrival.raw)
        # A message whose reply an arranged delay held past the end of its
        # test is no message of the next one, whose outbox starts empty.
        with self.lock:
            if test == self.test:
                self.outbox.append(arrival)

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
    """aiosmtpd's protocol, registering its connection so that stopping can
    close it, failing as the test arranged and recording what its client saw."""

    def __init__(
        self,
        *args: Any,
        transports: set[asyncio.Transport],
        arrangements: Arrangements,
        transcripts: list[Transcript],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._transports = transports
        self._first_transport: asyncio.Transport | None = None
        self.arrangements = arrangements
        self._transcripts = transcripts
        self._transcript = Transcript(peer=None)
        #: The test (``_Handler.test``) whose transcripts hold ``_transcript``.
        self._transcript_test = self.event_handler.test
        self._greeted = False
        self._client_lines = _ClientLines()
        #: A command ran since the last whole reply: the reply is its.
        self._dispatched = False
        #: The last whole reply asked for AUTH data (334): the client's next line answers it.
        self._asked_for_auth_data = False
        #: Between 354 and the end of the message: its bytes are coming.
        self._receiving_message = False
        self._crlf_lines = CRLFLines()
        #: Replies a handler hook made as the test arranged, still to be sent.
        self._arranged_replies: list[str] = []
        #: How the next of them is to be split (``fail(..., split=)``).
        self._arranged_split: float | None = None
        #: The test (``_Handler.test``) during which the message being received began.
        self.message_test = 0
        #: Bytes of the body still to take before an arranged cut.
        #: Where (bytes into the message) the arranged cut falls, or None.
        self._cut_at: int | None = None
        #: Whether the cut was made: the connection is closing.
        self._cut_made = False
        #: The message's bytes so far, and the last of them, to find its end across packets.
        self._message_seen = 0
        self._message_tail = b"\r\n"
        #: Its end (CRLF.CRLF) arrived: what follows it is commands.
        self._message_ended = False
        #: The arrangement that cuts the message being received, and whom it looks at.
        self._cut: tuple[Arrangement, str] | None = None
        # aiosmtpd dispatches every command through this table (HELP reads
        # it too). Wrapping its entries lets an arranged failure replace a
        # command's reply, and records each command, without re-writing any.
        methods: dict[str, Any] = getattr(self, "_smtp_methods")  # noqa: B009 -- untyped upstream
        self._smtp_methods = {name: self._staged(name, method) for name, method in methods.items()}

    @property
    def transcript(self) -> Transcript:
        """What this connection's client saw during the current test.

        A connection still open when a test ends (an application that keeps
        one for its mail queue) starts a transcript in the next test's list
        once it goes on there: that list started empty, and the old one,
        the earlier test's, was all it had.
        """
        test = self.event_handler.test
        if test != self._transcript_test:
            self._transcript_test = test
            if self._first_transport is not None:  # registered, in an earlier test's list
                self._transcript = Transcript(peer=self._transcript.peer)
                self._transcripts.append(self._transcript)
        return self._transcript

    def _staged(self, command: str, method: Callable[[str | None], Any]) -> Callable[[str | None], Any]:
        stage = COMMAND_STAGES.get(command)
        dsn_keywords = DSN_PARAMETERS.get(command)

        @functools.wraps(method)
        async def staged(argument: str | None) -> None:
            self._client_lines.take()
            self._dispatched = True
            self.transcript.client(_shown(command, argument))
            dsn: list[str] = []
            if dsn_keywords is not None and argument and "=" in argument:
                argument, dsn = _without_dsn(argument, dsn_keywords)
            if stage is not None and self.arrangements.active:
                arranged = self.take(stage, command_subject(command, argument))
                reply = None if arranged is None else await self.act_on(arranged)
                if reply is not None:
                    assert arranged is not None
                    await self.push(reply, split=arranged.split, arranged=True)
                    return
            if not dsn:
                await method(argument)
                return
            envelope = self.envelope
            before = (envelope.mail_from, len(envelope.rcpt_tos)) if envelope is not None else None
            await method(argument)
            if envelope is not None and (envelope.mail_from, len(envelope.rcpt_tos)) != before:
                (envelope.mail_options if command == "MAIL" else envelope.rcpt_options).extend(dsn)

        return staged

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL, RCPT and VRFY address with the email
        # package's RFC 5322 header parser, and defines a typing Protocol
        # class on each call: over half of its work per message. The plain
        # <local@domain> most clients send, with parameters after a single
        # space, needs none of that, and gets the same (address, rest).
        plain = _PLAIN_ADDRESS.fullmatch(arg)
        if plain is None or self.local_part_limit:
            return super()._getaddr(arg)  # type: ignore[no-any-return]
        return plain[1], plain[2] or ""

    def take(self, stage: str, subject: str = "", *, cuts: bool | None = None) -> Arrangement | None:
        """The arrangement for ``stage`` that applies on this connection, if any."""
        return self.arrangements.take(stage, subject, connection=id(self.transcript), cuts=cuts)

    async def act_on(self, arrangement: Arrangement) -> str | None:
        """Wait and drop the connection as ``arrangement`` says (a drop
        never returns); the reply it makes instead of the normal one, if any."""
        if arrangement.delay:
            await asyncio.sleep(arrangement.delay)
        if arrangement.drop:
            await self.drop_connection()
        return arrangement.reply

    def arranged(self, reply: str, *, split: float | None = None) -> str:
        """``reply``, which a handler hook returns for aiosmtpd to send, as
        one the test arranged: no refusal to report; sent in two writes
        ``split`` seconds apart, if given."""
        self._arranged_replies.extend(reply.split("\r\n"))  # a line each, as they are recorded
        if split is not None:
            self._arranged_split = split
        return reply

    async def drop_connection(self, *, recorded: bool = False) -> None:
        """Close the connection without a reply (or after one that
        ``recorded`` the closing already); never returns."""
        if not recorded:
            self.transcript.closed()
        if self.transport is not None:
            self.transport.close()
        # Closing makes aiosmtpd cancel this conversation's task (in
        # connection_lost), which ends this wait: nothing follows.
        await asyncio.get_running_loop().create_future()

    @syntax("STARTTLS", when="tls_context")  # upstream's, for HELP
    async def smtp_STARTTLS(self, arg: str) -> None:
        # Upstream (aiosmtpd 1.4) answers a second STARTTLS with 220 and
        # starts TLS inside TLS, which fails in asyncio's internals (a
        # TypeError or AttributeError that would fail the test as the
        # server's). RFC 3207: no STARTTLS once TLS is active.
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def push(self, status: str | bytes, *, split: float | None = None, arranged: bool = False) -> None:
        """Send a reply, recording it; ``split`` sends it in two writes, that
        many seconds apart. The greeting is replaced or withheld as the
        test arranged for the ``connect`` stage."""
        is_greeting = not self._greeted
        if is_greeting:  # aiosmtpd's first push is the greeting
            self._greeted = True
            greeting = self.take("connect") if self.arrangements.active else None
            try:
                reply = None if greeting is None else await self.act_on(greeting)
            except asyncio.CancelledError:
                # The client ended its side during an arranged delay, and
                # aiosmtpd cancelled the conversation; it closes the
                # connection only for a cancel after the greeting, and the
                # client waited for a reply or an end that never came.
                if self.transport is not None:
                    self.transport.close()
                raise
            if greeting is not None and reply is not None:
                # Recorded before the client can see it, closing included.
                self.transcript.server(reply, arranged=True)
                self.transcript.closed()
                if greeting.split is not None:
                    await self._send_split(reply, greeting.split)
                else:
                    await super().push(reply)
                if self.transport is not None:
                    self.transport.close()
                return
        line = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if self._asked_for_auth_data:
            self._client_lines.take()  # the client's credentials: not for the transcript
        elif not self._dispatched and not self._receiving_message and not is_greeting:
            # aiosmtpd refused the line before any command of it ran
            # (unknown, too long, before STARTTLS): it is the client's last.
            refused = self._client_lines.take()
            if refused is not None:
                command, _, argument = refused.decode("utf-8", "replace").partition(" ")
                self.transcript.client(_shown(command.upper(), argument) if refused else "(an empty line)")
        last = line.rpartition("\r\n")[2]
        if last[3:4] != "-":  # the reply is whole
            self._dispatched = False
            self._asked_for_auth_data = last.startswith("334")
        for each in line.split("\r\n"):  # LMTP answers a message with a line per recipient
            self.transcript.server(each, arranged=arranged or each in self._arranged_replies)
        self._arranged_replies.clear()
        # 421: the server is closing the channel (RFC 5321 section 3.8);
        # nothing the client sent after it is served. The closing is
        # recorded before the client can read the reply, as the reply is: a
        # client hangs up on reading it (smtplib does), and its test may end
        # at once; recorded later, it was missing from that test's
        # transcript and came in the next test's, as a connection of its own.
        closing = any(each.startswith("421") for each in line.split("\r\n"))
        if closing:
            self.transcript.closed()
        if split is None:
            split, self._arranged_split = self._arranged_split, None
        if line.startswith("354"):
            self._start_message()
        if split is not None:
            await self._send_split(line, split)
        else:
            # aiosmtpd's push takes either (its AnyStr), which a union does not match.
            await super().push(status)  # type: ignore[type-var]
        if self._receiving_message and not line.startswith("354"):
            # The reply to the message: aiosmtpd skips _set_post_data_state
            # when its DATA hook raised, and then sends only this.
            self._end_message()
        if closing:
            await self.drop_connection(recorded=True)

    async def _send_split(self, line: str, pause: float) -> None:
        middle = len(line) // 2
        self._writer.write(line[:middle].encode("utf-8"))
        await self._writer.drain()
        await asyncio.sleep(pause)
        await super().push(line[middle:])

    def _message_end_in(self, data: bytes) -> int | None:
        """Where (bytes into the message) its body ends, if its end
        (CRLF.CRLF) is in ``data``, the message's next bytes."""
        tail, before = self._message_tail, self._message_seen
        self._message_seen += len(data)
        end = (tail + data[:4]).find(b"\r\n.\r\n")  # an end that began in the packet before
        if end != -1:
            return before - len(tail) + end + 2
        end = data.find(b"\r\n.\r\n")
        if end != -1:
            return before + end + 2
        self._message_tail = (tail + data)[-4:] if len(data) < 4 else data[-4:]
        return None

    def _surely_body(self) -> int:
        """How many of the message's bytes so far are surely its body: all
        but a last ``.`` or ``.\r`` after CRLF, which may begin its end."""
        tail = self._message_tail
        return self._message_seen - (1 if tail.endswith(b"\r\n.") else 2 if tail.endswith(b"\r\n.\r") else 0)

    def _start_message(self) -> None:
        self._receiving_message = True
        self._message_ended = False
        self._message_seen = 0
        self._message_tail = b"\r\n"  # the DATA command's line end: a body may end at once
        self._client_lines = _ClientLines()  # lines sent before 354 are the message's
        self._crlf_lines = CRLFLines()
        if not self.arrangements.active:
            return
        cut, subject = None, ""
        for subject in self._message_subjects():
            # Counted as used once it cuts: a body shorter than its bytes is not cut.
            cut = self.arrangements.take("message", subject, connection=id(self.transcript), cuts=True, count=False)
            if cut is not None:
                break
        self._cut = None if cut is None else (cut, subject)
        self._cut_at = None if cut is None else cut.after_bytes

    def _message_subjects(self) -> list[str]:
        """What ``match`` looks at for the message being received: its sender."""
        return [sender_of(self.envelope)]

    def _end_message(self) -> None:
        self._receiving_message = self._message_ended = False
        self._cut_at = self._cut = None

    def _set_post_data_state(self) -> None:
        # aiosmtpd calls this when a message's DATA ends, unless its hook raised.
        self._end_message()
        super()._set_post_data_state()

    def data_received(self, data: bytes) -> None:
        if not self._receiving_message or self._message_ended:
            self._client_lines.received(data)
            super().data_received(data)
            return
        before = self._message_seen
        end = self._message_end_in(data)
        if end is not None:
            self._message_ended = True
            self._client_lines.received(data[end + 3 - before:])  # after its ".\r\n"
        cut_at, cut = self._cut_at, self._cut
        if cut_at is not None and cut is not None:
            if end is not None and end < cut_at:  # the body ended short of the cut: none
                self._cut_at = self._cut = None
            elif (end if end is not None else self._surely_body()) >= cut_at:
                self._cut_at = self._cut = None
                if self.arrangements.claim(*cut, connection=id(self.transcript)):
                    data = data[: max(0, cut_at - before)]
                    self._cut_made = True
                # else it no longer applies: another connection used it up, or the test ended
        super().data_received(self._crlf_lines(data))
        if self._cut_made and self.transport is not None:
            self.transcript.closed()
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._first_transport is None:  # STARTTLS calls this again with the TLS transport
            self._first_transport = transport
            self._transports.add(transport)
            # Registered in the list of the test under way, whichever test
            # it was when the server accepted the connection and made this
            # protocol (over TLS, before the handshake). Read through the
            # ``transcript`` property, a test begun in between registered
            # it there too: the list held the one transcript twice.
            self._transcript_test = self.event_handler.test
            self._transcript.peer = transport.get_extra_info("peername")
            self._transcripts.append(self._transcript)
        else:  # what came before TLS is gone (aiosmtpd clears its buffer too)
            self._client_lines = _ClientLines()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._first_transport is not None:
            self._transports.discard(self._first_transport)
        super().connection_lost(error)


def _shown(command: str, argument: str | None) -> str:
    """A command as the transcript shows it: AUTH's argument may be the
    credentials, so the mechanism is enough."""
    shown = (argument or "").split(" ", 1)[0] + " ..." if command == "AUTH" else argument
    return command if not shown else f"{command} {shown}"


class _ClientLines:
    """The command lines a client sent that its server has not read yet:
    what the transcript shows of one that aiosmtpd refuses before any
    command of it runs. Those sent before a 354 are the message's: the
    connection starts anew then."""

    #: The most of a line kept.
    KEPT = 200

    def __init__(self) -> None:
        self.waiting: collections.deque[bytes] = collections.deque()
        self._partial = b""

    def received(self, data: bytes) -> None:
        *whole, rest = data.split(b"\n")
        for piece in whole:
            self.waiting.append((self._partial + piece)[: self.KEPT].rstrip(b"\r"))
            self._partial = b""
        self._partial = (self._partial + rest)[: self.KEPT]

    def take(self) -> bytes | None:
        return self.waiting.popleft() if self.waiting else None


class CRLFLines:
    """Makes a message's bare LF line ends CRLF, packet by packet, as
    mainstream MTAs read them. aiosmtpd reads a message's lines up to CRLF
    only, so a message sent with bare LFs (``sendmail(..., msg.as_bytes())``)
    is a single line to it, refused as too long above 1000 bytes.

    Only CRLF.CRLF ends a message (RFC 5321 section 4.1.1.4). A line of a
    lone dot with a bare LF on either side (curl dot-stuffs only lines that
    follow CRLF) would end it once its LFs were made CRLF, cutting the
    message there and running the rest as commands (SMTP smuggling): it
    goes on dot-stuffed, and the message keeps it. A packet ending in what
    may be such a line waits for the next.
    """

    def __init__(self) -> None:
        #: The last packet ended with CR, which an LF opening the next one ends.
        self._ended_in_cr = False
        #: The last packet ended with a whole line (as the message starts).
        self._at_line_start = True
        #: The last whole line ended with a bare LF.
        self._after_bare_lf = False
        #: The start of a line that may be a lone dot, waiting for its end.
        self._held = b""

    def __call__(self, data: bytes) -> bytes:
        if not data:
            return data
        if (
            not self._held
            and not self._after_bare_lf
            and data.count(b"\n") == data.count(b"\r\n")
            and not data.endswith((b".", b".\r"))
        ):
            self._ended_in_cr = data.endswith(b"\r")
            self._at_line_start = data.endswith(b"\n")
            return data  # CRLF throughout, as SMTP has it: nothing to do
        at_line_start = self._at_line_start or bool(self._held)
        lines = (self._held + data).split(b"\n")
        self._held = b""
        partial = lines.pop()
        fixed: list[bytes] = []
        for number, line in enumerate(lines):
            if self._ended_in_cr and not line and not fixed:
                fixed.append(b"\n")  # it ends the CR that ended the previous packet
                self._ended_in_cr = self._after_bare_lf = False
                continue
            bare = not line.endswith(b"\r")
            content = line if bare else line[:-1]
            # The first may end a line that began in the previous packet.
            whole = number > 0 or at_line_start
            if whole and content == b"." and (bare or self._after_bare_lf):
                content = b".."
            fixed.append(content + b"\r\n")
            self._after_bare_lf = bare
        if partial in (b".", b".\r") and (lines or at_line_start):
            self._held, partial = partial, b""
        fixed.append(partial)
        self._ended_in_cr = partial.endswith(b"\r")
        self._at_line_start = not partial
        return b"".join(fixed)


class _LMTPConnection(_Connection, LMTP):  # type: ignore[misc]
    """The same, speaking LMTP: LHLO instead of EHLO and HELO, and a reply
    per recipient to each message."""

    def _message_subjects(self) -> list[str]:
        # The message stage's match looks at each recipient over LMTP, as a
        # failing reply does: a cut applies when it matches any of them. It
        # looked at the sender, so match= a recipient never cut.
        return list(self.envelope.rcpt_tos) if self.envelope is not None else []

    async def push(self, status: str | bytes, *, split: float | None = None, arranged: bool = False) -> None:
        # aiosmtpd refuses a message too large or with too long a line with
        # one reply, whatever the recipients; an LMTP client waits for one
        # per recipient (RFC 2033 section 4.2), and would wait for ever.
        recipients = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        if self._receiving_message and recipients > 1 and isinstance(status, str) and "\r\n" not in status:
            status = "\r\n".join([status] * recipients)
        await super().push(status, split=split, arranged=arranged)


_BARE_LF = re.compile(rb"(?<!\r)\n")
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
#: ``<local@domain>``: a local part of atext and dots (in any order, as the
#: email package reads it), a dot-atom domain; then nothing, or parameters
#: after one space (more space, or a comment, and that parser has its own
#: say about where the parameters start).
_PLAIN_ADDRESS = re.compile(rf"<([.{_ATEXT}]+@[{_ATEXT}]+(?:\.[{_ATEXT}]+)*)>(?: ([^\s(].*))?")
#: Delivery status notification parameters (RFC 3461) of MAIL and RCPT.
DSN_PARAMETERS = {"MAIL": ("RET", "ENVID"), "RCPT": ("NOTIFY", "ORCPT")}


def _without_dsn(argument: str, keywords: tuple[str, ...]) -> tuple[str, list[str]]:
    """``argument`` without its DSN parameters, and those parameters (their
    keywords in upper case, their values as sent). aiosmtpd knows none of
    them: it refuses RCPT with any parameter, and MAIL with these (555)."""
    words = argument.split(" ")
    dsn = [word for word in words[1:] if word.partition("=")[0].upper() in keywords]
    if not dsn:
        return argument, []
    rest = [words[0], *(word for word in words[1:] if word not in dsn)]
    return " ".join(rest), [f"{name.upper()}={value}" for name, _, value in (word.partition("=") for word in dsn)]


class _ThisThreadsRecords(logging.Filter):
    """Takes a server thread's records of aiosmtpd's logger for the layer.

    aiosmtpd logs every server through one module-wide logger, "mail.log":
    errors, and at INFO each connection and command. Under a root logger
    at INFO (pytest's ``log_cli``, an application's ``basicConfig``) all of
    it reached the test run's output. A filter runs before the logger's
    handlers and those of its parents: this one hands the server thread's
    records to the layer's handler (errors fail the test; everything is
    echoed under ``$SERVERLAYER_VERBOSE``) and stops them there.
    """

    def __init__(self, handler: logging.Handler, thread_id: int) -> None:
        super().__init__()
        self.handler = handler
        self.thread_id = thread_id

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread_id:
            return True
        self.handler.handle(record)
        return False


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
        maildir: mailbox.Maildir | None,
        credentials: Credentials | None,
        auth_required: bool,
        starttls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        implicit_tls_context: ssl.SSLContext | None = None,
        lmtp: bool = False,
    ) -> None:
        super().__init__(sockets, errors=errors)
        self.lmtp = lmtp
        self.starttls_context = starttls_context
        self.require_starttls = require_starttls
        self.implicit_tls_context = implicit_tls_context
        self.outbox = outbox
        #: The failures the current test arranged.
        self.arrangements = Arrangements()
        #: Each connection of the current test as its client saw it, in the order they came.
        self.transcripts: list[Transcript] = []
        outbox.transcripts = self.transcripts
        self.handler = _Handler(outbox, errors, maildir, auth_required, self.arrangements)
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.credentials = credentials
        self._log_handler = ErrorLogHandler(errors)

    # What a test may change; ``reset`` undoes it before the next test.

    def refuse_recipients(self, *addresses: str) -> None:
        """Answer RCPT for these addresses with 550, as a server that does
        not know them would."""
        for address in addresses:
            # A list of them raised AttributeError from deep inside.
            if not isinstance(address, str):
                raise ConfigurationError(
                    f"refuse_recipients(): each address is a str of its own argument, not {address!r}:"
                    ' refuse_recipients("bob@example.com", "carol@example.com"), or'
                    " refuse_recipients(*addresses) for a list."
                )
        self.handler.refused_recipients.update(unbracketed(address).lower() for address in addresses)

    def fail_data(self, code: int = 451, text: str | None = None) -> None:
        """Answer every DATA with ``code`` (451: try later, 554: refused)
        instead of accepting the message."""
        # A whole number, as fail()'s: 451.5 went out as "451.5 ...", which
        # clients read as 451 and a text "5 ..."; "451" raised TypeError here.
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            raise ConfigurationError(
                f"fail_data({code!r}): use an SMTP error code from 400 to 599, such as 451 or 554."
            )
        if text is not None and not isinstance(text, str):
            raise ConfigurationError(f"fail_data({code}, {text!r}): the text of a reply is a str.")
        default_text = "4.3.0 Temporary failure, try again later" if code < 500 else "5.3.0 Message refused"
        self.handler.data_reply = reply(code, text or default_text)

    def fail(
        self,
        stage: str,
        code: int,
        text: str | None = None,
        *,
        match: Match = None,
        times: int | None = None,
        connections: int | None = None,
        delay: float = 0.0,
        split: float | None = None,
    ) -> Arrangement:
        """Reply ``code`` (and ``text``, else a standard one) at ``stage``
        instead of going on: ``fail("rcpt", 451, times=2)`` has the next two
        recipients tried again later, ``connections=2`` every recipient of
        the next two connections. ``delay`` waits before the reply;
        ``split=0.5`` sends it in two writes, half a second apart. See
        ``serverlayer.smtp_failures`` for the stages."""
        return self.arrangements.add(Arrangement(
            stage=stage, reply=failing_reply(code, text, stage), match=match, times=times, connections=connections,
            delay=delay, split=split,
        ))

    def drop(
        self,
        stage: str,
        *,
        match: Match = None,
        times: int | None = None,
        connections: int | None = None,
        delay: float = 0.0,
        after_bytes: int | None = None,
    ) -> Arrangement:
        """Close the connection at ``stage`` instead of replying, after
        ``delay`` seconds; at the ``message`` stage with ``after_bytes``,
        once that many bytes of the body arrived."""
        if after_bytes is not None and (isinstance(after_bytes, bool) or not isinstance(after_bytes, int)
                                        or after_bytes < 0):
            raise ConfigurationError(f"after_bytes={after_bytes!r} must be a number of bytes, 0 or more.")
        return self.arrangements.add(Arrangement(
            stage=stage, drop=True, match=match, times=times, connections=connections, delay=delay,
            after_bytes=after_bytes,
        ))

    def delay(
        self, stage: str, seconds: float, *, match: Match = None, times: int | None = None,
        connections: int | None = None,
    ) -> Arrangement:
        """Reply as usual at ``stage``, ``seconds`` late: for clients' timeouts."""
        return self.arrangements.add(
            Arrangement(stage=stage, delay=seconds, match=match, times=times, connections=connections)
        )

    def reset(self) -> None:
        """Accept every recipient and message again, with no failures
        arranged, and start new transcripts."""
        self.handler.refused_recipients.clear()
        self.handler.data_reply = None
        self.arrangements.clear()
        self.transcripts.clear()

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
        connection_class = _LMTPConnection if self.lmtp else _Connection
        return connection_class(
            self.handler,
            transports=self.transports,
            arrangements=self.arrangements,
            transcripts=self.transcripts,
            loop=self.loop,
            hostname=self.hostname,
            ident="serverlayer LMTP" if self.lmtp else "serverlayer SMTP",
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=True,
            **options,
        )

    async def start(self, sock: socket.socket) -> Listening:
        return await self.loop.create_server(
            self._protocol, sock=sock, ssl=self.implicit_tls_context, backlog=LISTEN_BACKLOG
        )

    def serve(self, ready: Callable[[], None]) -> None:
        taker = _ThisThreadsRecords(self._log_handler, threading.get_ident())
        logging.getLogger("mail.log").addFilter(taker)
        try:
            super().serve(ready)
        finally:
            logging.getLogger("mail.log").removeFilter(taker)


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
    - ``lmtp=True`` speaks LMTP (RFC 2033), as a mail store behind an MTA
      does: LHLO instead of EHLO and HELO, and a reply per recipient after
      each message (``smtpd.fail("message", ..., match=recipient)`` fails
      one of them).
    """

    resource_prefix = "smtp"
    server_resource = "smtpd"
    host_environment = ("SERVERLAYER_SMTP_HOST",)
    public_host_environment = ("SERVERLAYER_SMTP_PUBLIC_HOST",)

    data_size_limit: int | None = DEFAULT_DATA_SIZE_LIMIT
    maildir: str | None = None
    auth: Credentials | None = None
    auth_required: bool = False
    lmtp: bool = False

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
        lmtp: bool | None = None,
        **kwargs: Any,
    ) -> None:
        tls = kwargs.pop("tls", None)  # the HTTP layers' keyword
        super().__init__(**kwargs)
        if tls is not None:
            raise ConfigurationError(
                f"{self!r}: tls={tls!r} is the HTTP layers' keyword. Mail goes over TLS"
                " after STARTTLS (starttls=True, or require_starttls=True to refuse mail"
                " without it) or from the first byte (implicit_tls=True, as on port 465)."
            )
        for setting, value in [("auth_required", auth_required), ("starttls", starttls),
                               ("require_starttls", require_starttls), ("implicit_tls", implicit_tls),
                               ("lmtp", False if lmtp is None else lmtp)]:
            flag(value, owner=repr(self), setting=setting)
        if lmtp is not None:
            self.lmtp = lmtp
        if implicit_tls and (starttls or require_starttls):
            raise ConfigurationError(
                f"{self!r}: implicit_tls=True speaks TLS from the start, so STARTTLS has no"
                " place; use either implicit_tls or starttls/require_starttls."
            )
        self.starttls = starttls or require_starttls
        self.require_starttls = require_starttls
        self.implicit_tls = implicit_tls
        # A bool is an int: True was a limit of 1 byte, refusing every message.
        if data_size_limit is not None and (
            isinstance(data_size_limit, bool) or not isinstance(data_size_limit, int) or data_size_limit < 1
        ):
            raise ConfigurationError(
                f"{self!r}: data_size_limit={data_size_limit!r} must be a number of bytes, or None for no limit."
            )
        if auth is not None and not (callable(auth) or isinstance(auth, Mapping)):
            raise ConfigurationError(
                f"{self!r}: auth={auth!r} must be a {{username: password}} mapping or a"
                " function check(username, password) returning True for valid credentials."
            )
        if isinstance(auth, Mapping):
            # Clients send both as text: {"alice": 1234} never matched.
            wrong = [(user, password) for user, password in auth.items()
                     if not isinstance(user, str) or not isinstance(password, str)]
            if wrong:
                raise ConfigurationError(
                    f"{self!r}: auth= has {wrong[0]!r}: a user name and its password are each a str,"
                    " as clients send them, such as {'alice': '1234'}."
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
        maildir = None
        if self.maildir:
            try:
                maildir = _open_maildir(self.maildir)
            except OSError as error:
                raise ConfigurationError(
                    f"{self!r}: maildir={self.maildir!r} cannot hold mail ({error}). Give a directory"
                    " (missing or empty is fine), or a path where one can be made."
                ) from error
        context = None
        if self.tls:
            addresses = [sock.getsockname()[0] for sock in sockets]
            names = tls.certificate_names(host, hostname, *addresses)
            context = tls.certificate_authority().server_context(names, owner=repr(self))
        return SMTPServer(
            sockets,
            outbox=Outbox(repr(self)),
            errors=self.server_errors,
            hostname=hostname,
            data_size_limit=self.data_size_limit,
            maildir=maildir,
            credentials=self.auth,
            auth_required=self.auth_required,
            starttls_context=context if self.starttls else None,
            require_starttls=self.require_starttls,
            implicit_tls_context=context if self.implicit_tls else None,
            lmtp=self.lmtp,
        )

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        resources["outbox"] = running.server.outbox  # type: ignore[attr-defined]
        if self.tls:
            resources.update(tls_resources(tls.certificate_authority()))
        return resources

    def tearDown(self) -> None:
        running = self._running
        try:
            super().tearDown()
        finally:
            if running is not None and running.thread.is_alive():
                self._report_held_loop(running.thread)

    def _report_held_loop(self, thread: threading.Thread) -> None:
        """Fail the tear-down of a server whose thread outlived the stop.

        Only synchronous code on the event loop keeps it from stopping in
        time: an ``auth=`` check or a ``match=`` function that blocks (a
        slow directory lookup). ``tearDown`` returned as if all went well,
        with the thread left running; where it is shows what holds it.
        """
        where = holding_code(thread.ident) or ""
        self._tear_down_raised = True
        raise ServerSideError(
            f"{self!r}: the server's event loop did not stop within the layer's stop_timeout"
            f" ({self.stop_timeout} seconds): synchronous code holds it, such as an auth= check or"
            " a match= function that blocks. The server's thread is left behind until it"
            " returns. The loop's thread is at:\n\n" + where
        )

    def testSetUp(self) -> None:
        super().testSetUp()
        if self._running is not None:
            server = self._running.server
            assert isinstance(server, SMTPServer)
            server.reset()
            with server.handler.lock:
                server.handler.test += 1
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
    try:
        # Made in here too: it refuses some settings as it is made (--port 70000).
        # A client gets its error reply; $SERVERLAYER_VERBOSE prints the server's side.
        layer = Layer(name="serverlayer_smtp_main", host=options.host, port=options.port,
                      maildir=options.maildir, report_server_errors=False)
        layer.setUp()
    except AddressInUseError:
        parser.exit(2, f"{parser.prog}: port {options.port} on {options.host} is already in use (another mail"
                       " sink?). Choose another with --port, or --port 0 for any free one.\n")
    except ServerLayerError as error:
        # Without the layer's name, "<__main__.Layer __main__.serverlayer_smtp_main>: ",
        # which means nothing on the command line.
        parser.exit(2, f"{parser.prog}: {re.sub(r'^<[^>]*>:? ', '', str(error))}\n")
    print(f"Listening for mail on {layer['smtp_address']}; Ctrl-C stops.", flush=True)
    outbox: Outbox = layer["outbox"]
    shown = 0
    try:
        while True:
            _print_message(outbox.wait_for(shown + 1, timeout=None)[shown], sys.stdout)
            shown += 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # Its reader stopped (``| head``): done, as other command-line tools
        # are, without a traceback, nor another at exit flushing stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        layer.tearDown()


if __name__ == "__main__":
    sys.exit(main())
