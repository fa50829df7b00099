"""Mail failures on demand, at every stage of an SMTP conversation, tried
with smtplib and aiosmtplib as applications send mail; and the protocol
gaps real clients found (bare LF lines, PIPELINING, DSN)."""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest
import unittest.mock
from email.message import EmailMessage
from typing import Any

import aiosmtplib

from serverlayer import ConfigurationError, smtp
from serverlayer.errors import MailTimeoutError
from serverlayer.smtp_failures import Transcript
from serverlayer.tests.helpers import set_up_by_hand

FAILURES = smtp.Layer(name="FAILURES", auth={"alice": "secret"})


def message(body: str = "Hello\n", sender: str = "shop@example.org", to: str = "bob@example.org") -> EmailMessage:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = sender, to, "Your order"
    mail.set_content(body)
    return mail


class FailureTestCase(unittest.TestCase):
    layer = FAILURES

    def setUp(self):
        self.smtpd = self.layer["smtpd"]
        self.outbox = self.layer["outbox"]

    def client(self, **kwargs) -> smtplib.SMTP:
        client = smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=10, **kwargs)
        self.addCleanup(client.close)
        return client

    def send(self, mail: EmailMessage | None = None, **kwargs):
        with self.client() as client:
            return client.send_message(mail or message(), **kwargs)

    def after_helo(self) -> tuple[socket.socket, Any]:
        """A raw connection the server greeted and said HELO to, and a file reading it."""
        raw = socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=10)
        self.addCleanup(raw.close)
        reader = raw.makefile("rb")
        self.addCleanup(reader.close)
        reader.readline()
        raw.sendall(b"HELO client.example\r\n")
        reader.readline()
        return raw, reader


class StageTests(FailureTestCase):
    def test_connect_refused_with_554(self):
        self.smtpd.fail("connect", 554)
        with self.assertRaises(smtplib.SMTPConnectError) as raised:
            self.client()
        self.assertEqual(raised.exception.smtp_code, 554)
        self.assertEqual(str(self.smtpd.transcripts[0]), "S: 554 5.3.0 Transaction failed\nS: <connection closed>")

    def test_connect_dropped_before_the_greeting(self):
        self.smtpd.drop("connect")
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            self.client()
        self.assertEqual(self.smtpd.transcripts[0].lines, ["S: <connection closed>"])

    def test_helo_refused(self):
        self.smtpd.fail("helo", 550, "5.7.1 Go away")
        with self.assertRaises(smtplib.SMTPHeloError) as raised:
            self.send()
        self.assertEqual((raised.exception.smtp_code, raised.exception.smtp_error), (550, b"5.7.1 Go away"))

    def test_auth_failing_temporarily(self):
        self.smtpd.fail("auth", 454)
        with self.client() as client, self.assertRaises(smtplib.SMTPAuthenticationError) as raised:
            client.login("alice", "secret")
        self.assertEqual(raised.exception.smtp_code, 454)
        # smtplib tries each mechanism; the transcript names them, never the credentials.
        auth = [line for line in self.smtpd.transcripts[0].commands if line.startswith("AUTH")]
        self.assertEqual(auth, ["AUTH PLAIN ...", "AUTH LOGIN ..."])
        self.assertNotIn("secret", str(self.smtpd.transcripts[0]))
        self.assertNotIn("c2VjcmV0", str(self.smtpd.transcripts[0]))  # nor in base64

    def test_mail_from_refused_for_one_sender(self):
        self.smtpd.fail("mail", 553, match="SPAM@example.org")
        with self.assertRaises(smtplib.SMTPSenderRefused) as raised:
            self.send(message(sender="spam@example.org"))
        self.assertEqual(raised.exception.smtp_code, 553)
        self.assertEqual(self.send(message(sender="shop@example.org")), {})
        self.assertEqual([mail.mail_from for mail in self.outbox], ["shop@example.org"])

    def test_rcpt_refused_per_recipient(self):
        self.smtpd.fail("rcpt", 550, match=re.compile(r".*@gone\.example"))
        refused = self.send(message(to="bob@example.org, carol@gone.example"))
        self.assertEqual(refused, {"carol@gone.example": (550, b"5.1.1 Mailbox unavailable")})
        [mail] = self.outbox
        self.assertEqual(mail.rcpt_tos, ["bob@example.org"])

    def test_every_recipient_refused(self):
        self.smtpd.fail("rcpt", 452)
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            self.send(message(to="bob@example.org, carol@example.org"))
        self.assertEqual(len(self.outbox), 0)

    def test_data_refused_so_354_never_comes(self):
        self.smtpd.fail("data", 451)
        with self.assertRaises(smtplib.SMTPDataError) as raised:
            self.send()
        self.assertEqual(raised.exception.smtp_code, 451)
        replies = self.smtpd.transcripts[0].replies
        self.assertFalse(any(reply.startswith("354") for reply in replies), replies)

    def test_message_refused_after_its_body(self):
        self.smtpd.fail("message", 552)
        with self.assertRaises(smtplib.SMTPDataError) as raised:
            self.send()
        self.assertEqual(raised.exception.smtp_code, 552)
        self.assertEqual(len(self.outbox), 0)
        self.assertIn("S: 354 End data with <CR><LF>.<CR><LF>", self.smtpd.transcripts[0].lines)

    def test_quit_answered_with_421(self):
        self.smtpd.fail("quit", 421)
        client = self.client()
        self.assertEqual(client.send_message(message()), {})
        self.assertEqual(client.quit()[0], 421)
        self.assertEqual(len(self.outbox), 1)

    def test_the_fail_data_of_before_still_works(self):
        self.smtpd.fail_data(554)
        with self.assertRaises(smtplib.SMTPDataError):
            self.send()


class DropAndDelayTests(FailureTestCase):
    def test_dropped_at_mail_from(self):
        self.smtpd.drop("mail")
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            self.send()
        self.assertEqual(self.smtpd.transcripts[0].lines[-1], "S: <connection closed>")

    def test_dropped_in_the_middle_of_the_body(self):
        self.smtpd.drop("message", after_bytes=1000)
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            self.send(message(("x" * 70 + "\n") * 200))
        self.assertEqual(len(self.outbox), 0)
        self.assertEqual(self.smtpd.transcripts[0].lines[-1], "S: <connection closed>")
        self.assertEqual(self.send(), {})  # the next connection is served

    def test_dropped_after_the_body_without_a_reply(self):
        self.smtpd.drop("message", match="shop@example.org")
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            self.send()
        self.assertEqual(len(self.outbox), 0)

    def test_a_late_reply(self):
        self.smtpd.delay("rcpt", 0.3)
        started = time.monotonic()
        self.assertEqual(self.send(), {})
        self.assertGreaterEqual(time.monotonic() - started, 0.3)

    def test_a_reply_late_enough_for_the_client_to_give_up(self):
        self.smtpd.delay("data", 30)
        client = smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=0.2)
        self.addCleanup(client.close)
        with self.assertRaises((TimeoutError, smtplib.SMTPServerDisconnected)):
            client.send_message(message())

    def test_a_reply_split_in_two_writes(self):
        self.smtpd.fail("helo", 421, "4.3.2 Closing for maintenance", split=1.0)
        with socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=10) as raw:
            reader = raw.makefile("rb")
            self.assertTrue(reader.readline().startswith(b"220 "))
            raw.sendall(b"EHLO client.example\r\n")
            first = raw.recv(1000)
            rest = b""
            while not rest.endswith(b"\r\n"):
                rest += raw.recv(1000)
        self.assertEqual(first + rest, b"421 4.3.2 Closing for maintenance\r\n")
        self.assertEqual(first, b"421 4.3.2 Closin")  # the second half comes 1 s later
        with smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=10) as client:
            self.assertEqual(client.ehlo()[0], 421)  # smtplib joins the halves


