"""The SMTP layer, exercised with smtplib against the running server."""

from __future__ import annotations

import contextlib
import email.policy
import gc
import io
import mailbox
import os
import shutil
import smtplib
import socket
import tempfile
import threading
import time
import unittest
import warnings
from contextlib import redirect_stderr
from email.message import EmailMessage
from unittest import mock

from serverlayer import AddressInUseError, ConfigurationError, MailTimeoutError, smtp
from serverlayer.errors import ServerSideError
from serverlayer.tests.helpers import (
    failures_in_threads,
    open_descriptors,
    set_up_by_hand,
    stop_asked_again_as_the_serving_ends,
    stop_in_the_round_that_accepts,
)

MAIL_LAYER = smtp.Layer(name="MAIL_LAYER")


def make_message(subject="Hello", to="bob@example.com", sender="alice@example.com", body="Hi Bob"):
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    return message


class Client:
    """An smtplib connection to a layer's server, closed after the test."""

    @staticmethod
    def connect(test, layer, **kwargs):
        client = smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5, **kwargs)
        test.addCleanup(_quit, client)
        return client


def next_test(layer):
    """What the test runner calls between one test of ``layer`` and the next."""
    layer.testTearDown()
    layer.testSetUp()


def _quit(client):
    try:
        client.quit()
    except smtplib.SMTPServerDisconnected:
        client.close()


class ResourceTests(unittest.TestCase):
    layer = MAIL_LAYER

    def test_publishes_where_it_listens(self):
        port = self.layer["smtp_port"]
        self.assertEqual(self.layer["smtp_host"], "127.0.0.1")
        self.assertIsInstance(port, int)
        self.assertNotEqual(port, 0)
        self.assertEqual(self.layer["smtp_address"], f"127.0.0.1:{port}")
        self.assertIsInstance(self.layer["smtpd"], smtp.SMTPServer)
        self.assertIs(self.layer["outbox"], self.layer["smtpd"].outbox)
        for resource in ("ca_bundle", "ssl_context"):  # those of the TLS layers
            self.assertNotIn(resource, self.layer)

    def test_greets_as_an_esmtp_server_with_utf8_and_8bitmime(self):
        client = Client.connect(self, self.layer)
        code, _ = client.ehlo()
        self.assertEqual(code, 250)
        for extension in ("smtputf8", "8bitmime", "size"):
            self.assertTrue(client.has_extn(extension), extension)
        self.assertFalse(client.has_extn("auth"))
        self.assertEqual(client.esmtp_features["size"], str(32 * 1024 * 1024))  # aiosmtpd's default limit


