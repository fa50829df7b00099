"""Several server layers, for ``zope-testrunner -j 4``; run by test_integrations.

Each test notes its process and its servers' ports in the directory named
by $SERVERLAYER_PARALLEL_RECORD.
"""

import os
import smtplib
import unittest
import urllib.request

import plone.testing

from serverlayer import content, custom, smtp, static, wsgi


def app(environ, start_response):
    start_response("200 OK", [])
    return [b"wsgi"]


class Handler(custom.RequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"custom")


WSGI = wsgi.Layer(app, name="WSGI")
CUSTOM = custom.Layer(Handler, name="CUSTOM")
STATIC = static.Layer(name="STATIC")
MAIL = smtp.Layer(name="MAIL")
CONTENT = content.Layer(name="CONTENT")
MAIL_AND_HTTP = plone.testing.Layer(bases=(MAIL, WSGI), name="MAIL_AND_HTTP")


def note(*ports):
    path = os.path.join(os.environ["SERVERLAYER_PARALLEL_RECORD"], f"{os.getpid()}-{ports[0]}")
    with open(path, "w") as record:
        record.write(" ".join(str(port) for port in ports))


def get(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


class WSGITests(unittest.TestCase):
    layer = WSGI

    def test_serves(self):
        self.assertEqual(get(self.layer["http_url"]), b"wsgi")
        note(self.layer["http_port"])


class CustomTests(unittest.TestCase):
    layer = CUSTOM

    def test_serves(self):
        self.assertEqual(get(self.layer["http_url"]), b"custom")
        note(self.layer["http_port"])


class StaticTests(unittest.TestCase):
    layer = STATIC

    def test_serves(self):
        with open(os.path.join(self.layer["documentroot"], "f"), "wb") as file:
            file.write(b"static")
        self.assertEqual(get(self.layer["http_url"] + "f"), b"static")
        note(self.layer["http_port"])


class ContentTests(unittest.TestCase):
    layer = CONTENT

    def test_serves(self):
        self.layer["http_content"].serve_content("content")
        self.assertEqual(get(self.layer["http_url"]), b"content")
        note(self.layer["http_port"])


class StackTests(unittest.TestCase):
    layer = MAIL_AND_HTTP

    def test_both_servers(self):
        with smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=5) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: parallel\r\n\r\nx\r\n")
        self.assertEqual(len(self.layer["outbox"]), 1)
        self.assertEqual(get(self.layer["http_url"]), b"wsgi")
        note(self.layer["smtp_port"], self.layer["http_port"])