class MoreStageTests(FailureTestCase):
    def test_a_refused_greeting_in_two_writes_then_the_server_hangs_up(self):
        self.smtpd.fail("connect", 421, "4.3.2 Too busy", split=1.0)
        with socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=10) as raw:
            first = raw.recv(1000)
            rest = b""
            while not rest.endswith(b"\r\n"):
                rest += raw.recv(1000)
            self.assertEqual(raw.recv(1000), b"")  # closed by the server
        self.assertEqual((first, first + rest), (b"421 4.3.2", b"421 4.3.2 Too busy\r\n"))

    def test_a_late_greeting_delays_the_greeting_only(self):
        late = self.smtpd.delay("connect", 0.2)
        started = time.monotonic()
        self.assertEqual(self.send(), {})
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        self.assertEqual(late.used, 1)  # one greeting, not every reply

    def test_a_client_that_ends_its_side_during_a_late_greeting_is_closed(self):
        self.smtpd.delay("connect", 30)
        with socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=5) as raw:
            raw.sendall(b"QUIT\r\n")
            raw.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            self.assertEqual(raw.recv(1000), b"")  # the server closes too, at once
        self.assertLess(time.monotonic() - started, 2)

    def test_a_cut_for_one_sender(self):
        self.smtpd.drop("message", after_bytes=20, match="shop@example.org")
        self.assertEqual(self.send(message(sender="other@example.org")), {})
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            self.send(message(sender="shop@example.org"))
        self.assertEqual([mail.mail_from for mail in self.outbox], ["other@example.org"])
        *_, started, cut = self.smtpd.transcripts[-1].lines
        self.assertTrue(started.startswith("S: 354 "), started)  # cut inside the message, not before
        self.assertEqual(cut, "S: <connection closed>")

    def test_a_cut_before_the_first_byte(self):
        self.smtpd.drop("message", after_bytes=0)
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            self.send()
        self.assertEqual(len(self.outbox), 0)

    def test_dsn_parameters_of_a_refused_recipient_are_not_kept(self):
        self.smtpd.refuse_recipients("carol@example.org")
        with self.client() as client:
            refused = client.sendmail(
                "shop@example.org", ["bob@example.org", "carol@example.org"], b"Subject: x\r\n\r\nhi\r\n",
                rcpt_options=["NOTIFY=FAILURE"],
            )
        self.assertEqual(list(refused), ["carol@example.org"])
        [received] = self.outbox
        self.assertEqual(received.rcpt_options, ["NOTIFY=FAILURE"])  # bob's alone


class NothingArrangedTests(FailureTestCase):
    """With nothing arranged, as in most tests, the server does not look
    for arrangements at all: its fast path."""

    def consulted(self) -> list[str]:
        """The stages the server looked up while it took a message."""
        from serverlayer.smtp_failures import Arrangements

        with unittest.mock.patch.object(Arrangements, "take", autospec=True, side_effect=Arrangements.take) as take:
            self.send(mail_options=["RET=HDRS"])
        return [call.args[1] for call in take.call_args_list]

    def test_no_lookups_without_arrangements(self):
        self.assertEqual(self.consulted(), [])
        [arrived] = self.outbox
        self.assertEqual(arrived.mail_options, ["SIZE=170", "RET=HDRS"])

    def test_every_stage_is_looked_up_once_something_is_arranged(self):
        self.smtpd.fail("mail", 421, match="nobody")
        self.assertEqual(self.consulted(), ["connect", "helo", "mail", "rcpt", "data", "message", "message", "quit"])
        self.assertEqual(len(self.outbox), 1)