class OutboxTests(unittest.TestCase):
    layer = MAIL_LAYER

    def test_message_carries_content_and_envelope(self):
        message = make_message(subject="Grüße", body="Hallo Bob ✓")
        message["Cc"] = "carol@example.com"
        message["Bcc"] = "hidden@example.com"
        message.add_attachment(b"\x89PNG...", maintype="image", subtype="png", filename="logo.png")
        Client.connect(self, self.layer).send_message(message)
        [received] = self.layer["outbox"]
        self.assertIsInstance(received, EmailMessage)
        self.assertEqual(received["Subject"], "Grüße")
        self.assertIsNone(received["Bcc"])
        self.assertEqual(received.get_body(("plain",)).get_content(), "Hallo Bob ✓\n")
        [attachment] = received.iter_attachments()
        self.assertEqual(attachment.get_filename(), "logo.png")
        self.assertEqual(attachment.get_content(), b"\x89PNG...")
        self.assertEqual(received.mail_from, "alice@example.com")
        # smtplib sends RCPT for To, then Bcc, then Cc.
        self.assertEqual(received.rcpt_tos, ["bob@example.com", "hidden@example.com", "carol@example.com"])
        self.assertTrue(any(option.startswith("SIZE=") for option in received.mail_options))
        self.assertIn(b"Subject: =?utf-8?", received.raw)
        self.assertIsNone(received.authenticated_as)

    def test_outbox_is_empty_at_the_start_of_each_test(self):
        Client.connect(self, self.layer).send_message(make_message(subject="earlier"))
        self.assertEqual([message["Subject"] for message in self.layer["outbox"]], ["earlier"])
        next_test(self.layer)
        self.assertEqual(len(self.layer["outbox"]), 0)
        self.assertEqual(list(self.layer["outbox"]), [])

    def test_messages_keep_arrival_order_and_options(self):
        client = Client.connect(self, self.layer)
        for number in range(3):
            client.sendmail("a@example.com", ["b@example.com"], make_message(subject=f"#{number}").as_bytes(),
                            mail_options=["BODY=7BIT"] if number == 2 else [])
        outbox = self.layer["outbox"]
        self.assertEqual([message["Subject"] for message in outbox], ["#0", "#1", "#2"])
        self.assertIn("BODY=7BIT", outbox[-1].mail_options)
        self.assertNotIn("BODY=7BIT", outbox[0].mail_options)
        self.assertEqual(outbox[-1].rcpt_options, [])
        self.assertEqual([message["Subject"] for message in outbox[1:]], ["#1", "#2"])

    def test_wait_for_mail_sent_from_another_thread(self):
        def send_later():
            time.sleep(0.05)  # the application under test taking its time
            with smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=5) as client:
                client.send_message(make_message(subject="late"))
                client.send_message(make_message(subject="later", to="eve@example.com"))

        sender = threading.Thread(target=send_later)
        sender.start()
        self.addCleanup(sender.join, 5)
        [first] = self.layer["outbox"].wait_for(1)
        self.assertEqual(first["Subject"], "late")
        [to_eve] = self.layer["outbox"].wait_for(match=lambda message: "eve@example.com" in message.rcpt_tos)
        self.assertEqual(to_eve["Subject"], "later")

    def test_wait_for_fails_listing_what_arrived(self):
        Client.connect(self, self.layer).send_message(make_message(subject="the only one"))
        started = time.monotonic()
        with self.assertRaises(MailTimeoutError) as caught:
            self.layer["outbox"].wait_for(2, timeout=0.2)
        self.assertLess(time.monotonic() - started, 2)
        message = str(caught.exception)
        self.assertIn("Waited 0.2 seconds for 2 message(s); 1 of them arrived, 1 message(s) in all:", message)
        self.assertIn("1. from alice@example.com to bob@example.com: 'the only one'", message)
        self.assertIsInstance(caught.exception, AssertionError)

    def test_wait_for_a_match_names_the_predicate(self):
        def addressed_to_mallory(message):
            return "mallory@example.com" in message.rcpt_tos

        with self.assertRaises(MailTimeoutError) as caught:
            self.layer["outbox"].wait_for(match=addressed_to_mallory, timeout=0.05)
        self.assertIn("matching addressed_to_mallory; 0 of them arrived, 0 message(s) in all.", str(caught.exception))

    def test_wait_for_refuses_what_it_cannot_wait_for_at_the_call(self):
        # match="bob@example.com", as smtpd.fail() takes it, waited the whole
        # timeout on an empty outbox and then said no message matched it,
        # or raised "'str' object is not callable" once one came; a count of
        # "2" raised a TypeError from inside the wait, one of 1.5 waited the
        # whole timeout for a count no outbox reaches.
        outbox = self.layer["outbox"]
        for arguments, says in [
            ({"match": "bob@example.com"}, "match='bob@example.com' must be a function"),
            ({"count": "2"}, "count='2' must be a whole number"),
            ({"count": 1.5}, "count=1.5 must be a whole number"),
            ({"count": -1}, "count=-1 must be a whole number"),
            ({"timeout": "5"}, "timeout='5': wait_for() waits that many seconds"),
            ({"timeout": -1}, "timeout=-1: wait_for() waits that many seconds"),
        ]:
            with self.subTest(**arguments):
                started = time.monotonic()
                with self.assertRaises(ConfigurationError) as caught:
                    outbox.wait_for(**{"timeout": 0.5, **arguments})
                self.assertIn(says, str(caught.exception))
                self.assertLess(time.monotonic() - started, 0.4)  # at the call, not after waiting
        Client.connect(self, self.layer).send_message(make_message(subject="one"))
        with self.assertRaises(ConfigurationError):
            outbox.wait_for(match="bob@example.com")
        self.assertEqual(outbox.wait_for(0, timeout=0), [])


