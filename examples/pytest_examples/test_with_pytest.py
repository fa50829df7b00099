"""serverlayer's layers under pytest, through zope.pytestlayer.

Run with ``pytest examples/pytest_examples``. zope.pytestlayer sets a
layer up once for the ``unittest.TestCase`` classes that use it, as
zope.testrunner does, and resets it before each of their tests. A plain
test function's fixture sets the layer up and tears it down around that
one function (a millisecond or two for serverlayer's layers).
"""

import smtplib
import unittest
import urllib.error
import urllib.request

from zope.pytestlayer import fixture

from serverlayer import content, smtp, wsgi


def hello_app(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from pytest"]


HTTP_LAYER = wsgi.Layer(hello_app, name="HTTP_LAYER")
MAIL_LAYER = smtp.Layer(name="MAIL_LAYER")
API_LAYER = content.Layer(name="API_LAYER")

# Fixtures for plain test functions: each yields the layer, set up.
globals().update(fixture.create(HTTP_LAYER, function_fixture_name="http_layer"))
globals().update(fixture.create(MAIL_LAYER, function_fixture_name="mail_layer"))
globals().update(fixture.create(API_LAYER, function_fixture_name="api_layer"))


class HelloTests(unittest.TestCase):
    """A unittest.TestCase with ``layer``, as under zope.testrunner."""

    layer = HTTP_LAYER

    def test_greets(self):
        with urllib.request.urlopen(self.layer["http_url"]) as response:
            self.assertEqual(response.read(), b"hello from pytest")

    def test_requests_are_recorded_per_test(self):
        self.assertEqual(len(self.layer["http_requests"]), 0)
        urllib.request.urlopen(self.layer["http_url"] + "again").close()
        self.assertEqual(self.layer["http_requests"][0].path, "/again")

    def test_expected_server_error_is_taken(self):
        with self.assertRaises(urllib.error.HTTPError):
            urllib.request.urlopen(self.layer["http_url"] + "boom")
        [error] = self.layer.server_errors.take()
        self.assertIn("RuntimeError: boom", error)


def test_plain_function_gets_the_layer(http_layer):
    with urllib.request.urlopen(http_layer["http_url"]) as response:
        assert response.read() == b"hello from pytest"


def test_outbox_starts_empty_and_receives(mail_layer):
    assert len(mail_layer["outbox"]) == 0
    with smtplib.SMTP(mail_layer["smtp_host"], mail_layer["smtp_port"]) as client:
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: from pytest\r\n\r\nhi\r\n")
    [message] = mail_layer["outbox"].wait_for(1)
    assert message["Subject"] == "from pytest"


class MailTests(unittest.TestCase):
    """One set-up of the layer for the class; the outbox emptied before each test."""

    layer = MAIL_LAYER

    def send(self, subject):
        with smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], f"Subject: {subject}\r\n\r\nhi\r\n".encode())

    def test_1_receives(self):
        self.send("first")
        self.assertEqual([message["Subject"] for message in self.layer["outbox"].wait_for(1)], ["first"])

    def test_2_the_outbox_is_empty_again(self):
        self.assertEqual(len(self.layer["outbox"]), 0)  # the same server: its outbox was emptied
        self.send("second")
        self.assertEqual([message["Subject"] for message in self.layer["outbox"].wait_for(1)], ["second"])


def test_content_layer_expectation(api_layer):
    api_layer["http_content"].expect("/status").respond_json({"ok": True})
    with urllib.request.urlopen(api_layer["http_url"] + "status") as response:
        assert response.read() == b'{"ok": true}'