class ScopeTests(FailureTestCase):
    def send_with_retries(self, attempts: int) -> int:
        """A sender that retries temporary failures; the attempts it took."""
        for attempt in range(1, attempts + 1):
            try:
                self.send()
                return attempt
            except smtplib.SMTPRecipientsRefused as error:
                [(code, _)] = error.recipients.values()
                if code >= 500:
                    raise
        raise RuntimeError(f"gave up after {attempts} attempts")

    def test_a_retrying_sender_succeeds_the_third_time(self):
        failing = self.smtpd.fail("rcpt", 451, times=2)
        self.assertEqual(self.send_with_retries(5), 3)
        self.assertEqual(failing.used, 2)
        self.assertEqual(len(self.outbox), 1)

    def test_a_retrying_sender_gives_up(self):
        failing = self.smtpd.fail("rcpt", 451)
        with self.assertRaisesRegex(RuntimeError, "gave up after 3 attempts"):
            self.send_with_retries(3)
        self.assertEqual(failing.used, 3)
        self.assertEqual(len(self.smtpd.transcripts), 3)

    def test_a_permanent_failure_is_not_retried(self):
        self.smtpd.fail("rcpt", 550)
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            self.send_with_retries(3)
        self.assertEqual(len(self.smtpd.transcripts), 1)

    def test_for_the_next_connections(self):
        refusing = self.smtpd.fail("rcpt", 451, connections=1)
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as raised:
            self.send(message(to="bob@example.org, carol@example.org"))
        self.assertEqual(len(raised.exception.recipients), 2)  # every recipient of that connection
        self.assertEqual(self.send(message(to="bob@example.org, carol@example.org")), {})
        self.assertEqual(refusing.used, 2)

    def test_dropped_for_two_connections_then_served(self):
        self.smtpd.drop("mail", connections=2)
        outcomes = []
        for _ in range(3):
            try:
                self.send()
                outcomes.append("sent")
            except smtplib.SMTPServerDisconnected:
                outcomes.append("dropped")
        self.assertEqual(outcomes, ["dropped", "dropped", "sent"])

    def test_times_and_connections_together(self):
        self.smtpd.fail("rcpt", 452, times=1, connections=2)
        self.assertEqual(self.send(message(to="bob@example.org, carol@example.org")),
                         {"bob@example.org": (452, b"4.3.1 Insufficient system storage")})
        self.assertEqual(self.send(message(to="bob@example.org, carol@example.org")), {})

    def test_the_first_arrangement_that_applies_wins(self):
        self.smtpd.fail("mail", 451, times=1)
        self.smtpd.fail("mail", 553, match=lambda sender: sender.endswith("@example.org"))
        codes = []
        for _ in range(3):
            try:
                self.send()
            except smtplib.SMTPSenderRefused as error:
                codes.append(error.smtp_code)
        self.assertEqual(codes, [451, 553, 553])

    def test_a_match_function_that_raises_is_the_tests_error(self):
        def wrong(sender):
            return sender.domain == "example.org"  # a str has no domain

        self.smtpd.fail("mail", 553, match=wrong)
        with self.assertRaises(smtplib.SMTPSenderRefused) as refused:
            self.send()
        self.assertEqual(refused.exception.smtp_code, 500)
        [error] = self.layer.server_errors.take()
        self.assertIn("ScriptError: the match= function", error)
        self.assertIn("wrong' of an arrangement for the 'mail' stage raised AttributeError on 'shop@example.org'",
                      error)
        self.assertIn("AttributeError: 'str' object has no attribute 'domain'", error)  # the cause

    def test_everything_resets_before_the_next_test(self):
        self.smtpd.fail("connect", 554)
        self.smtpd.drop("message", after_bytes=10)
        with self.assertRaises(smtplib.SMTPConnectError):
            self.client()
        self.layer.testSetUp()  # what the test runner calls before the next test
        self.assertEqual(self.smtpd.transcripts, [])
        self.assertEqual(self.send(), {})
        self.assertEqual(len(self.outbox), 1)

    def test_a_connection_open_from_an_earlier_test_is_in_this_tests_transcripts(self):
        # An application that keeps its SMTP connection open (a mail queue's
        # worker) sent this test's commands on a connection whose transcript
        # was in the earlier test's list only: this test's were empty, and
        # outbox.wait_for() could not say what the server refused.
        client = self.client()
        client.sendmail("shop@example.org", ["bob@example.org"], message().as_bytes())
        self.layer.testSetUp()  # what the test runner calls before the next test
        self.assertEqual(self.smtpd.transcripts, [])
        self.smtpd.refuse_recipients("bob@example.org")
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            client.sendmail("shop@example.org", ["bob@example.org"], message().as_bytes())
        [transcript] = self.smtpd.transcripts
        # smtplib sends "MAIL FROM:" and "RCPT TO:" before Python 3.13, "from:" and "to:" since.
        lines = [re.sub(r"^C: (MAIL FROM|RCPT TO):", lambda verb: verb[0].upper(), line, flags=re.I)
                 for line in transcript.lines]
        self.assertRegex(lines[0], r"^C: MAIL FROM:<shop@example.org> size=\d+$")
        self.assertEqual(lines[1:4], [
            "S: 250 OK", "C: RCPT TO:<bob@example.org>", "S: 550 5.1.1 <bob@example.org>: Recipient address rejected",
        ])
        with self.assertRaises(smtplib.SMTPDataError):
            client.sendmail("shop@example.org", ["carol@example.org"], b"Subject: " + b"x" * 1000 + b"\r\n\r\n")
        with self.assertRaises(MailTimeoutError) as caught:  # a refusal the test did not arrange
            self.outbox.wait_for(timeout=0.1)
        self.assertIn("-> 500 Line too long", str(caught.exception))
        client.quit()
        self.assertEqual(transcript.lines[-2:], ["C: QUIT", "S: 221 Bye"])

    def test_a_connection_accepted_as_the_test_ended_is_in_the_next_tests_transcripts_once(self):
        # The server makes a connection's protocol when it accepts it, and
        # registers it when the connection is made: over TLS, after the
        # handshake. A test that began in between had that transcript twice
        # (the same one, registered under the old test, then again as the
        # new test's), so len(transcripts) counted one connection as two.
        layer = set_up_by_hand(self, smtp.Layer(name="SMTPS_TRANSCRIPTS", implicit_tls=True))
        raw = socket.create_connection((layer["smtp_host"], layer["smtp_port"]), timeout=10)
        self.addCleanup(raw.close)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = layer["ssl_context"].wrap_bio(incoming, outgoing, server_hostname=layer["smtp_host"])

        def shake_hands() -> None:
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            raw.sendall(outgoing.read())

        shake_hands()  # the ClientHello
        incoming.write(raw.recv(65536))  # the server's answer: it accepted the connection
        layer.testTearDown()
        layer.testSetUp()  # what the test runner calls before the next test
        shake_hands()  # the client's Finished: now the server's handshake is done
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            try:
                greeting += client.read()
            except ssl.SSLWantReadError:
                incoming.write(raw.recv(65536))
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        [transcript] = layer["smtpd"].transcripts
        self.assertEqual(transcript.lines, ["S: " + greeting.decode().rstrip("\r\n")])

    def test_aiosmtplib_retries_too(self):
        self.smtpd.fail("mail", 451, times=1)

        async def send_twice() -> list[str]:
            outcomes = []
            for _ in range(2):
                try:
                    await aiosmtplib.send(message(), hostname=self.layer["smtp_host"], port=self.layer["smtp_port"],
                                          timeout=10, start_tls=False)
                    outcomes.append("sent")
                except aiosmtplib.SMTPSenderRefused as error:
                    outcomes.append(f"refused {error.code}")
            return outcomes

        self.assertEqual(asyncio.run(send_twice()), ["refused 451", "sent"])
        self.assertEqual(len(self.outbox), 1)


class TranscriptTests(FailureTestCase):
    def test_a_conversation_as_the_client_saw_it(self):
        self.send()
        [transcript] = self.smtpd.transcripts
        size = len(self.outbox[0].raw)
        self.assertEqual(transcript.peer[0], "127.0.0.1")
        lines = transcript.lines
        self.assertEqual(lines[0], "S: 220 127.0.0.1 serverlayer SMTP")
        self.assertEqual(lines[1].split(" ")[0:1], ["C:"])
        self.assertTrue(lines[1].startswith("C: EHLO "))
        expected_end = [
            f"C: MAIL FROM:<shop@example.org> size={size}",
            "S: 250 OK",
            "C: RCPT TO:<bob@example.org>",
            "S: 250 OK",
            "C: DATA",
            "S: 354 End data with <CR><LF>.<CR><LF>",
            f"C: <message, {size} bytes>",
            "S: 250 OK: message accepted",
            "C: QUIT",
            "S: 221 Bye",
        ]
        # Arguments as the client sent them: Python 3.13's smtplib writes "from:" and "to:" in lower case.
        self.assertEqual([line.replace(" from:", " FROM:").replace(" to:", " TO:") for line in lines[-10:]],
                         expected_end)
        self.assertEqual(transcript.commands[-1], "QUIT")
        self.assertEqual(transcript.replies[-1], "221 Bye")

    def test_commands_the_server_does_not_know(self):
        # aiosmtpd refuses these before any command runs: the transcript
        # shows the line itself, and each refusal is the line's.
        with self.client() as client:
            client.ehlo()
            self.assertEqual(client.docmd("XYZZY", "plugh")[0], 500)
            self.assertEqual(client.docmd("MAIL", "FROM:<" + "x" * 600 + "@example.org>")[0], 500)
            self.assertEqual(client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")[0], 235)
            self.assertEqual(client.noop()[0], 250)
        transcript = self.smtpd.transcripts[0]
        self.assertIn('S: 500 Error: command "XYZZY" not recognized', transcript.lines)
        self.assertEqual(transcript.refusals[0], 'XYZZY plugh -> 500 Error: command "XYZZY" not recognized')
        too_long = transcript.refusals[1]
        self.assertTrue(too_long.startswith("MAIL FROM:<xxx"), too_long)
        self.assertTrue(too_long.endswith("x -> 500 Command line too long"), too_long)  # kept short
        self.assertLess(len(too_long), 300)
        self.assertEqual(transcript.commands[-3:], ["AUTH PLAIN ...", "NOOP", "QUIT"])  # in step again

    def test_refused_lines_pipelined_after_data_and_after_a_message(self):
        raw, reader = self.after_helo()
        # DATA refused (no RCPT): what follows in its packet is commands.
        raw.sendall(b"MAIL FROM:<shop@example.org>\r\nDATA\r\nRSET\r\nFOO\r\n")
        self.assertEqual([reader.readline()[:3] for _ in range(4)], [b"250", b"503", b"250", b"500"])
        raw.sendall(b"MAIL FROM:<shop@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.assertEqual([reader.readline()[:3] for _ in range(3)], [b"250", b"250", b"354"])
        raw.sendall(b"Subject: x\r\n\r\nhi\r\n.\r\nBAR\r\n")  # a command after the message's end
        self.assertEqual([reader.readline()[:3] for _ in range(2)], [b"250", b"500"])
        refusals = self.smtpd.transcripts[0].refusals
        self.assertEqual(refusals[0], "DATA -> 503 Error: need RCPT command")
        self.assertEqual(refusals[1:], ['FOO -> 500 Error: command "FOO" not recognized',
                                        'BAR -> 500 Error: command "BAR" not recognized'])

    def test_a_message_sent_before_its_354_is_no_commands(self):
        self.smtpd.delay("data", 0.3)
        with socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=10) as raw:
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"HELO client.example\r\nMAIL FROM:<shop@example.org>\r\nRCPT TO:<bob@example.org>\r\n")
            self.assertEqual([reader.readline()[:3] for _ in range(3)], [b"250", b"250", b"250"])
            raw.sendall(b"DATA\r\n")
            raw.sendall(b"Subject: early\r\n\r\nhi\r\n.\r\n")  # before the (late) 354
            self.assertEqual([reader.readline()[:3] for _ in range(2)], [b"354", b"250"])
            raw.sendall(b"FOO\r\n")
            self.assertEqual(reader.readline()[:3], b"500")
        transcript = self.smtpd.transcripts[0]
        self.assertNotIn("C: SUBJECT: early", transcript.lines)
        self.assertEqual(transcript.refusals, ['FOO -> 500 Error: command "FOO" not recognized'])

    def test_auth_data_stays_out_of_the_transcript(self):
        with self.client() as client:
            client.ehlo()
            client.user, client.password = "alice", "secret"
            self.assertEqual(client.auth("LOGIN", client.auth_login)[0], 235)
            self.assertEqual(client.noop()[0], 250)
        lines = self.smtpd.transcripts[0].lines
        self.assertEqual([line for line in lines if line.startswith("C: ")][-3:],
                         ["C: AUTH LOGIN ...", "C: NOOP", "C: QUIT"])

    def test_commands_before_starttls_when_it_is_required(self):
        layer = set_up_by_hand(self, smtp.Layer(name="REQUIRES_STARTTLS", starttls=True, require_starttls=True))
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=10) as client:
            client.ehlo()
            self.assertEqual(client.docmd("MAIL", "FROM:<shop@example.org>")[0], 530)
            client.starttls(context=layer["ssl_context"])
            client.ehlo()
            self.assertEqual(client.noop()[0], 250)
        transcript = layer["smtpd"].transcripts[0]
        self.assertEqual(
            transcript.refusals, ["MAIL FROM:<shop@example.org> -> 530 Must issue a STARTTLS command first"]
        )
        self.assertEqual(transcript.commands[-4:], ["STARTTLS", f"EHLO {client.local_hostname}", "NOOP", "QUIT"])


