"""HTTPS and SMTP over TLS, verified against the test certificate authority."""

from __future__ import annotations

import gc
import http.client
import http.cookiejar
import os
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
import urllib.error
import urllib.request
import warnings
from email.message import EmailMessage
from unittest import mock

import trustme

from serverlayer import ConfigurationError, custom, smtp, static, tls, wsgi
from serverlayer.tests.helpers import open_descriptors, set_up_by_hand, thread_names


def scheme_app(environ, start_response):
    body = f"{environ['wsgi.url_scheme']} {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class Hello(custom.RequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")


HTTPS_LAYER = wsgi.Layer(scheme_app, name="HTTPS_LAYER", tls=True)


def fetch(url, **kwargs):
    with urllib.request.urlopen(url, timeout=5, **kwargs) as response:
        return response.read()


class HTTPSTests(unittest.TestCase):
    layer = HTTPS_LAYER

    def test_publishes_https_url_and_the_ca(self):
        port = self.layer["http_port"]
        self.assertEqual(self.layer["http_url"], f"https://127.0.0.1:{port}/")
        self.assertEqual(self.layer["ca_bundle"], tls.certificate_authority().ca_bundle)
        with open(self.layer["ca_bundle"]) as bundle:
            self.assertIn("-----BEGIN CERTIFICATE-----", bundle.read())
        context = self.layer["ssl_context"]
        self.assertEqual((context.verify_mode, context.check_hostname), (ssl.CERT_REQUIRED, True))

    def test_verifies_with_ssl_context(self):
        self.assertEqual(fetch(self.layer["http_url"] + "ctx", context=self.layer["ssl_context"]), b"https /ctx")

    def test_verifies_with_ca_bundle(self):
        context = ssl.create_default_context(cafile=self.layer["ca_bundle"])
        self.assertEqual(fetch(self.layer["http_url"] + "bundle", context=context), b"https /bundle")

    def test_verification_fails_without_the_ca(self):
        with self.assertRaises(urllib.error.URLError) as caught:
            fetch(self.layer["http_url"], context=ssl.create_default_context())
        self.assertIsInstance(caught.exception.reason, ssl.SSLCertVerificationError)
        self.assertEqual(fetch(self.layer["http_url"], context=self.layer["ssl_context"]), b"https /")

    def test_curl_with_cacert(self):
        completed = subprocess.run(
            ["curl", "--silent", "--show-error", "--cacert", self.layer["ca_bundle"], self.layer["http_url"] + "curl"],
            capture_output=True, timeout=30,
        )
        self.assertEqual((completed.returncode, completed.stdout), (0, b"https /curl"), completed.stderr)
        refused = subprocess.run(["curl", "--silent", self.layer["http_url"]], capture_output=True, timeout=30)
        self.assertEqual(refused.returncode, 60)  # curl: peer certificate cannot be authenticated

    def test_keep_alive_through_tls(self):
        connection = http.client.HTTPSConnection(
            self.layer["http_host"], self.layer["http_port"], context=self.layer["ssl_context"], timeout=5
        )
        self.addCleanup(connection.close)
        for number in range(5):
            connection.request("GET", f"/{number}")
            self.assertEqual(connection.getresponse().read(), f"https /{number}".encode())

    def test_plain_http_to_the_https_port_fails_and_the_server_keeps_serving(self):
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/")
        with self.assertRaises(http.client.RemoteDisconnected):  # the front closes without a word
            connection.getresponse()
        self.assertEqual(fetch(self.layer["http_url"] + "after", context=self.layer["ssl_context"]), b"https /after")

    def test_failed_handshake_and_the_server_keeps_serving(self):
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05garbage")  # a TLS record header, then nonsense
            self.assertIn(sock.recv(100)[:1], (b"", b"\x15"))  # closed, or a TLS alert
        self.assertEqual(fetch(self.layer["http_url"] + "after", context=self.layer["ssl_context"]), b"https /after")

    def test_httpd_is_the_http_server_behind_tls(self):
        self.assertEqual(self.layer["httpd"].adj.url_scheme, "https")


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str) -> str:
    """A TLS handshake from ``client_context`` with a plain ssl server
    socket on 127.0.0.1 that uses ``server_context``; the TLS version agreed.

    Raises what the client's handshake raises; the server's side ends
    either way, within the socket timeout.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                with connection:
                    connection.settimeout(5)
                    server_context.wrap_socket(connection, server_side=True).close()
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate: what the caller asserts

        server = threading.Thread(target=serve, name="TLS server of another CA")
        server.start()
        try:
            with socket.create_connection(listener.getsockname()[:2], timeout=5) as raw, \
                    client_context.wrap_socket(raw, server_hostname=server_hostname) as client:
                return client.version() or ""
        finally:
            server.join(10)


class SessionTicketTests(unittest.TestCase):
    """The server sends nothing after the handshake until the client speaks:
    TLS 1.3 session tickets, read by a client's receiving thread while its
    other thread sends the first request, made one connection in a few
    hundred hang (websockets' sync client)."""

    layer = HTTPS_LAYER

    def test_nothing_arrives_before_the_client_speaks(self):
        for layer in (self.layer, set_up_by_hand(self, _asgi_tls_layer())):
            with self.subTest(layer=layer):
                raw = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
                self.addCleanup(raw.close)
                client = layer["ssl_context"].wrap_socket(raw, server_hostname=layer["http_host"])
                self.addCleanup(client.close)
                self.assertEqual(client.version(), "TLSv1.3")
                self.assertEqual(select.select([client], [], [], 0.2)[0], [])
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                self.assertTrue(client.recv(100).startswith(b"HTTP/1.1 200"))


def _asgi_tls_layer():
    from serverlayer import asgi

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return asgi.Layer(app, name="asgi_tickets", tls=True)


class SSLContextVerifiesTests(unittest.TestCase):
    """The published ``ssl_context`` really verifies: the certificate's CA
    and its host names, in a real handshake."""

    layer = HTTPS_LAYER

    def test_ssl_context_refuses_a_certificate_of_another_ca(self):
        names = ("127.0.0.1", "localhost")
        other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        trustme.CA().issue_cert(*names).configure_cert(other)
        with self.assertRaises(ssl.SSLCertVerificationError) as caught:
            handshake(other, self.layer["ssl_context"], "127.0.0.1")
        self.assertEqual(caught.exception.verify_code, 20)  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        # The same server with a certificate of the test CA: accepted.
        own = tls.certificate_authority().server_context(names)
        self.assertTrue(handshake(own, self.layer["ssl_context"], "127.0.0.1").startswith("TLS"))

    def test_ssl_context_refuses_a_host_name_not_in_the_certificate(self):
        address = (self.layer["http_host"], self.layer["http_port"])
        context = self.layer["ssl_context"]
        with socket.create_connection(address, timeout=5) as raw:
            with self.assertRaises(ssl.SSLCertVerificationError) as caught:
                context.wrap_socket(raw, server_hostname="not-in-the-certificate.example").close()
        self.assertEqual(caught.exception.verify_code, 62)  # X509_V_ERR_HOSTNAME_MISMATCH
        with socket.create_connection(address, timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as accepted:
            self.assertTrue((accepted.version() or "").startswith("TLS"))
        self.assertEqual(fetch(self.layer["http_url"] + "after", context=context), b"https /after")


class CertificateNameTests(unittest.TestCase):

    def check_names(self, layer, names):
        set_up_by_hand(self, layer)
        context = ssl.create_default_context(cafile=layer["ca_bundle"])
        port = layer["http_port"]
        connect_to = "::1" if ":" in layer["http_host"] else "127.0.0.1"
        for name in names:
            with self.subTest(name=name):
                with socket.create_connection((connect_to, port), timeout=5) as raw, \
                        context.wrap_socket(raw, server_hostname=name) as tls_socket:
                    self.assertEqual(tls_socket.version()[:3], "TLS")
        with self.assertRaises(ssl.SSLCertVerificationError):
            with socket.create_connection((connect_to, port), timeout=5) as raw:
                context.wrap_socket(raw, server_hostname="not-this-server.example.com").close()

    def test_ipv4_and_localhost(self):
        self.check_names(wsgi.Layer(scheme_app, name="names_ipv4", tls=True), ["127.0.0.1", "localhost", "::1"])

    def test_ipv6(self):
        layer = wsgi.Layer(scheme_app, name="names_ipv6", tls=True, host="::1")
        self.check_names(layer, ["::1", "localhost"])
        self.assertEqual(fetch(layer["http_url"], context=layer["ssl_context"]), b"https /")
        self.assertTrue(layer["http_url"].startswith("https://[::1]:"))

    def test_certificate_names_are_the_loopback_names_and_each_real_host_once(self):
        self.assertEqual(
            tls.certificate_names("", "localhost", "0.0.0.0", "::", "app.example.test", "app.example.test"),
            (*tls.LOOPBACK_NAMES, "app.example.test"),
        )

    def test_a_host_no_certificate_can_name_is_refused_saying_so(self):
        # Docker Compose names services and containers with underscores
        # ("web_1"); a URL's "[fd00::5]" or "host:8080" is no host either.
        for public_host in ("web_1", "[fd00::5]", "ci-runner:8080"):
            for layer in (
                wsgi.Layer(scheme_app, name="unnamed_in_certificate", tls=True, public_host=public_host),
                static.Layer(name="unnamed_in_static_certificate", tls=True, public_host=public_host),
                smtp.Layer(name="unnamed_in_mail_certificate", starttls=True, public_host=public_host),
            ):
                with self.subTest(layer=layer, public_host=public_host):
                    with self.assertRaises(ConfigurationError) as caught:
                        layer.setUp()
                    message = str(caught.exception)
                    beginning = f"{layer!r}: {public_host!r} cannot be named in a TLS certificate"
                    self.assertTrue(message.startswith(beginning), message)
                    self.assertIn("letters, digits, hyphens and dots", message)
                    self.assertIn("public_host=", message)

    def test_public_host_is_in_the_certificate(self):
        layer = wsgi.Layer(scheme_app, name="names_public", tls=True, public_host="app.example.test")
        self.check_names(layer, ["app.example.test", "127.0.0.1"])


class OtherHTTPLayerTests(unittest.TestCase):

    def test_custom_layer_over_tls(self):
        layer = set_up_by_hand(self, custom.Layer(Hello, name="custom_tls", tls=True))
        self.assertTrue(layer["http_url"].startswith("https://"))
        self.assertEqual(fetch(layer["http_url"], context=layer["ssl_context"]), b"hello")

    def test_static_layer_over_tls(self):
        layer = set_up_by_hand(self, static.Layer(name="static_tls", tls=True))
        with open(os.path.join(layer["documentroot"], "a.txt"), "w") as file:
            file.write("over tls")
        self.assertEqual(fetch(layer["http_url"] + "a.txt", context=layer["ssl_context"]), b"over tls")

    def test_server_errors_behind_tls_are_reported(self):
        def broken(environ, start_response):
            raise KeyError("behind tls")

        layer = set_up_by_hand(self, wsgi.Layer(broken, name="broken_tls", tls=True))
        with self.assertRaises(urllib.error.HTTPError):
            fetch(layer["http_url"], context=layer["ssl_context"])
        [error] = layer.server_errors.take()
        self.assertIn("KeyError: 'behind tls'", error)

    def test_a_set_up_failing_at_the_certificate_leaves_nothing_behind(self):
        # A host no certificate can name (Docker Compose's service and
        # container names have underscores) fails setUp; the server made
        # for behind the TLS front, and its socket, must not be left for
        # the garbage collector to find open.
        for kind, make in {
            "wsgi": lambda: wsgi.Layer(scheme_app, name="uncertifiable_wsgi", tls=True, public_host="web_1"),
            "custom": lambda: custom.Layer(Hello, name="uncertifiable_custom", tls=True, public_host="web_1"),
            "static": lambda: static.Layer(name="uncertifiable_static", tls=True, public_host="web_1"),
        }.items():
            with self.subTest(kind), warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                threads = thread_names()
                layer = make()
                with self.assertRaises(ValueError):
                    layer.setUp()
                gc.collect()
                self.assertEqual([str(warning.message) for warning in warned], [])
                self.assertEqual(thread_names(), threads)
                self.assertEqual(layer._resources, {})

    def test_a_set_up_failing_at_the_tls_front_leaves_nothing_behind(self):
        # As when the process is out of descriptors for the front's event loop.
        for kind, make in {
            "wsgi": lambda: wsgi.Layer(scheme_app, name="frontless_wsgi", tls=True),
            "custom": lambda: custom.Layer(Hello, name="frontless_custom", tls=True),
        }.items():
            with self.subTest(kind), warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                threads, descriptors = thread_names(), open_descriptors()
                layer = make()
                with mock.patch.object(tls, "TLSFront", side_effect=OSError(24, "Too many open files")):
                    with self.assertRaises(OSError):
                        layer.setUp()
                self.assertEqual((thread_names(), open_descriptors()), (threads, descriptors))
                gc.collect()
                self.assertEqual([str(warning.message) for warning in warned], [])

    def test_cycles_leave_nothing_behind(self):
        layer = wsgi.Layer(scheme_app, name="tls_cycles", tls=True)
        threads, descriptors = thread_names(), open_descriptors()
        for number in range(50):
            layer.setUp()
            try:
                if number % 10 == 0:
                    self.assertEqual(fetch(layer["http_url"], context=layer["ssl_context"]), b"https /")
                    layer.check_server_errors()
            finally:
                layer.tearDown()
        self.assertEqual(thread_names(), threads)
        self.assertEqual(open_descriptors(), descriptors)
        self.assertEqual(layer._resources, {})


def front_settled(front, descriptors: int, backend=None) -> tuple[set, int]:
    """The TLS front's transports and the process's descriptor count, once
    every finished connection is closed or 0.5 s have passed.

    The front closes its side of both connections as soon as the client's
    is over (a few milliseconds), not after waiting CLOSE_TIMEOUT (1 s) for
    a close that would never come. The count leaves out the sockets of
    ``backend`` (a WaitressServer) that it ended but that wait for its
    loop's next turn to be closed (``wsgi._Channel.hang_up_after``).
    """

    def counted() -> int:
        waiting = 0
        if backend is not None:
            waiting = sum(
                1 for channel in list(backend._map.values())
                if isinstance(channel, wsgi._Channel) and not channel.connected and channel.socket is not None
            )
        return open_descriptors() - waiting

    deadline = time.monotonic() + 0.5
    while (front.transports or counted() > descriptors) and time.monotonic() < deadline:
        time.sleep(0.01)
    return front.transports, counted()


class FrontConnectionTests(unittest.TestCase):

    def test_a_finished_connection_leaves_nothing_behind_in_the_front(self):
        layer = set_up_by_hand(self, wsgi.Layer(scheme_app, name="front_connections", tls=True))
        front = layer._running.server
        descriptors = open_descriptors()
        for number in range(10):
            answer = fetch(layer["http_url"] + str(number), context=layer["ssl_context"])
            self.assertEqual(answer, b"https /%d" % number)
        self.assertEqual(front_settled(front, descriptors, layer["httpd"]), (set(), descriptors))


    def test_both_connections_of_the_front_send_at_once(self):
        # Nagle's algorithm on the front's connection to the backend held a
        # request's body back for the backend's delayed ACK, some 40 ms.
        def echo(environ, start_response):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]

        layer = set_up_by_hand(self, wsgi.Layer(echo, name="front_no_delay", tls=True))
        front = layer._running.server
        client = http.client.HTTPSConnection(
            layer["http_host"], layer["http_port"], context=layer["ssl_context"], timeout=10)
        self.addCleanup(client.close)
        client.request("POST", "/", body=b"x" * 100)
        self.assertEqual(client.getresponse().read(), b"x" * 100)
        sockets = [transport.get_extra_info("socket") for transport in list(front.transports)]
        self.assertEqual(len(sockets), 2)  # the client's, and the one to the backend
        for sock in sockets:
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1, sock)

    def test_a_large_answer_before_the_server_closes_arrives_whole(self):
        body = os.urandom(8 << 20)

        def large(environ, start_response):
            start_response("200 OK", [("Content-Length", str(len(body)))])
            return [body]

        layer = set_up_by_hand(self, wsgi.Layer(large, name="front_large_close", tls=True))
        for _ in range(3):
            client = http.client.HTTPSConnection(
                layer["http_host"], layer["http_port"], context=layer["ssl_context"], timeout=10)
            self.addCleanup(client.close)
            client.request("GET", "/", headers={"Connection": "close"})  # waitress closes after the answer
            self.assertEqual(client.getresponse().read(), body)

    def test_without_its_backend_the_front_closes_each_client_at_once(self):
        layer = set_up_by_hand(self, wsgi.Layer(scheme_app, name="front_no_backend", tls=True))
        front = layer._running.server
        with socket.create_server(("127.0.0.1", 0)) as closed_soon:
            nobody = closed_soon.getsockname()
        front._backend_address = nobody  # connections to the backend are refused from now on
        descriptors = open_descriptors()
        for _ in range(5):
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as raw, \
                    layer["ssl_context"].wrap_socket(raw, server_hostname="localhost") as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer = client.recv(100)
                except ConnectionResetError:
                    answer = b""
                self.assertEqual(answer, b"")  # closed, not left waiting for the timeout
        self.assertEqual(front_settled(front, descriptors), (set(), descriptors))
        self.assertEqual(front.clients._clients, {})


