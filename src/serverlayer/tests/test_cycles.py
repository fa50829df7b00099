"""Many set-up/tear-down cycles leave no thread and no file descriptor behind."""

from __future__ import annotations

import smtplib
import unittest
import urllib.request

from serverlayer import custom, smtp, static, wsgi
from serverlayer.tests.helpers import open_descriptors, thread_names

CYCLES = 200


def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


class Handler(custom.RequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


class CycleTests(unittest.TestCase):

    def cycle(self, layer, make_request):
        threads, descriptors = thread_names(), open_descriptors()
        for number in range(CYCLES):
            layer.setUp()
            try:
                if number % 20 == 0:  # a test of the layer, as the runner runs it
                    layer.testSetUp()
                    self.assertEqual(make_request(layer), b"ok")
                    layer.check_server_errors()
                    layer.testTearDown()
            finally:
                layer.tearDown()
        self.assertEqual(thread_names(), threads)
        self.assertEqual(open_descriptors(), descriptors)
        self.assertEqual(layer._resources, {})

    def test_wsgi(self):
        self.cycle(wsgi.Layer(app, name="cycled_wsgi"), fetch_root)

    def test_custom(self):
        self.cycle(custom.Layer(Handler, name="cycled_custom"), fetch_root)

    def test_static(self):
        def fetch_file(layer):
            with open(layer["documentroot"] + "/f.txt", "wb") as file:
                file.write(b"ok")
            return fetch_root(layer, "f.txt")

        self.cycle(static.Layer(name="cycled_static"), fetch_file)


    def test_smtp(self):
        def send(layer):
            with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
                client.sendmail("a@example.com", ["b@example.com"], b"Subject: cycle\r\n\r\nok\r\n")
            return layer["outbox"][0].get_content().strip().encode()

        self.cycle(smtp.Layer(name="cycled_smtp"), send)


def fetch_root(layer, path=""):
    with urllib.request.urlopen(layer["http_url"] + path, timeout=5) as response:
        return response.read()