class UnarrangedRefusalTests(FailureTestCase):
    """Mail that never came: the timeout names what the server refused
    without the test arranging it."""

    def test_a_refusal_nobody_arranged_explains_the_missing_mail(self):
        with self.client() as client:
            client.ehlo()
            client.docmd("MAIL FROM:<shop@example.org>")
            self.assertEqual(client.docmd("DATA")[0], 503)  # an application that forgot its recipients
        with self.assertRaises(smtp.MailTimeoutError) as raised:
            self.outbox.wait_for(1, timeout=0.05)
        self.assertEqual(
            str(raised.exception),
            f"{self.layer!r}: Waited 0.05 seconds for 1 message(s); 0 of them arrived, 0 message(s) in all.\n"
            "The server refused, without the test arranging it:\n"
            "  DATA -> 503 Error: need RCPT command",
        )

    def test_arranged_refusals_are_no_news(self):
        self.smtpd.fail("mail", 451, times=1)
        self.smtpd.refuse_recipients("carol@example.org")
        with self.assertRaises(smtplib.SMTPSenderRefused):
            self.send()
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            self.send(message(to="carol@example.org"))
        self.smtpd.fail_data(554)
        with self.assertRaises(smtplib.SMTPDataError):
            self.send()
        self.smtpd.fail("message", 452, times=1)  # first in line, before fail_data
        with self.assertRaises(smtplib.SMTPDataError):
            self.send()
        self.assertEqual([transcript.refusals for transcript in self.smtpd.transcripts], [[], [], [], []])
        self.smtpd.reset()
        self.smtpd.fail("connect", 421)
        with self.assertRaises(smtplib.SMTPConnectError):
            self.client()
        with self.assertRaises(smtp.MailTimeoutError) as raised:
            self.outbox.wait_for(1, timeout=0.05)
        self.assertNotIn("refused", str(raised.exception))
        self.assertEqual([transcript.refusals for transcript in self.smtpd.transcripts], [[]])


    def test_an_arranged_reply_excuses_itself_only(self):
        self.smtpd.fail("message", 503, "Error: need RCPT command", times=1)
        with self.client() as client:
            client.ehlo()
            with self.assertRaises(smtplib.SMTPDataError):
                client.sendmail("shop@example.org", ["bob@example.org"], b"Subject: x\r\n\r\nhi\r\n")
            client.docmd("MAIL FROM:<shop@example.org>")
            self.assertEqual(client.docmd("DATA"), (503, b"Error: need RCPT command"))  # the same words, unarranged
        self.assertEqual(self.smtpd.transcripts[0].refusals, ["DATA -> 503 Error: need RCPT command"])