class ProtocolTests(unittest.TestCase):
    layer = MAIL_LAYER

    def test_utf8_addresses(self):
        message = make_message(sender="jörg@exämple.com", to="zoë@exämple.com")
        Client.connect(self, self.layer).send_message(message)
        [received] = self.layer["outbox"]
        self.assertEqual(received.mail_from, "jörg@exämple.com")
        self.assertEqual(received.rcpt_tos, ["zoë@exämple.com"])
        self.assertIn("SMTPUTF8", received.mail_options)

    def test_8bit_body(self):
        raw = "From: a@example.com\r\nTo: b@example.com\r\nSubject: 8bit\r\n" \
              "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nÄpfel\r\n"
        Client.connect(self, self.layer).sendmail(
            "a@example.com", ["b@example.com"], raw.encode(), mail_options=["BODY=8BITMIME"]
        )
        [received] = self.layer["outbox"]
        self.assertIn("BODY=8BITMIME", received.mail_options)
        self.assertEqual(received.get_content(), "Äpfel\n")
        self.assertIn("Äpfel".encode(), received.raw)

    def test_bad_commands_get_errors_and_the_server_keeps_serving(self):
        with socket.create_connection((self.layer["smtp_host"], self.layer["smtp_port"]), timeout=5) as sock, \
                sock.makefile("rb") as replies:
            self.assertTrue(replies.readline().startswith(b"220 "))
            for command, expected in (
                (b"FROBNICATE\r\n", b"500 "),
                (b"HELO client.example.com\r\n", b"250 "),
                (b"MAIL TO:<a@example.com>\r\n", b"501 "),
                (b"RCPT TO:<b@example.com>\r\n", b"503 "),
                (b"DATA\r\n", b"503 "),
                (b"HELO " + b"x" * 2000 + b"\r\n", b"500 "),
                (b"NOOP\r\n", b"250 "),
            ):
                sock.sendall(command)
                reply = replies.readline()
                self.assertTrue(reply.startswith(expected), (command[:20], reply))
        Client.connect(self, self.layer).send_message(make_message())
        self.assertEqual(len(self.layer["outbox"]), 1)


#: MAIL and RCPT arguments: plain addresses the server reads itself, and
#: near misses it must leave to aiosmtpd's parser.
ADDRESS_ARGUMENTS = (
    "<bob@example.com>", "<bob@example.com> SIZE=123", "<bob@example.com> SIZE=1 BODY=8BITMIME",
    "<Bob.O'Neil+tag=1@Mail-1.Example.COM>", "<a@b>", "<a!#$%&'*/=?^_`{|}~-@x>",
    "<bob@example.com>  SIZE=1", "<bob@example.com> SIZE=1\nX", "<bob@example.com>\tSIZE=1",
    "<bob@example.com> (comment) SIZE=1", "<bob@example.com> ", "<bob@example.com>SIZE=1",
    "<bob@example.com> \u00a0SIZE=1", "<bob@example.com>>",
    "<bob.@example.com>", "<.bob@example.com>", "<b..ob@example.com>", "<.@x>", "<bob@example..com>",
    "<bob@example.com.>", "<bob@.example.com>", "<bob@>", "<@example.com>", "<bob@under_score!.example>",
    "<bob@[127.0.0.1]>", '<"bob smith"@example.com>', "<bob@exämple.com>", "<jörg@example.com>", "<>", "<bob>",
    "<@relay.example:bob@example.com>", "bob@example.com", "<bob@example.com", "< bob@example.com>",
    "<bob@example.com >", "<bob @example.com>",
)


class LineLengthTests(unittest.TestCase):
    layer = MAIL_LAYER

    def test_a_line_is_at_most_1000_bytes_with_its_crlf_and_a_doubled_dot(self):
        # RFC 5321 section 4.5.3.1.6: 998 characters and CRLF, not counting a
        # leading dot doubled for transparency (smtplib doubles it).
        for text, accepted in ((b"z" * 998, True), (b"." + b"z" * 997, True), (b"z" * 1000, False)):
            with self.subTest(length=len(text), dot=text.startswith(b".")):
                client = Client.connect(self, self.layer)
                message = b"Subject: long\r\n\r\n" + text + b"\r\n"
                if accepted:
                    self.assertEqual(client.sendmail("a@example.org", ["b@example.org"], message), {})
                else:
                    with self.assertRaises(smtplib.SMTPDataError) as refused:
                        client.sendmail("a@example.org", ["b@example.org"], message)
                    self.assertEqual(refused.exception.smtp_code, 500)
                    self.assertIn(b"Line too long", refused.exception.smtp_error)
        self.assertEqual([message.get_payload().rstrip("\r\n") for message in self.layer["outbox"]],
                         ["z" * 998, "." + "z" * 997])