class TrustTests(unittest.TestCase):

    def test_a_ca_whose_directory_is_gone_already_goes_quietly(self):
        unraisable = []
        with mock.patch("sys.unraisablehook", unraisable.append):
            authority = tls.CertificateAuthority()
            shutil.rmtree(authority._directory)  # say, by a clean-up of /tmp
            del authority
            gc.collect()
        self.assertEqual(unraisable, [])

    def test_the_system_bundle_starts_with_the_first_system_file_that_exists(self):
        directory = tempfile.mkdtemp(prefix="serverlayer-test-bundles-")
        self.addCleanup(shutil.rmtree, directory)
        first, second = os.path.join(directory, "first.pem"), os.path.join(directory, "second.pem")
        for path in (first, second):
            with open(path, "w") as file:
                file.write(f"contents of {os.path.basename(path)}\n")
        paths = ssl.get_default_verify_paths()
        for cafile, openssl_cafile, expected in (
            (first, second, "contents of first.pem"),
            (None, second, "contents of second.pem"),
            (os.path.join(directory, "missing.pem"), second, "contents of second.pem"),
        ):
            with self.subTest(cafile=cafile), mock.patch(
                "ssl.get_default_verify_paths",
                return_value=paths._replace(cafile=cafile, openssl_cafile=openssl_cafile),
            ):
                authority = tls.CertificateAuthority()  # its directory goes with it
                with open(authority.system_bundle()) as bundle:
                    lines = bundle.read().splitlines()
                self.assertEqual(lines[0], expected)
                self.assertEqual(lines[1], "-----BEGIN CERTIFICATE-----")  # the test CA's, next

    def test_trust_layer_lets_default_contexts_verify_and_restores_the_environment(self):
        layer = set_up_by_hand(self, wsgi.Layer(scheme_app, name="trusted", tls=True))
        before = {name: os.environ.get(name) for name in tls.TRUST_ENVIRONMENT}
        with self.assertRaises(urllib.error.URLError):
            fetch(layer["http_url"])
        tls.TRUST_TEST_CA.setUp()
        try:
            self.assertEqual(fetch(layer["http_url"] + "trusted"), b"https /trusted")  # no context given
            completed = subprocess.run(["curl", "--silent", layer["http_url"]], capture_output=True, timeout=30)
            self.assertEqual(completed.stdout, b"https /")
            with open(os.environ["SSL_CERT_FILE"]) as bundle:
                text = bundle.read()
            with open(layer["ca_bundle"]) as ca:
                self.assertIn(ca.read().strip(), text)
            self.assertGreater(text.count("BEGIN CERTIFICATE"), 1)  # the system's CAs are still trusted
        finally:
            tls.TRUST_TEST_CA.tearDown()
        self.assertEqual({name: os.environ.get(name) for name in tls.TRUST_ENVIRONMENT}, before)
        with self.assertRaises(urllib.error.URLError):
            fetch(layer["http_url"])

    def test_an_opener_the_suite_installed_is_kept(self):
        layer = set_up_by_hand(self, wsgi.Layer(scheme_app, name="trusted_own_opener", tls=True))
        jar = http.cookiejar.CookieJar()
        suites = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        urllib.request.install_opener(suites)
        self.addCleanup(urllib.request.install_opener, None)
        tls.TRUST_TEST_CA.setUp()
        try:
            with urllib.request.urlopen(layer["http_url"], context=layer["ssl_context"], timeout=5) as answer:
                self.assertEqual(answer.read(), b"https /")
        finally:
            tls.TRUST_TEST_CA.tearDown()
        self.assertIs(urllib.request._opener, suites)

    def test_urllibs_own_opener_is_made_anew(self):
        """Its TLS context, made once since Python 3.12, is made again with
        the test CA; the one made with it goes at tearDown."""
        layer = set_up_by_hand(self, wsgi.Layer(scheme_app, name="trusted_default_opener", tls=True))
        urllib.request.install_opener(None)
        self.addCleanup(urllib.request.install_opener, None)
        with self.assertRaises(urllib.error.URLError):
            urllib.request.urlopen(layer["http_url"], timeout=5)
        tls.TRUST_TEST_CA.setUp()
        try:
            with urllib.request.urlopen(layer["http_url"], timeout=5) as answer:
                self.assertEqual(answer.read(), b"https /")
        finally:
            tls.TRUST_TEST_CA.tearDown()
        with self.assertRaises(urllib.error.URLError):
            urllib.request.urlopen(layer["http_url"], timeout=5)