class ProtocolGapTests(FailureTestCase):
    def test_a_large_message_with_bare_lf_lines_is_accepted(self):
        mail = message(("a line of text, " * 4 + "\n") * 100)
        raw = mail.as_bytes()  # as applications pass it: LF line ends, no CR
        self.assertGreater(len(raw), 5000)
        self.assertNotIn(b"\r", raw)
        with self.client() as client:
            self.assertEqual(client.sendmail("shop@example.org", ["bob@example.org"], raw), {})
        [received] = self.outbox
        # smtplib ends bytes that do not end in CRLF with one more: an empty
        # last line, as any MTA that reads bare LFs would see it.
        self.assertEqual(received.get_content(), mail.get_content() + "\n")
        self.assertNotIn(b"\n", received.raw.replace(b"\r\n", b""))  # every line end CRLF

    def test_a_message_sent_in_pieces_over_a_raw_socket(self):
        with socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=10) as raw:
            reader = raw.makefile("rb")

            def say(data: bytes) -> bytes:
                raw.sendall(data)
                return reader.readline()

            reader.readline()
            say(b"HELO client.example\r\n")
            say(b"MAIL FROM:<shop@example.org>\r\n")
            say(b"RCPT TO:<bob@example.org>\r\n")
            self.assertTrue(say(b"DATA\r\n").startswith(b"354"))
            raw.sendall(b"Subject: pieces\r")
            raw.sendall(b"\nX-Mixed: yes\n\nbody\r\nmore\n.\nstill the body\n")
            self.assertTrue(say(b"\r\n.\r\n").startswith(b"250"))  # only CRLF.CRLF ends it
        [received] = self.outbox
        self.assertEqual(
            received.raw, b"Subject: pieces\r\nX-Mixed: yes\r\n\r\nbody\r\nmore\r\n.\r\nstill the body\r\n\r\n"
        )

    def test_a_lone_dot_next_to_a_bare_lf_does_not_end_the_message(self):
        # curl dot-stuffs only lines that follow CRLF; such a dot line, its
        # LFs made CRLF, would end the message there, and the rest would be
        # read as commands (SMTP smuggling).
        body = b"Subject: dots\n\nbefore\n.\nafter the dot line\nMAIL FROM:<smuggled@example.org>\n"
        path = os.path.join(tempfile.mkdtemp(), "message.eml")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "wb") as file:
            file.write(body)
        completed = subprocess.run(
            ["curl", "--silent", "--show-error", f"smtp://{self.layer['smtp_host']}:{self.layer['smtp_port']}",
             "--mail-from", "shop@example.org", "--mail-rcpt", "bob@example.org", "--upload-file", path],
            capture_output=True, timeout=30,
        )
        self.assertEqual(completed.returncode, 0, completed.stderr)
        [received] = self.outbox
        self.assertEqual(  # curl ends a body that does not end in CRLF with one: an empty last line
            received.raw,
            b"Subject: dots\r\n\r\nbefore\r\n.\r\nafter the dot line\r\nMAIL FROM:<smuggled@example.org>\r\n\r\n",
        )
        [transcript] = self.smtpd.transcripts
        self.assertEqual(transcript.refusals, [])
        self.assertEqual(len([c for c in transcript.commands if c.startswith("MAIL")]), 1, transcript)

    def test_lone_dot_lines_across_packet_boundaries(self):
        # Whatever the packets, the same lines; a lone dot next to a bare LF
        # goes on dot-stuffed (aiosmtpd takes the stuffing off again).
        for stream, expected in [
            (b"a\n.\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\n.\r\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b".\nfirst\r\n.\r\n", b"..\r\nfirst\r\n.\r\n"),
            (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n.\r\n"),  # the end of a message, untouched
            (b"a\nb\n\r\n.\r\n", b"a\r\nb\r\n\r\n.\r\n"),
            (b"a.\r\n.b\n..\n", b"a.\r\n.b\r\n..\r\n"),  # no lone dots: only line ends change
            (b"Thanks.\n\r\n.\r\n", b"Thanks.\r\n\r\n.\r\n"),  # a dot ending a line is no lone dot
            (b"a\nx.\r\n.\r\n", b"a\r\nx.\r\n.\r\n"),
        ]:
            for first in range(len(stream) + 1):
                for second in range(first, len(stream) + 1):
                    packets = [stream[:first], stream[first:second], stream[second:]]
                    with self.subTest(packets=packets):
                        fix = smtp.CRLFLines()
                        self.assertEqual(b"".join(fix(packet) for packet in packets), expected)

    def test_line_ends_across_packet_boundaries(self):
        for packets, expected in [
            ([b"a\r", b"\nb\n"], b"a\r\nb\r\n"),  # CR and LF in two packets: one line end
            ([b"a\n", b"\nb"], b"a\r\n\r\nb"),
            ([b"a\r\n", b"b\r\n"], b"a\r\nb\r\n"),  # CRLF as it should be: untouched
            ([b"a\r", b"", b"\n"], b"a\r\n"),  # an empty read changes nothing
            ([b"a", b"\n"], b"a\r\n"),
            ([b"\nb"], b"\r\nb"),  # a first packet that starts a line end
            ([b"a\r\n", b"\nb"], b"a\r\n\r\nb"),
            ([b"a\r", b"b", b"\nc"], b"a\rb\r\nc"),  # a CR, then more: the next LF is bare
        ]:
            with self.subTest(packets=packets):
                fix = smtp.CRLFLines()
                self.assertEqual(b"".join(fix(packet) for packet in packets), expected)

    def test_pipelining_and_dsn_are_advertised(self):
        with self.client() as client:
            client.ehlo()
            self.assertTrue(client.has_extn("pipelining"))
            self.assertTrue(client.has_extn("dsn"))

    def test_help_describes_the_commands_as_aiosmtpd_does(self):
        # aiosmtpd reads each command's syntax off the method it dispatches
        # to, which the failure stages wrap.
        with self.client() as client:
            client.ehlo()
            self.assertIn(b"MAIL", client.help())
            self.assertEqual(client.help("RCPT"), b"Syntax: RCPT TO: <address> [SP <mail-parameters>]")

    def test_failures_default_to_at_once_for_the_rest_of_the_test(self):
        for arrangement in (self.smtpd.drop("rcpt"), self.smtpd.fail("rcpt", 451)):
            self.assertEqual((arrangement.delay, arrangement.times, arrangement.connections), (0.0, None, None))

    def test_dsn_parameters_are_recorded(self):
        with self.client() as client:
            client.sendmail(
                "shop@example.org", ["bob@example.org"], b"Subject: x\r\n\r\nhi\r\n",
                mail_options=["RET=HDRS", "ENVID=order-42"],
                rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@example.org"],
            )
        [received] = self.outbox
        self.assertEqual(received.mail_options, ["SIZE=18", "RET=HDRS", "ENVID=order-42"])
        self.assertEqual(received.rcpt_options, ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@example.org"])

    def test_aiosmtplib_pipelines_its_commands(self):
        async def send() -> None:
            async with aiosmtplib.SMTP(hostname=self.layer["smtp_host"], port=self.layer["smtp_port"],
                                       timeout=10, start_tls=False) as client:
                await client.ehlo()
                self.assertTrue(client.supports_extension("pipelining"))
                await client.send_message(message(to="bob@example.org, carol@example.org"))

        asyncio.run(send())
        [received] = self.outbox
        self.assertEqual(received.rcpt_tos, ["bob@example.org", "carol@example.org"])


class ArrangementDetailTests(FailureTestCase):
    def test_each_code_has_its_standard_text(self):
        from serverlayer.smtp_failures import failing_reply

        expected = {
            421: "4.3.2 Service not available, closing transmission channel",
            450: "4.2.1 Mailbox unavailable, try again later",
            451: "4.3.0 Local error in processing, try again later",
            452: "4.3.1 Insufficient system storage",
            454: "4.7.0 Temporary authentication failure",
            535: "5.7.8 Authentication credentials invalid",
            550: "5.1.1 Mailbox unavailable",
            551: "5.1.6 User not local",
            552: "5.3.4 Message size exceeds fixed maximum message size",
            553: "5.1.3 Mailbox name not allowed",
            554: "5.3.0 Transaction failed",
            499: "Failed as the test arranged",
        }
        for code, text in expected.items():
            self.assertEqual(failing_reply(code, None, "mail"), f"{code} {text}")
        self.assertEqual(failing_reply(451, "4.4.5 Busy", "mail"), "451 4.4.5 Busy")

    def test_the_codes_a_failure_may_have(self):
        for code in (400, 599):
            self.smtpd.fail("mail", code, "edge", times=1)
        for code in (399, 600, True, "451", 451.0):
            with self.subTest(code=code), self.assertRaises(ConfigurationError):
                self.smtpd.fail("mail", code)
        codes = []
        for _ in range(2):
            with self.assertRaises(smtplib.SMTPSenderRefused) as raised:
                self.send()
            codes.append(raised.exception.smtp_code)
        self.assertEqual(codes, [400, 599])

    def test_times_must_be_a_whole_number(self):
        for times in ("2", 1.5, -1):
            with self.subTest(times=times), self.assertRaises(ConfigurationError):
                self.smtpd.fail("rcpt", 451, times=times)

    def test_after_bytes_only_at_the_message_stage(self):
        for stage in ("connect", "data", "helo", "quit"):
            with self.subTest(stage=stage), self.assertRaises(ConfigurationError):
                self.smtpd.drop(stage, after_bytes=10)

    def test_a_stage_named_by_an_equal_string(self):
        stage = "".join(["r", "c", "p", "t"])  # equal to "rcpt", not the same object
        self.smtpd.fail(stage, 550)
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            self.send()

    def test_a_cut_that_does_not_apply_leaves_the_message_stage_to_the_others(self):
        self.smtpd.drop("message", after_bytes=5, match="someone-else@example.org")
        self.smtpd.fail("message", 552)
        with self.assertRaises(smtplib.SMTPDataError) as raised:
            self.send()
        self.assertEqual(raised.exception.smtp_code, 552)

    def test_a_sender_without_angle_brackets(self):
        self.smtpd.fail("mail", 553, match="shop@example.org")
        with self.client() as client:
            client.ehlo()
            self.assertEqual(client.docmd("MAIL FROM:shop@example.org")[0], 553)
            self.assertEqual(client.docmd("MAIL FROM:other@example.org")[0], 250)

    def test_auth_matches_the_mechanism_alone(self):
        self.smtpd.fail("auth", 535, match="PLAIN")
        with self.client() as client:
            client.ehlo()
            self.assertEqual(client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")[0], 535)
        self.assertIn("C: AUTH PLAIN ...", self.smtpd.transcripts[0].lines)


class ConfigurationTests(FailureTestCase):
    def assertRefused(self, call, *fragments):
        with self.assertRaises(ConfigurationError) as raised:
            call()
        for fragment in fragments:
            self.assertIn(fragment, str(raised.exception))

    def test_bad_arrangements_are_refused_with_the_fix(self):
        self.assertRefused(lambda: self.smtpd.fail("rcpt_to", 550), "'rcpt_to' is no stage", "connect, helo")
        self.assertRefused(lambda: self.smtpd.fail("rcpt", 250), "from 400 to 599")
        self.assertRefused(lambda: self.smtpd.fail("rcpt", 451, times=0), "times=0")
        self.assertRefused(lambda: self.smtpd.drop("rcpt", connections=True), "connections=True", "at least 1")
        self.assertRefused(lambda: self.smtpd.delay("rcpt", -1), "delay=-1")
        self.assertRefused(lambda: self.smtpd.fail("rcpt", 451, split=-0.5), "split=-0.5")
        self.assertRefused(lambda: self.smtpd.drop("rcpt", after_bytes=10), "'message' stage, not 'rcpt'")
        self.assertRefused(lambda: self.smtpd.drop("message", after_bytes=-1), "after_bytes=-1")
        self.assertRefused(lambda: self.smtpd.drop("message", after_bytes=True), "after_bytes=True")
        self.assertRefused(lambda: self.smtpd.drop("message", after_bytes="10"), "after_bytes='10'")
        self.assertRefused(lambda: self.smtpd.fail("mail", 550, match=42), "match=42")
        self.assertRefused(lambda: self.smtpd.fail("mail", 550, match=re.compile(b"a@.*")), "bytes pattern")
        for stage in ("connect", "data", "quit"):
            self.assertRefused(
                lambda stage=stage: self.smtpd.fail(stage, 451, match="a@example.com"), f"the {stage!r} stage"
            )
        self.assertRefused(lambda: self.smtpd.delay("mail", "1"), "delay='1'")
        self.assertRefused(lambda: self.smtpd.delay("mail", None), "delay=None")
        self.assertRefused(lambda: self.smtpd.fail("mail", 550, b"5.7.1 no"), "a str")
        self.assertEqual(self.send(), {})  # nothing refused was arranged


class RealServerReplyTests(FailureTestCase):
    """Replies as real servers send them, which a real client's probe found amiss."""

    def test_a_text_of_several_lines_is_a_multi_line_reply(self):
        self.smtpd.fail("mail", 550, "5.7.1 Rejected.\nSee https://example.com/policy", times=1)
        self.smtpd.fail_data(554, "5.7.1 Spam.\r\nSee https://example.com/spam")
        with self.client() as client:
            client.ehlo()
            self.assertEqual(
                client.docmd("MAIL FROM:<shop@example.org>"),
                (550, b"5.7.1 Rejected.\nSee https://example.com/policy"),  # smtplib joins the lines so
            )
            self.assertEqual(client.noop()[0], 250)  # the conversation is still in step
            client.docmd("MAIL FROM:<shop@example.org>")
            client.docmd("RCPT TO:<bob@example.org>")
            self.assertEqual(client.docmd("DATA")[0], 354)
            client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
            self.assertEqual(client.getreply()[0], 554)
            self.assertEqual(client.noop()[0], 250)
        lines = self.smtpd.transcripts[0].lines
        self.assertIn("S: 550-5.7.1 Rejected.", lines)
        self.assertIn("S: 550 See https://example.com/policy", lines)
        self.assertEqual(self.smtpd.transcripts[0].refusals, [])  # every line arranged

    def test_nothing_the_client_sent_after_a_421_is_served(self):
        self.smtpd.fail("rcpt", 421, times=1)
        later = self.smtpd.fail("rcpt", 450, times=1)
        raw, reader = self.after_helo()
        raw.sendall(b"MAIL FROM:<shop@example.org>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.org>\r\n")
        self.assertEqual([reader.readline()[:4] for _ in range(3)], [b"250 ", b"421 ", b""])
        self.assertEqual(later.used, 0)
        self.assertEqual(self.smtpd.transcripts[0].lines[-1], "S: <connection closed>")

    def test_421_closes_the_connection(self):
        self.smtpd.fail("mail", 421)
        raw, reader = self.after_helo()
        raw.sendall(b"MAIL FROM:<shop@example.org>\r\n")
        self.assertTrue(reader.readline().startswith(b"421 "))
        self.assertEqual(reader.readline(), b"")  # closed: "closing transmission channel"
        self.assertEqual(self.smtpd.transcripts[0].lines[-1], "S: <connection closed>")

    def test_a_421_closing_is_in_the_transcript_before_the_client_can_read_the_reply(self):
        # The closing was recorded after the 421 went out. smtplib hangs up
        # on reading a 421, and a test checking the transcript then often
        # found no "<connection closed>"; once the next test had begun, it
        # landed in that test's transcripts, as a connection of its own.
        raw, reader = self.after_helo()
        readable_when_recorded = []
        recorded = threading.Event()
        record_closing = Transcript.closed

        def closed(transcript: Transcript) -> None:  # in the server's thread
            readable_when_recorded.append(bool(select.select([raw], [], [], 0)[0]))
            record_closing(transcript)
            recorded.set()

        self.smtpd.fail("mail", 421)
        with unittest.mock.patch.object(Transcript, "closed", closed):
            raw.sendall(b"MAIL FROM:<shop@example.org>\r\n")
            self.assertTrue(recorded.wait(10))  # not reading meanwhile: what came stays readable
            self.assertTrue(reader.readline().startswith(b"421 "))
            self.assertEqual(reader.readline(), b"")
        self.assertEqual(readable_when_recorded, [False])  # the client had nothing to read yet
        self.assertEqual(self.smtpd.transcripts[0].lines[-2:], [
            "S: 421 4.3.2 Service not available, closing transmission channel", "S: <connection closed>",
        ])
        self.layer.testTearDown()
        self.layer.testSetUp()  # what the test runner calls before the next test
        self.assertEqual(self.send(), {})
        self.assertEqual(len(self.smtpd.transcripts), 1)

    def at_354(self) -> tuple[socket.socket, Any]:
        """A raw connection whose message the server is ready to take, and a file reading it."""
        raw, reader = self.after_helo()
        for line in (b"MAIL FROM:<shop@example.org>", b"RCPT TO:<bob@example.org>"):
            raw.sendall(line + b"\r\n")
            reader.readline()
        raw.sendall(b"DATA\r\n")
        self.assertTrue(reader.readline().startswith(b"354"))
        return raw, reader

    def test_a_reply_after_the_message_split_in_two_writes(self):
        self.smtpd.fail("message", 451, "4.3.0 Try again later", split=0.5)
        raw, reader = self.at_354()
        raw.sendall(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        first = raw.recv(1000)
        rest = b""
        while not rest.endswith(b"\r\n"):
            rest += raw.recv(1000)
        self.assertEqual((first, first + rest), (b"451 4.3.0 Tr", b"451 4.3.0 Try again later\r\n"))

    def exchange_message(self, body: bytes, after: bytes = b"") -> bytes:
        """Send a message of ``body`` (and ``after`` in the same packet) on a
        raw socket; what the server sent after 354, to the end."""
        raw, reader = self.at_354()
        raw.sendall(body + b".\r\n" + after)
        raw.shutdown(socket.SHUT_WR)
        return reader.read()

    def test_a_cut_counts_the_body_alone(self):
        body = b"Subject: x\r\n\r\nhi\r\n"
        for after_bytes, after in ((len(body) + 1, b""), (len(body) + 3, b""), (len(body) + 1, b"QUIT\r\n")):
            with self.subTest(after_bytes=after_bytes, after=after):
                self.layer.testSetUp()
                cut = self.smtpd.drop("message", after_bytes=after_bytes)
                replies = self.exchange_message(body, after)
                self.assertTrue(replies.startswith(b"250 OK: message accepted\r\n"), replies)
                self.assertEqual((len(self.outbox), cut.used), (1, 0))
        self.layer.testSetUp()
        cut = self.smtpd.drop("message", after_bytes=len(body))
        self.assertEqual(self.exchange_message(body), b"")  # cut at its last byte: no reply
        self.assertEqual((len(self.outbox), cut.used), (0, 1))

    def test_a_cut_just_past_a_body_whose_end_comes_in_two_packets(self):
        body = b"Subject: x\r\n\r\nhi\r\n"
        for split in (1, 2):  # ".", or ".\r", then the rest of the end
            with self.subTest(split=split):
                self.layer.testSetUp()
                cut = self.smtpd.drop("message", after_bytes=len(body) + 1)
                raw, reader = self.at_354()
                raw.sendall(body + b".\r\n"[:split])
                time.sleep(0.05)  # two packets, as the network may split them
                raw.sendall(b".\r\n"[split:])
                self.assertTrue(reader.readline().startswith(b"250"))
                self.assertEqual((len(self.outbox), cut.used), (1, 0))

    def test_a_cut_used_up_by_one_connection_spares_the_other(self):
        cut = self.smtpd.drop("message", after_bytes=100, times=1)
        clients = []
        for _ in range(2):  # both begin their messages before either reaches the cut
            raw, reader = self.at_354()
            raw.sendall(b"Subject: x\r\n\r\n")
            clients.append((raw, reader))
        for raw, _ in clients:
            raw.sendall(b"x" * 200 + b"\r\n.\r\n")
        # One of them, whichever the server reads first, is cut; the other is not.
        self.assertEqual(sorted(reader.readline()[:4] for _, reader in clients), [b"", b"250 "])
        self.assertEqual((len(self.outbox), cut.used), (1, 1))

    def test_a_cut_arranged_by_a_test_that_ended_cuts_nothing(self):
        self.smtpd.drop("message", after_bytes=100)
        raw, reader = self.at_354()
        raw.sendall(b"Subject: x\r\n\r\n")
        self.layer.testTearDown()
        self.layer.testSetUp()  # arrangements end with their test
        raw.sendall(b"x" * 200 + b"\r\n.\r\n")
        self.assertTrue(reader.readline().startswith(b"250 "))

    def test_a_cut_longer_than_the_message_cuts_nothing_and_waits_for_a_longer_one(self):
        cut = self.smtpd.drop("message", after_bytes=2000, times=1)
        self.assertEqual(self.send(), {})  # some 200 bytes: delivered, the cut unused
        self.assertEqual((len(self.outbox), cut.used), (1, 0))
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            self.send(message(("x" * 70 + "\n") * 100))
        self.assertEqual((len(self.outbox), cut.used), (1, 1))

    def test_a_message_whose_transaction_began_in_an_earlier_test_is_not_the_next_tests(self):
        for stage in ("rcpt", "data", None):  # a delay holds the test's end past it, or the client is slow
            with self.subTest(stage=stage):
                if stage is not None:
                    self.smtpd.delay(stage, 0.3)
                client = self.client()
                client.ehlo()
                client.mail("shop@example.org")
                if stage is None:
                    self.layer.testTearDown()
                    self.layer.testSetUp()
                    client.rcpt("bob@example.org")
                    client.data(b"Subject: from the test before\r\n\r\nhi\r\n")
                else:
                    client.putcmd("rcpt", "TO:<bob@example.org>")
                    if stage == "data":
                        self.assertEqual(client.getreply()[0], 250)
                        client.putcmd("data")
                    self.layer.testTearDown()  # the reply still to come; the client waits
                    self.layer.testSetUp()
                    self.assertEqual(client.getreply()[0], 250 if stage == "rcpt" else 354)
                    if stage == "rcpt":
                        client.putcmd("data")
                        self.assertEqual(client.getreply()[0], 354)
                    client.send(b"Subject: from the test before\r\n\r\nhi\r\n.\r\n")
                    self.assertEqual(client.getreply()[0], 250)
                client.quit()
                self.assertEqual(list(self.outbox), [])  # the next test's outbox
                self.send()
                [mine] = self.outbox
                self.assertEqual(mine["Subject"], "Your order")
                self.layer.testTearDown()
                self.layer.testSetUp()

    def test_the_null_sender_of_a_bounce_matches_at_every_stage(self):
        for stage in ("mail", "message"):
            with self.subTest(stage=stage):
                arrangement = self.smtpd.fail(stage, 554, match="<>")
                client = self.client()
                with self.assertRaises((smtplib.SMTPSenderRefused, smtplib.SMTPDataError)):
                    client.sendmail("<>", ["bob@example.org"], b"Subject: bounce\r\n\r\nreturned\r\n")
                client.quit()
                self.assertEqual(arrangement.used, 1)
                self.layer.testTearDown()
                self.layer.testSetUp()
        client = self.client()
        client.sendmail("<>", ["bob@example.org"], b"Subject: bounce\r\n\r\nreturned\r\n")
        client.quit()
        self.assertEqual(self.outbox[0].mail_from, "")  # as smtplib writes it, not "<>"

    def test_addresses_in_angle_brackets_match(self):
        self.smtpd.fail("mail", 553, match="<shop@example.org>")
        self.smtpd.refuse_recipients("<carol@example.org>")
        with self.assertRaises(smtplib.SMTPSenderRefused):
            self.send()
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            self.send(message(sender="other@example.org", to="carol@example.org"))

    def test_a_message_whose_reply_outlasts_its_test_is_not_the_next_tests(self):
        self.smtpd.delay("message", 0.3)
        client = self.client()
        client.ehlo()
        client.mail("shop@example.org")
        client.rcpt("bob@example.org")
        client.putcmd("data")
        self.assertEqual(client.getreply()[0], 354)
        client.send(b"Subject: from the test before\r\n\r\nhi\r\n.\r\n")
        self.layer.testTearDown()  # the reply still to come; the client waits
        self.layer.testSetUp()
        self.assertEqual(client.getreply()[0], 250)
        self.assertEqual(list(self.outbox), [])  # the next test's outbox
        self.send()
        [mine] = self.outbox
        self.assertEqual(mine["Subject"], "Your order")


class AiosmtplibStageTests(FailureTestCase):
    """The stages as aiosmtplib meets them: each failure raises what it should."""

    def send(self, mail=None, **kwargs):
        async def send():
            return await aiosmtplib.send(mail or message(), hostname=self.layer["smtp_host"],
                                         port=self.layer["smtp_port"], timeout=10, start_tls=False, **kwargs)

        return asyncio.run(send())

    def test_each_stage(self):
        for stage, code, error, times in [
            ("connect", 554, aiosmtplib.SMTPConnectResponseError, 1),
            ("helo", 550, aiosmtplib.SMTPHeloError, 2),  # refused EHLO, aiosmtplib tries HELO
            ("mail", 553, aiosmtplib.SMTPSenderRefused, 1),
            ("rcpt", 550, aiosmtplib.SMTPRecipientsRefused, 1),
            ("data", 451, aiosmtplib.SMTPDataError, 1),
            ("message", 554, aiosmtplib.SMTPDataError, 1),
        ]:
            with self.subTest(stage=stage):
                self.smtpd.fail(stage, code, times=times)
                with self.assertRaises(error) as raised:
                    self.send()
                codes = [each.code for each in getattr(raised.exception, "recipients", [raised.exception])]
                self.assertEqual(codes, [code])
        self.assertEqual(len(self.outbox), 0)
        self.send()  # every arrangement was used up
        self.assertEqual(len(self.outbox), 1)

    def test_a_dropped_connection(self):
        self.smtpd.drop("rcpt")
        with self.assertRaises(aiosmtplib.SMTPServerDisconnected):
            self.send()


LMTP_LAYER = smtp.Layer(name="LMTP_LAYER", lmtp=True)


class LMTPTests(unittest.TestCase):
    layer = LMTP_LAYER

    def conversation(self, *recipients: str) -> list[tuple[int, bytes]]:
        """One message to ``recipients`` over LMTP; the replies to it, one per recipient."""
        client = smtplib.LMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=10)
        self.addCleanup(client.close)
        client.ehlo_or_helo_if_needed()  # LHLO
        client.mail("shop@example.org")
        for recipient in recipients:
            self.assertEqual(client.rcpt(recipient)[0], 250)
        self.assertEqual(client.docmd("DATA")[0], 354)
        client.send(b"Subject: stored\r\n\r\nhi\r\n.\r\n")
        replies = [client.getreply() for _ in recipients]
        self.assertEqual(client.quit()[0], 221)
        return replies

    def test_the_greeting_says_lmtp(self):
        with socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=10) as raw:
            greeting = raw.recv(1000)
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        self.assertIn(b"serverlayer LMTP", greeting)

    def test_a_reply_per_recipient(self):
        self.layer["smtpd"].fail("message", 452, match="carol@example.org")
        replies = self.conversation("bob@example.org", "carol@example.org", "dave@example.org")
        self.assertEqual(replies, [
            (250, b"2.1.5 <bob@example.org> delivered"),
            (452, b"4.3.1 Insufficient system storage"),
            (250, b"2.1.5 <dave@example.org> delivered"),
        ])
        [stored] = self.layer["outbox"]
        self.assertEqual(stored.rcpt_tos, ["bob@example.org", "dave@example.org"])
        transcript = self.layer["smtpd"].transcripts[0]
        self.assertEqual(transcript.lines[-6:-2], [
            "C: <message, 23 bytes>",
            "S: 250 2.1.5 <bob@example.org> delivered",
            "S: 452 4.3.1 Insufficient system storage",
            "S: 250 2.1.5 <dave@example.org> delivered",
        ])
        self.assertEqual(transcript.refusals, [])  # arranged

    def test_every_recipient_failing_stores_nothing(self):
        self.layer["smtpd"].fail_data(451)
        replies = self.conversation("bob@example.org", "carol@example.org")
        self.assertEqual([code for code, _ in replies], [451, 451])
        self.assertEqual(len(self.layer["outbox"]), 0)

    def sending_to_two(self, layer) -> smtplib.LMTP:
        """An LMTP client that announced a message to bob and carol (354)."""
        client = smtplib.LMTP(layer["smtp_host"], layer["smtp_port"], timeout=10)
        self.addCleanup(client.close)
        client.ehlo_or_helo_if_needed()
        client.mail("shop@example.org")
        client.rcpt("bob@example.org")
        client.rcpt("carol@example.org")
        self.assertEqual(client.docmd("DATA")[0], 354)
        return client

    def test_a_message_too_large_gets_a_reply_per_recipient(self):
        layer = set_up_by_hand(self, smtp.Layer(name="LMTP_SIZE_LIMIT", lmtp=True, data_size_limit=1000))
        client = self.sending_to_two(layer)
        client.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 30 + b".\r\n")
        self.assertEqual([client.getreply()[0] for _ in range(2)], [552, 552])  # one each, as RFC 2033 has it
        self.assertEqual(client.noop()[0], 250)

    def test_a_421_for_any_recipient_closes_the_connection(self):
        self.layer["smtpd"].fail("message", 421, match="carol@example.org")
        client = self.sending_to_two(self.layer)
        client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        self.assertEqual([client.getreply()[0] for _ in range(2)], [250, 421])
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            client.noop()

    def test_a_cut_matching_a_recipient(self):
        # Over LMTP the message stage's match looks at each recipient; a cut
        # looked at the sender, so match= a recipient never cut anything.
        cut = self.layer["smtpd"].drop("message", after_bytes=10, match="carol@example.org")
        client = self.sending_to_two(self.layer)
        client.send(b"Subject: x\r\n\r\n" + b"y" * 100 + b"\r\n.\r\n")
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            client.getreply()
        self.assertEqual((cut.used, len(self.layer["outbox"])), (1, 0))
        self.assertEqual(self.layer["smtpd"].transcripts[0].lines[-1], "S: <connection closed>")
        # A message to others only is not cut.
        client = smtplib.LMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=10)
        self.addCleanup(client.close)
        refused = client.sendmail("shop@example.org", ["bob@example.org"], b"Subject: x\r\n\r\n" + b"y" * 100 + b"\r\n")
        self.assertEqual((refused, cut.used, len(self.layer["outbox"])), ({}, 1, 1))

    def test_after_a_message_whose_hook_raised_one_reply_per_command(self):
        def raising(subject: str) -> bool:
            raise ValueError("raised on purpose by a match function")

        self.layer["smtpd"].fail("message", 451, match=raising)
        client = self.sending_to_two(self.layer)
        client.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        self.assertEqual([client.getreply()[0] for _ in range(2)], [500, 500])
        client.send(b"NOOP\r\nQUIT\r\n")
        self.assertEqual([client.getreply()[0] for _ in range(2)], [250, 221])
        [error] = self.layer.server_errors.take()
        self.assertIn("raised on purpose by a match function", str(error))

    def test_lhlo_and_not_ehlo(self):
        client = smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=10)
        self.addCleanup(client.close)
        self.assertEqual(client.ehlo()[0], 500)
        self.assertEqual(client.docmd("LHLO", "client.example")[0], 250)
        self.assertRegex(self.layer["smtpd"].transcripts[0].refusals[0],
                         r'^EHLO \S+ -> 500 Error: command "EHLO" not recognized$')