class AddressTests(unittest.TestCase):
    """Our connection reads the plain ``<local@domain>`` of MAIL and RCPT
    itself, without aiosmtpd's costly header parser; to the same result."""

    layer = MAIL_LAYER

    def test_every_argument_reads_as_aiosmtpd_reads_it(self):
        from aiosmtpd.smtp import SMTP

        connection = smtp._Connection(
            smtp._Handler(smtp.Outbox(), None, None, False, None),
            transports=set(), arrangements=None, transcripts=[], loop=mock.Mock(),
        )
        for argument in ADDRESS_ARGUMENTS:
            with self.subTest(argument=argument):
                self.assertEqual(connection._getaddr(argument), SMTP._getaddr(connection, argument))

    def test_plain_addresses_skip_the_header_parser(self):
        import aiosmtpd.smtp

        with mock.patch.object(aiosmtpd.smtp, "get_angle_addr", wraps=aiosmtpd.smtp.get_angle_addr) as parser:
            client = Client.connect(self, self.layer)
            client.sendmail("alice@example.com", ["bob@example.com", "Carol.Jones+x@Example.org"], b"Hi")
            self.assertEqual(parser.call_count, 0)
            client.sendmail('"alice smith"@example.com', ["bob@example.com"], b"Hi")
            self.assertEqual(parser.call_count, 1)
        first, second = self.layer["outbox"]
        self.assertEqual(first.mail_from, "alice@example.com")
        self.assertEqual(first.rcpt_tos, ["bob@example.com", "Carol.Jones+x@Example.org"])
        self.assertEqual(first.mail_options, ["SIZE=2"])
        self.assertEqual(second.mail_from, '"alice smith"@example.com')


class RefusalTests(unittest.TestCase):
    layer = MAIL_LAYER

    def test_refused_recipient_gets_550_and_others_still_get_mail(self):
        self.layer["smtpd"].refuse_recipients("Nobody@Example.com")
        refused = Client.connect(self, self.layer).sendmail(
            "a@example.com", ["nobody@example.com", "bob@example.com"], make_message().as_bytes()
        )
        self.assertEqual(refused["nobody@example.com"][0], 550)
        [received] = self.layer["outbox"]
        self.assertEqual(received.rcpt_tos, ["bob@example.com"])

    def test_refusing_every_recipient_refuses_the_message(self):
        self.layer["smtpd"].refuse_recipients("bob@example.com")
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            Client.connect(self, self.layer).send_message(make_message())
        self.assertEqual(len(self.layer["outbox"]), 0)

    def test_refusals_end_with_the_test(self):
        self.layer["smtpd"].refuse_recipients("bob@example.com")
        next_test(self.layer)
        Client.connect(self, self.layer).send_message(make_message())
        self.assertEqual(len(self.layer["outbox"]), 1)

    def test_temporary_failure_of_data(self):
        self.layer["smtpd"].fail_data(451)
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            Client.connect(self, self.layer).send_message(make_message())
        self.assertEqual(caught.exception.smtp_code, 451)
        self.assertEqual(len(self.layer["outbox"]), 0)

    def test_permanent_failure_of_data(self):
        self.layer["smtpd"].fail_data(554, "5.7.1 Spam detected")
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            Client.connect(self, self.layer).send_message(make_message())
        self.assertEqual((caught.exception.smtp_code, caught.exception.smtp_error), (554, b"5.7.1 Spam detected"))

    def test_failures_end_with_the_test(self):
        self.layer["smtpd"].fail_data(554)
        next_test(self.layer)
        Client.connect(self, self.layer).send_message(make_message())
        self.assertEqual(len(self.layer["outbox"]), 1)

    def test_fail_data_needs_an_error_code(self):
        for code in (250, 399, 600):
            with self.subTest(code=code), self.assertRaises(ConfigurationError) as caught:
                self.layer["smtpd"].fail_data(code)
            self.assertIn(f"fail_data({code}): use an SMTP error code from 400 to 599", str(caught.exception))

    def test_fail_data_needs_a_whole_number(self):
        # fail_data(451.5) went out as "451.5 4.3.0 ...", which smtplib read
        # as 451 with the text "5 4.3.0 ..."; fail_data("451") raised
        # TypeError from inside the check. fail() refuses both.
        for code in (451.5, "451", None):
            with self.subTest(code=code), self.assertRaises(ConfigurationError) as caught:
                self.layer["smtpd"].fail_data(code)
            self.assertIn(f"fail_data({code!r}): use an SMTP error code from 400 to 599", str(caught.exception))
        with self.assertRaises(ConfigurationError) as caught:
            self.layer["smtpd"].fail_data(554, b"5.7.1 Spam")
        self.assertIn("the text of a reply is a str", str(caught.exception))

    def test_refuse_recipients_takes_each_address_as_an_argument(self):
        # A list raised AttributeError: 'list' object has no attribute 'strip'.
        for addresses in ((["bob@example.com", "carol@example.com"],), (None,), (b"bob@example.com",)):
            with self.subTest(addresses=addresses), self.assertRaises(ConfigurationError) as caught:
                self.layer["smtpd"].refuse_recipients(*addresses)
            self.assertIn("refuse_recipients(): each address is a str of its own", str(caught.exception))
            self.assertIn("refuse_recipients(*addresses)", str(caught.exception))

    def test_fail_data_by_default_and_at_the_edges(self):
        """With no code a temporary failure (451); the text says whether
        to try again, from the code's first digit."""
        for arguments, reply in (
            ((), (451, b"4.3.0 Temporary failure, try again later")),
            ((400,), (400, b"4.3.0 Temporary failure, try again later")),
            ((499,), (499, b"4.3.0 Temporary failure, try again later")),
            ((500,), (500, b"5.3.0 Message refused")),
            ((599,), (599, b"5.3.0 Message refused")),
        ):
            with self.subTest(arguments=arguments):
                self.layer["smtpd"].fail_data(*arguments)
                with self.assertRaises(smtplib.SMTPDataError) as caught:
                    Client.connect(self, self.layer).send_message(make_message())
                self.assertEqual((caught.exception.smtp_code, caught.exception.smtp_error), reply)
        self.assertEqual(len(self.layer["outbox"]), 0)