def make_message():
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.com", "over TLS"
    message.set_content("secret")
    return message


class SMTPTLSTests(unittest.TestCase):

    def serve(self, **kwargs):
        return set_up_by_hand(self, smtp.Layer(name=f"smtp_{self._testMethodName}", **kwargs))

    def test_starttls(self):
        layer = self.serve(starttls=True)
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
            client.ehlo()
            self.assertTrue(client.has_extn("starttls"))
            client.starttls(context=layer["ssl_context"])
            client.send_message(make_message())
        self.assertEqual(layer["outbox"][0].get_content(), "secret\n")
        self.assertEqual(layer["ca_bundle"], tls.certificate_authority().ca_bundle)

    def test_starttls_verification_fails_without_the_ca(self):
        layer = self.serve(starttls=True)
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
            with self.assertRaises(ssl.SSLCertVerificationError):
                client.starttls(context=ssl.create_default_context())
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
            self.assertEqual(client.noop()[0], 250)  # still serving
        # The client's failed handshake is not a server error: nothing to report.
        layer.check_server_errors()

    def test_required_starttls_refuses_mail_before_tls(self):
        layer = self.serve(require_starttls=True)
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
            with self.assertRaises(smtplib.SMTPSenderRefused) as caught:
                client.send_message(make_message())
            self.assertEqual(caught.exception.smtp_code, 530)
            client.starttls(context=layer["ssl_context"])
            client.send_message(make_message())
        self.assertEqual(len(layer["outbox"]), 1)

    def test_auth_over_starttls(self):
        layer = self.serve(starttls=True, auth={"alice": "s3cret"}, auth_required=True)
        with smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=5) as client:
            client.starttls(context=layer["ssl_context"])
            client.login("alice", "s3cret")
            client.send_message(make_message())
        self.assertEqual(layer["outbox"][0].authenticated_as, "alice")

    def test_implicit_tls(self):
        layer = self.serve(implicit_tls=True)
        with smtplib.SMTP_SSL(layer["smtp_host"], layer["smtp_port"], context=layer["ssl_context"], timeout=5) as c:
            c.send_message(make_message())
        self.assertEqual(len(layer["outbox"]), 1)
        with self.assertRaises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL(layer["smtp_host"], layer["smtp_port"], context=ssl.create_default_context(), timeout=5)
        with self.assertRaises((smtplib.SMTPServerDisconnected, ConnectionError, TimeoutError)):
            smtplib.SMTP(layer["smtp_host"], layer["smtp_port"], timeout=0.3)  # plain SMTP: no greeting comes
        with smtplib.SMTP_SSL(layer["smtp_host"], layer["smtp_port"], context=layer["ssl_context"], timeout=5) as c:
            self.assertEqual(c.noop()[0], 250)

    def test_the_http_layers_tls_keyword_says_what_smtp_takes(self):
        from serverlayer import ConfigurationError

        with self.assertRaises(ConfigurationError) as refused:
            smtp.Layer(name="smtp_with_tls", tls=True)
        message = str(refused.exception)
        self.assertIn("smtp_with_tls", message)
        self.assertIn("tls=True is the HTTP layers' keyword", message)
        self.assertIn("starttls=True", message)
        self.assertIn("implicit_tls=True", message)

    def test_implicit_tls_and_starttls_exclude_each_other(self):
        from serverlayer import ConfigurationError

        with self.assertRaises(ConfigurationError):
            smtp.Layer(name="both_tls_modes", implicit_tls=True, starttls=True)