class SizeLimitTests(unittest.TestCase):

    def setUp(self):
        self.layer = set_up_by_hand(self, smtp.Layer(name="SIZE_LIMIT", data_size_limit=1000))

    def test_declared_size_over_the_limit_is_refused_at_mail(self):
        with self.assertRaises(smtplib.SMTPSenderRefused) as caught:
            Client.connect(self, self.layer).send_message(make_message(body="x" * 2000))
        self.assertEqual(caught.exception.smtp_code, 552)

    def test_undeclared_data_over_the_limit_is_refused_at_data(self):
        client = Client.connect(self, self.layer)
        client.helo()  # plain SMTP: no SIZE declared
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        code, reply = client.data(make_message(body="many short lines\n" * 100).as_bytes(policy=email.policy.SMTP))
        self.assertEqual((code, reply), (552, b"Error: Too much mail data"))
        self.assertEqual(len(self.layer["outbox"]), 0)
        client.rset()
        client.sendmail("a@example.com", ["b@example.com"], make_message(body="small").as_bytes())
        self.assertEqual(len(self.layer["outbox"]), 1)

    def test_limit_must_be_positive(self):
        with self.assertRaises(ConfigurationError):
            smtp.Layer(name="BAD_LIMIT", data_size_limit=0)

    def test_limit_is_no_flag(self):
        # data_size_limit=True (as if it switched a limit on) was taken as
        # a limit of 1 byte: every message was refused with 552.
        with self.assertRaises(ConfigurationError) as caught:
            smtp.Layer(name="FLAG_LIMIT", data_size_limit=True)
        self.assertIn("data_size_limit=True must be a number of bytes", str(caught.exception))

    def test_the_smallest_limit_is_one_byte(self):
        layer = set_up_by_hand(self, smtp.Layer(name="ONE_BYTE_LIMIT", data_size_limit=1))
        client = Client.connect(self, layer)
        client.ehlo()
        self.assertEqual(client.esmtp_features["size"], "1")


class AuthTests(unittest.TestCase):

    def serve(self, **kwargs):
        return set_up_by_hand(self, smtp.Layer(name=f"auth_{self._testMethodName}", **kwargs))

    def test_plain_and_login_with_a_mapping(self):
        layer = self.serve(auth={"alice": "s3cret"})
        for mechanism in ("PLAIN", "LOGIN"):
            with self.subTest(mechanism=mechanism):
                client = Client.connect(self, layer)
                client.ehlo()
                self.assertEqual(sorted(client.esmtp_features["auth"].split()), ["LOGIN", "PLAIN"])  # no others
                client.user, client.password = "alice", "s3cret"
                code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
                self.assertEqual(code, 235)
                client.send_message(make_message(subject=mechanism))
        self.assertEqual([message.authenticated_as for message in layer["outbox"]], ["alice", "alice"])

    def test_wrong_password_is_refused(self):
        layer = self.serve(auth={"alice": "s3cret"})
        # One before the right password in sort order, one after, and an unknown user.
        for user, password in (("alice", "guess"), ("alice", "t0p"), ("mallory", "s3cret")):
            with self.subTest(user=user, password=password):
                with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                    Client.connect(self, layer).login(user, password)
                self.assertEqual(caught.exception.smtp_code, 535)

    def test_check_function(self):
        seen = []

        def check(username, password):
            seen.append((username, password))
            return password == username[::-1]

        layer = self.serve(auth=check)
        Client.connect(self, layer).login("bob", "bob")
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            Client.connect(self, layer).login("carol", "carol")
        # smtplib tries every mechanism the server offers before giving up.
        self.assertEqual(set(seen), {("bob", "bob"), ("carol", "carol")})

    def test_auth_required_refuses_mail_before_auth(self):
        layer = self.serve(auth={"alice": "s3cret"}, auth_required=True)
        with self.assertRaises(smtplib.SMTPSenderRefused) as caught:
            Client.connect(self, layer).send_message(make_message())
        self.assertEqual(caught.exception.smtp_code, 530)
        client = Client.connect(self, layer)
        client.login("alice", "s3cret")
        client.send_message(make_message())
        self.assertEqual(len(layer["outbox"]), 1)

    def test_a_raising_check_is_a_server_error_and_the_server_keeps_serving(self):
        def check(username, password):
            raise LookupError("user database is down")

        layer = self.serve(auth=check)
        with self.assertRaises(smtplib.SMTPException):
            Client.connect(self, layer).login("alice", "x")
        errors = layer.server_errors.take()
        self.assertTrue(errors)
        for error in errors:  # one per mechanism smtplib tried
            self.assertIn("LookupError: user database is down", error)
        self.assertEqual(Client.connect(self, layer).noop()[0], 250)

    def test_a_check_holding_the_loop_past_stop_timeout_fails_tear_down_and_leaves_nothing_open(self):
        # A check function runs on the server's event loop; one that blocks
        # (a slow directory lookup) at tearDown kept the loop from stopping.
        # tearDown returned after stop_timeout as if all went well, with the
        # server's thread left running, and once the check returned, the
        # thread's shutdown failed on the listening socket tearDown had
        # closed: the loop and the connection were never closed
        # (ResourceWarnings when collected).
        entered, release = threading.Event(), threading.Event()

        def check(username, password):
            entered.set()
            release.wait(10)  # synchronous: nothing else runs on the loop meanwhile
            return True

        layer = smtp.Layer(name="AUTH_HOLDS_THE_LOOP", auth=check, stop_timeout=0.2)
        layer.setUp()
        server = layer["smtpd"]

        def log_in():
            with contextlib.suppress(smtplib.SMTPException, OSError):
                with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=10) as client:
                    client.login("alice", "s3cret")

        client = threading.Thread(target=log_in)
        client.start()
        self.addCleanup(client.join, 10)
        self.addCleanup(release.set)  # first: cleanups run last added first
        self.assertTrue(entered.wait(5))
        thread = next(each for each in threading.enumerate() if each.ident == server.thread_id)
        with self.assertRaises(ServerSideError) as caught:
            layer.tearDown()
        message = str(caught.exception)
        self.assertIn("the server's event loop did not stop within the layer's stop_timeout (0.2 seconds)", message)
        self.assertIn("in check\n    release.wait(10)", message)  # where the loop's thread is
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always", ResourceWarning)
            release.set()
            thread.join(10)
            client.join(10)
            gc.collect()
        self.assertFalse(thread.is_alive())
        self.assertTrue(server.loop.is_closed())
        self.assertEqual([str(warning.message) for warning in warned], [])

    def test_bad_settings(self):
        with self.assertRaises(ConfigurationError):
            smtp.Layer(name="AUTH_NO_CREDENTIALS", auth_required=True)
        with self.assertRaises(ConfigurationError):
            smtp.Layer(name="AUTH_WRONG_TYPE", auth="alice:s3cret")


    def test_credentials_are_text(self):
        # {"alice": 1234} was taken, and no login could ever match it: a
        # client sends the password as text, "1234", never equal to 1234.
        for auth in ({"alice": 1234}, {"alice": b"s3cret"}, {1: "s3cret"}):
            with self.subTest(auth=auth), self.assertRaises(ConfigurationError) as caught:
                smtp.Layer(name="AUTH_NOT_TEXT", auth=auth)
            self.assertIn("a user name and its password are each a str", str(caught.exception))


class ConcurrencyTests(unittest.TestCase):
    layer = MAIL_LAYER

    def test_ten_threads_sending_a_hundred_messages_each_lose_nothing(self):
        def send(sender_number):
            with smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=10) as client:
                for number in range(100):
                    client.send_message(make_message(subject=f"{sender_number}-{number}"))

        self.assertEqual(failures_in_threads(send, 10), [])
        subjects = [message["Subject"] for message in self.layer["outbox"].wait_for(1000, timeout=10)]
        self.assertEqual(sorted(subjects), sorted(f"{s}-{n}" for s in range(10) for n in range(100)))
        for sender_number in range(10):  # each sender's messages arrive in the order sent
            own = [subject for subject in subjects if subject.startswith(f"{sender_number}-")]
            self.assertEqual(own, [f"{sender_number}-{n}" for n in range(100)])


class StartTLSTests(unittest.TestCase):

    def test_a_second_starttls_is_refused(self):
        # RFC 3207: none once TLS is active. aiosmtpd answered 220 and
        # started TLS inside TLS, which failed in asyncio (a server error).
        layer = set_up_by_hand(self, smtp.Layer(name="STARTTLS_TWICE", starttls=True))
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
            client.starttls(context=layer["ssl_context"])
            self.assertEqual(client.docmd("STARTTLS"), (503, b"5.5.1 Error: TLS already active"))
            self.assertEqual(client.noop()[0], 250)  # the conversation goes on, encrypted
            client.sendmail("shop@example.org", ["bob@example.org"], b"Subject: x\r\n\r\nhi\r\n")
        self.assertEqual(len(layer["outbox"]), 1)

    def test_help_tells_of_starttls(self):
        layer = set_up_by_hand(self, smtp.Layer(name="STARTTLS_HELP", starttls=True))
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
            client.ehlo()
            self.assertIn(b"STARTTLS", client.help())
            self.assertEqual(client.help("STARTTLS"), b"Syntax: STARTTLS")


class LifecycleTests(unittest.TestCase):

    def test_forgets_connections_that_ended(self):
        """The server keeps each connection to close it when it stops; a
        long run must not pile up those of clients that left, over plain
        SMTP or after STARTTLS."""
        layers = {"plain": smtp.Layer(name="FORGETS"), "starttls": smtp.Layer(name="FORGETS_TLS", starttls=True)}
        for kind, layer in layers.items():
            with self.subTest(kind=kind):
                set_up_by_hand(self, layer)
                for _ in range(3):
                    with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
                        if kind == "starttls":
                            client.starttls(context=layer["ssl_context"])
                        client.noop()
                transports = layer["smtpd"].transports
                deadline = time.monotonic() + 5
                while transports and time.monotonic() < deadline:
                    time.sleep(0.01)  # the server learns of each close in its own time
                self.assertEqual(len(transports), 0)

    def test_maildir_gets_a_copy_of_every_message(self):
        directory = tempfile.mkdtemp(prefix="serverlayer-maildir-")
        self.addCleanup(shutil.rmtree, directory)
        layer = set_up_by_hand(self, smtp.Layer(name="MAILDIR", maildir=os.path.join(directory, "mail")))
        client = Client.connect(self, layer)
        client.send_message(make_message(subject="first"))
        client.send_message(make_message(subject="second"))
        layer.tearDown()  # the copies outlast the layer
        stored = mailbox.Maildir(os.path.join(directory, "mail"), create=False)
        self.assertEqual(sorted(message["Subject"] for message in stored), ["first", "second"])

    def test_maildir_may_be_an_existing_empty_directory(self):
        directory = tempfile.mkdtemp(prefix="serverlayer-maildir-")
        self.addCleanup(shutil.rmtree, directory)
        layer = set_up_by_hand(self, smtp.Layer(name="MAILDIR_EXISTING", maildir=directory))
        Client.connect(self, layer).send_message(make_message(subject="kept"))
        layer.tearDown()
        self.assertEqual([message["Subject"] for message in mailbox.Maildir(directory)], ["kept"])

    def test_a_maildir_that_cannot_be_one_fails_set_up_and_leaves_nothing_open(self):
        directory = tempfile.mkdtemp(prefix="serverlayer-maildir-")
        self.addCleanup(shutil.rmtree, directory)
        a_file = os.path.join(directory, "a-file")
        with open(a_file, "w"):
            pass
        layer = smtp.Layer(name="MAILDIR_A_FILE", maildir=a_file)
        before = open_descriptors()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with self.assertRaises(ConfigurationError) as refused:
                layer.setUp()
            gc.collect()
        self.assertIn(f"MAILDIR_A_FILE>: maildir={a_file!r} cannot hold mail", str(refused.exception))
        self.assertEqual([str(warning.message) for warning in caught], [])  # no socket or loop left open
        self.assertEqual(open_descriptors(), before)

    def test_maildir_of_an_earlier_run_keeps_its_messages(self):
        directory = tempfile.mkdtemp(prefix="serverlayer-maildir-")
        self.addCleanup(shutil.rmtree, directory)
        for number, subject in enumerate(("earlier run", "this run")):
            layer = set_up_by_hand(self, smtp.Layer(name=f"MAILDIR_AGAIN_{number}", maildir=directory))
            Client.connect(self, layer).send_message(make_message(subject=subject))
            layer.tearDown()
        stored = sorted(message["Subject"] for message in mailbox.Maildir(directory, create=False))
        self.assertEqual(stored, ["earlier run", "this run"])

    def test_busy_fixed_port_fails_at_once(self):
        with socket.socket() as occupier:
            occupier.bind(("127.0.0.1", 0))
            occupier.listen()
            layer = smtp.Layer(name="BUSY_SMTP", port=occupier.getsockname()[1])
            started = time.monotonic()
            with self.assertRaises(AddressInUseError) as caught:
                layer.setUp()
            self.assertLess(time.monotonic() - started, 1)
            self.assertIn(f"127.0.0.1:{occupier.getsockname()[1]}", str(caught.exception))
        self.assertIn("port from port=", str(caught.exception))
        self.assertEqual(layer._resources, {})

    def test_host_from_environment(self):
        with mock.patch.dict(os.environ, {"SERVERLAYER_SMTP_HOST": "::1"}):
            layer = set_up_by_hand(self, smtp.Layer(name="SMTP_IPV6"))
        self.assertEqual(layer["smtp_address"], f"[::1]:{layer['smtp_port']}")
        with smtplib.SMTP("::1", layer["smtp_port"], timeout=5) as client:
            client.send_message(make_message())
        self.assertEqual(len(layer["outbox"]), 1)

    def test_stop_is_fast_with_clients_connected_and_removes_resources(self):
        layer = set_up_by_hand(self, smtp.Layer(name="STOP_WITH_CLIENTS"))
        idle = Client.connect(self, layer)
        idle.ehlo()
        mid_data = socket.create_connection((layer["smtp_host"], layer["smtp_port"]), timeout=5)
        self.addCleanup(mid_data.close)
        mid_data.sendall(b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: half")
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(layer._resources, {})

    def test_connections_accepted_in_the_loops_last_round_are_closed(self):
        layer = smtp.Layer(name="STOP_LAST_ROUND")
        layer.setUp()
        stop_in_the_round_that_accepts(self, layer, (layer["smtp_host"], layer["smtp_port"]))

    def test_a_stop_asked_again_once_the_serving_ended_leaves_nothing_open(self):
        layer = smtp.Layer(name="STOP_TWICE")
        layer.setUp()
        stop_asked_again_as_the_serving_ends(self, layer)

    def test_stop_closes_every_connection_itself(self):
        """Each connection is closed by the server as it stops, not left
        for the garbage collector (which would warn): idle, inside a
        message, and after STARTTLS."""
        layer = smtp.Layer(name="STOP_CLOSES", starttls=True)
        layer.setUp()
        try:
            idle = Client.connect(self, layer)
            idle.ehlo()
            secured = Client.connect(self, layer)
            secured.starttls(context=layer["ssl_context"])
            secured.ehlo()
            mid_data = socket.create_connection((layer["smtp_host"], layer["smtp_port"]), timeout=5)
            self.addCleanup(mid_data.close)
            mid_data.sendall(b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            replies = b""
            while not replies.rstrip().endswith(b"End data with <CR><LF>.<CR><LF>"):  # until it reads the message
                replies += mid_data.recv(4096) or self.fail(f"the server closed the connection after {replies!r}")
            mid_data.sendall(b"Subject: half")
        finally:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                layer.tearDown()
                gc.collect()  # a connection left for the collector would warn now
        self.assertEqual([str(warning.message) for warning in caught], [])
        self.assertEqual(mid_data.recv(4096), b"")

    def test_quiet_by_default(self):
        stderr = io.StringIO()
        with redirect_stderr(stderr), mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            layer = set_up_by_hand(self, smtp.Layer(name="QUIET_SMTP"))
            with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
                client.send_message(make_message())
                self.assertEqual(client.docmd("BOGUS")[0], 500)
            layer.check_server_errors()
            layer.tearDown()  # and what stopping prints, if anything
        self.assertEqual(stderr.getvalue(), "")

    def test_quiet_under_a_root_logger_at_info(self):
        # pytest's log_cli, or an application's logging.basicConfig(level=INFO).
        import logging

        class Collect(logging.Handler):
            def __init__(self):
                super().__init__(logging.DEBUG)
                self.records = []

            def emit(self, record):
                self.records.append(record)

        root, collect = logging.getLogger(), Collect()
        level = root.level
        root.addHandler(collect)
        root.setLevel(logging.INFO)
        self.addCleanup(root.setLevel, level)
        self.addCleanup(root.removeHandler, collect)
        with mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            layer = set_up_by_hand(self, smtp.Layer(name="QUIET_UNDER_INFO"))
            with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
                client.send_message(make_message())
            layer.tearDown()
        self.assertEqual([record.getMessage() for record in collect.records if record.name == "mail.log"], [])

    def test_smtp_server_is_a_ready_layer(self):
        layer = set_up_by_hand(self, smtp.SMTP_SERVER)
        Client.connect(self, layer).send_message(make_message(subject="to the ready layer"))
        self.assertEqual([message["Subject"] for message in layer["outbox"]], ["to the ready layer"])
        self.assertEqual((layer.__module__, layer.__name__), ("serverlayer.smtp", "SMTP_SERVER"))
