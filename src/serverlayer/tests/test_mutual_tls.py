"""Mutual TLS: layers with ``client_certs=`` ask clients for a certificate
from the test CA. Tried with requests (``cert=``), httpx, http.client, curl
``--cert`` and websockets."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import unittest

import httpx
import requests
import trustme

from serverlayer import ConfigurationError, asgi, content, custom, static, tls, wsgi
from serverlayer.tests.helpers import set_up_by_hand

CLIENT_VARIABLES = (
    "HTTPS",
    "SSL_CLIENT_VERIFY",
    "SSL_CLIENT_S_DN",
    "SSL_CLIENT_I_DN",
    "SSL_CLIENT_M_SERIAL",
    "SSL_CLIENT_CERT",
)


def certificate_app(environ, start_response):
    body = json.dumps({key: environ.get(key) for key in CLIENT_VARIABLES}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


REQUIRED = wsgi.Layer(certificate_app, name="REQUIRED", tls=True, client_certs="required")
OPTIONAL = wsgi.Layer(certificate_app, name="OPTIONAL", tls=True, client_certs="optional")
NOT_ASKED = wsgi.Layer(certificate_app, name="NOT_ASKED", tls=True)


def untrusted_client_cert(test: unittest.TestCase) -> str:
    """A key and certificate from a CA the server does not know."""
    directory = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, directory)
    path = os.path.join(directory, "mallory.pem")
    trustme.CA().issue_cert("mallory").private_key_and_cert_chain_pem.write_to_path(path)
    return path


def certificate_in(pem_file: str) -> tls.ClientCertificate:
    with open(pem_file) as file:
        pem = file.read()
    return tls.ClientCertificate.from_pem(pem[pem.index("-----BEGIN CERTIFICATE-----"):])


def serial_of(pem_file: str) -> int:
    return certificate_in(pem_file).serial


class RequiredClientCertificateTests(unittest.TestCase):
    layer = REQUIRED

    def get(self, **kwargs):
        response = requests.get(self.layer["http_url"], verify=self.layer["ca_bundle"], timeout=5, **kwargs)
        response.raise_for_status()
        return response.json()

    def test_the_wsgi_environ_names_the_certificate_as_mod_ssl_does(self):
        seen = self.get(cert=self.layer["client_cert"])
        serial = serial_of(self.layer["client_cert"])
        self.assertEqual(seen["HTTPS"], "on")
        self.assertEqual(seen["SSL_CLIENT_VERIFY"], "SUCCESS")
        self.assertEqual(seen["SSL_CLIENT_S_DN"], "CN=test-client,OU=test clients,O=serverlayer")
        self.assertIn("O=trustme", seen["SSL_CLIENT_I_DN"])
        self.assertEqual(seen["SSL_CLIENT_M_SERIAL"], f"{serial:X}")
        self.assertEqual(tls.ClientCertificate.from_pem(seen["SSL_CLIENT_CERT"]).serial, serial)

    def test_the_recorded_request_has_the_certificate(self):
        self.get(cert=self.layer["client_cert"])
        [request] = self.layer["http_requests"]
        certificate = request.client_cert
        self.assertEqual(certificate.common_name, "test-client")
        self.assertEqual(certificate.sans, ("test-client",))
        self.assertEqual(certificate.subject, "CN=test-client,OU=test clients,O=serverlayer")
        self.assertEqual(certificate.serial, serial_of(self.layer["client_cert"]))
        self.assertTrue(certificate.pem.startswith("-----BEGIN CERTIFICATE-----"))

    def test_more_identities_each_with_its_own_certificate(self):
        alice = self.layer["issue_client_cert"]("alice@example.org")
        self.assertEqual(self.layer["issue_client_cert"]("alice@example.org"), alice)  # issued once
        bob = self.layer["issue_client_cert"]("bob")
        self.assertNotEqual(alice, bob)
        # Two keep-alive connections, interleaved: each request carries its own connection's certificate.
        with requests.Session() as as_alice, requests.Session() as as_bob:
            for session, cert in ((as_alice, alice), (as_bob, bob), (as_alice, alice), (as_bob, bob)):
                session.get(self.layer["http_url"], verify=self.layer["ca_bundle"], cert=cert, timeout=5)
        self.assertEqual(
            [request.client_cert.common_name for request in self.layer["http_requests"]],
            ["alice@example.org", "bob", "alice@example.org", "bob"],
        )
        self.assertEqual(self.layer["http_requests"][0].client_cert.sans, ("alice@example.org",))

    def test_a_name_as_long_as_a_certificate_holds_is_issued_and_a_longer_one_refused(self):
        # A common name holds 64 characters (RFC 5280's ub-common-name), a
        # host name's part between dots 63: service accounts' e-mail
        # addresses and fully qualified service names are often longer.
        longest = "billing-service-account-of-the-accounting-depts@corp.example.org"
        self.assertEqual(len(longest), 64)
        cert = self.layer["issue_client_cert"](longest)
        seen = requests.get(self.layer["http_url"], verify=self.layer["ca_bundle"], cert=cert, timeout=5).json()
        self.assertEqual(seen["SSL_CLIENT_S_DN"], f"CN={longest},OU=test clients,O=serverlayer")
        for name in (
            "billing-service-account-of-the-accounting-dept@corp.example.org.uk",
            "billing-service-of-the-accounting-department.internal.example.com",
            "x" * 64,
            "billing..service",
        ):
            with self.subTest(name=name):
                with self.assertRaises(ConfigurationError) as raised:
                    self.layer["issue_client_cert"](name)
                message = str(raised.exception)
                self.assertTrue(message.startswith(f"A client certificate cannot be issued for {name!r}"), message)
                self.assertIn("at most 64 characters", message)

    def test_httpx_with_the_published_ssl_context(self):
        seen = httpx.get(self.layer["http_url"], verify=self.layer["ssl_context"], timeout=5).json()
        self.assertEqual(seen["SSL_CLIENT_S_DN"], "CN=test-client,OU=test clients,O=serverlayer")

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed")
    def test_curl_presents_an_issued_certificate(self):
        carol = self.layer["issue_client_cert"]("carol")
        done = subprocess.run(
            ["curl", "--silent", "--show-error", "--cacert", self.layer["ca_bundle"], "--cert", carol,
             self.layer["http_url"]],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(json.loads(done.stdout)["SSL_CLIENT_S_DN"].startswith("CN=carol,"))

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed")
    def test_curl_without_a_certificate_fails_and_the_server_serves_on(self):
        done = subprocess.run(
            ["curl", "--silent", "--show-error", "--cacert", self.layer["ca_bundle"], self.layer["http_url"]],
            capture_output=True, text=True, timeout=30,
        )
        self.assertNotEqual(done.returncode, 0)
        self.assertEqual(done.stdout, "")
        self.assertEqual(self.get(cert=self.layer["client_cert"])["SSL_CLIENT_VERIFY"], "SUCCESS")

    def test_a_client_without_a_certificate_fails_and_the_server_serves_on(self):
        # TLS 1.3 finishes the client's side of the handshake before the
        # server has seen the certificate; the refusal shows when it reads.
        with self.assertRaises(requests.exceptions.ConnectionError):
            self.get()
        self.assertEqual(self.get(cert=self.layer["client_cert"])["SSL_CLIENT_VERIFY"], "SUCCESS")
        self.assertEqual(len(self.layer["http_requests"]), 1)  # the refused client never made a request

    def test_a_certificate_from_another_ca_fails_and_the_server_serves_on(self):
        with self.assertRaises(requests.exceptions.ConnectionError):
            self.get(cert=untrusted_client_cert(self))
        self.assertEqual(self.get(cert=self.layer["client_cert"])["SSL_CLIENT_VERIFY"], "SUCCESS")

    def test_refused_clients_do_not_fail_the_test(self):
        for _ in range(3):
            with self.assertRaises(requests.exceptions.ConnectionError):
                self.get()
        self.layer.check_server_errors()  # a client's failed handshake is no server error

    def test_a_context_of_ones_own_presents_an_issued_certificate(self):
        context = tls.certificate_authority().client_context(self.layer["issue_client_cert"]("dave"))
        connection = http.client.HTTPSConnection(self.layer["http_host"], self.layer["http_port"], context=context,
                                                 timeout=5)
        try:
            connection.request("GET", "/")
            seen = json.loads(connection.getresponse().read())
        finally:
            connection.close()
        self.assertTrue(seen["SSL_CLIENT_S_DN"].startswith("CN=dave,"))


class OptionalClientCertificateTests(unittest.TestCase):
    layer = OPTIONAL

    def test_a_client_without_a_certificate_is_served(self):
        seen = requests.get(self.layer["http_url"], verify=self.layer["ca_bundle"], timeout=5).json()
        self.assertEqual(seen["SSL_CLIENT_VERIFY"], "NONE")
        self.assertIsNone(seen["SSL_CLIENT_S_DN"])
        self.assertIsNone(seen["SSL_CLIENT_CERT"])
        [request] = self.layer["http_requests"]
        self.assertIsNone(request.client_cert)

    def test_a_client_with_a_certificate_is_named(self):
        seen = requests.get(self.layer["http_url"], verify=self.layer["ca_bundle"], cert=self.layer["client_cert"],
                            timeout=5).json()
        self.assertEqual(seen["SSL_CLIENT_VERIFY"], "SUCCESS")
        self.assertEqual(self.layer["http_requests"][0].client_cert.common_name, "test-client")

    def test_an_untrusted_certificate_still_fails(self):
        with self.assertRaises(requests.exceptions.ConnectionError):
            requests.get(self.layer["http_url"], verify=self.layer["ca_bundle"], cert=untrusted_client_cert(self),
                         timeout=5)


class NotAskedTests(unittest.TestCase):
    layer = NOT_ASKED

    def test_a_plain_tls_layer_asks_for_no_certificate(self):
        self.assertNotIn("client_cert", self.layer)
        self.assertNotIn("issue_client_cert", self.layer)
        # The client has one to offer; the server never asks for it.
        cert = tls.certificate_authority().client_cert()
        seen = requests.get(self.layer["http_url"], verify=self.layer["ca_bundle"], cert=cert, timeout=5).json()
        self.assertEqual(seen["SSL_CLIENT_VERIFY"], "NONE")
        self.assertIsNone(self.layer["http_requests"][0].client_cert)


class WhoAmI(custom.RequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        certificate = self.recorded_request.client_cert
        body = (certificate.common_name if certificate else "nobody").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class OtherLayerTests(unittest.TestCase):
    """Every HTTP layer: the front that speaks TLS for custom, static and
    content, and uvicorn's own TLS for ASGI."""

    def read_with_http_client(self, layer, context, path="/"):
        connection = http.client.HTTPSConnection(layer["http_host"], layer["http_port"], context=context, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def test_custom_handler_reads_the_certificate_from_its_recorded_request(self):
        layer = set_up_by_hand(self, custom.Layer(WhoAmI, name="MTLS_CUSTOM", tls=True, client_certs="optional"))
        self.assertEqual(self.read_with_http_client(layer, layer["ssl_context"]), (200, b"test-client"))
        plain = tls.certificate_authority().client_context()
        self.assertEqual(self.read_with_http_client(layer, plain), (200, b"nobody"))

    def test_static_files_need_a_certificate(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "report.txt"), "w") as file:
            file.write("figures")
        layer = set_up_by_hand(self, static.Layer(name="MTLS_STATIC", documentroot=directory, tls=True,
                                                  client_certs="required"))
        self.assertEqual(self.read_with_http_client(layer, layer["ssl_context"], "/report.txt"), (200, b"figures"))
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            self.read_with_http_client(layer, tls.certificate_authority().client_context(), "/report.txt")
        self.assertEqual(layer["http_requests"][0].client_cert.common_name, "test-client")

    def test_content_routes_match_on_the_certificate(self):
        layer = set_up_by_hand(self, content.Layer(name="MTLS_CONTENT", tls=True, client_certs="required"))
        stand_in = layer["http_content"]
        stand_in.route("/account", match=lambda request: request.client_cert.common_name == "alice").respond("alice's")
        stand_in.route("/account").respond("someone else's", status=403)
        alice = layer["issue_client_cert"]("alice")
        answers = [
            httpx.get(stand_in.url_for("/account"), verify=tls.certificate_authority().client_context(cert), timeout=5)
            for cert in (alice, layer["client_cert"])
        ]
        self.assertEqual([(each.status_code, each.text) for each in answers],
                         [(200, "alice's"), (403, "someone else's")])

    def test_asgi_records_the_certificate_of_requests_and_websocket_handshakes(self):
        from websockets.sync.client import connect

        async def app(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close"})
                return
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        layer = set_up_by_hand(self, asgi.Layer(app, name="MTLS_ASGI", tls=True, client_certs="required"))
        bob = layer["issue_client_cert"]("bob")
        as_bob = tls.certificate_authority().client_context(bob)
        self.assertEqual(httpx.get(layer["http_url"], verify=as_bob, timeout=5).text, "ok")
        websocket = connect(layer["ws_url"], ssl=layer["ssl_context"], open_timeout=5, ping_interval=None).__enter__()
        websocket.close()
        with self.assertRaises(httpx.TransportError):
            httpx.get(layer["http_url"], verify=tls.certificate_authority().client_context(), timeout=5)
        names = [request.client_cert and request.client_cert.common_name for request in layer["http_requests"]]
        self.assertEqual(names, ["bob", "test-client"])
        # Forgotten with their connections, which the server sees end a moment after the clients.
        deadline = time.monotonic() + 10
        while layer["httpd"].client_certs and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(layer["httpd"].client_certs, {})

    def test_asgi_applications_get_the_asgi_tls_extension(self):
        """What FastAPI or Starlette code of a certificate login reads:
        ``scope["extensions"]["tls"]`` (asgiref's TLS extension), for
        requests and WebSockets, and none over plain connections."""
        from cryptography import x509
        from websockets.sync.client import connect

        async def app(scope, receive, send):
            if scope["type"] not in ("http", "websocket"):
                return
            facts = scope.get("extensions", {}).get("tls")
            body = json.dumps(facts).encode()
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.send", "bytes": body})
                await send({"type": "websocket.close"})
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        for mode in ("required", "optional"):
            with self.subTest(client_certs=mode):
                layer = asgi.Layer(app, name=f"MTLS_ASGI_SCOPE_{mode}", tls=True, client_certs=mode)
                set_up_by_hand(self, layer)
                carol = layer["issue_client_cert"]("carol")
                facts = httpx.get(layer["http_url"], verify=tls.certificate_authority().client_context(carol),
                                  timeout=5).json()
                [presented] = facts["client_cert_chain"]
                self.assertEqual(presented, certificate_in(carol).pem)
                self.assertEqual(facts["client_cert_name"], certificate_in(carol).subject)
                self.assertIsNone(facts["client_cert_error"])
                self.assertEqual(facts["tls_version"], 0x0304)  # TLS 1.3, what httpx and the server settle on
                self.assertEqual(facts["cipher_suite"] >> 8, 0x13)  # a TLS 1.3 suite (RFC 8446 B.4)
                served = x509.load_pem_x509_certificate(facts["server_cert"].encode())
                self.assertIn(layer["http_host"], str(served.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value))
                websocket = connect(layer["ws_url"], ssl=layer["ssl_context"], open_timeout=5,
                                    ping_interval=None).__enter__()
                self.addCleanup(websocket.close)
                over_websocket = json.loads(websocket.recv(timeout=5))
                self.assertEqual(over_websocket["client_cert_name"], certificate_in(layer["client_cert"]).subject)
        layer = set_up_by_hand(self, asgi.Layer(app, name="MTLS_ASGI_SCOPE_NONE", tls=True, client_certs="optional"))
        anonymous = httpx.get(layer["http_url"], verify=tls.certificate_authority().client_context(), timeout=5).json()
        self.assertEqual((anonymous["client_cert_chain"], anonymous["client_cert_name"]), ([], None))
        self.assertIsNotNone(anonymous["server_cert"])
        plain = set_up_by_hand(self, asgi.Layer(app, name="MTLS_ASGI_SCOPE_PLAIN"))
        self.assertIsNone(httpx.get(plain["http_url"], timeout=5).json())  # never over plain connections

    def test_a_class_attribute_works_as_the_keyword_does(self):
        class MutualLayer(wsgi.Layer):
            tls = True
            client_certs = "required"

        layer = set_up_by_hand(self, MutualLayer(certificate_app, name="MTLS_CLASS_ATTRIBUTE"))
        with self.assertRaises(requests.exceptions.ConnectionError):
            requests.get(layer["http_url"], verify=layer["ca_bundle"], timeout=5)
        self.assertEqual(requests.get(layer["http_url"], verify=layer["ca_bundle"], cert=layer["client_cert"],
                                      timeout=5).json()["SSL_CLIENT_VERIFY"], "SUCCESS")


class ClientCertificateTests(unittest.TestCase):
    """What ``client_cert`` tells of a certificate, including ones no trustme CA made."""

    def make_certificate(self, subject, extensions=()):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "Elsewhere")]))
            .public_key(key.public_key())
            .serial_number(4711)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)

    def test_a_certificate_without_alternative_names_and_with_two_common_names(self):
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, "first"),
            x509.NameAttribute(NameOID.COMMON_NAME, "second"),
        ])
        certificate = tls.ClientCertificate.from_der(self.make_certificate(subject))
        self.assertEqual(certificate.sans, ())
        self.assertEqual(certificate.common_name, "first")
        self.assertEqual(certificate.serial, 4711)
        self.assertEqual(certificate.issuer, "O=Elsewhere")

    def test_a_certificate_without_a_common_name(self):
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Nameless")])
        extension = x509.SubjectAlternativeName([x509.RFC822Name("nobody@example.org"), x509.DNSName("host.test")])
        certificate = tls.ClientCertificate.from_der(self.make_certificate(subject, [extension]))
        self.assertIsNone(certificate.common_name)
        self.assertEqual(certificate.sans, ("nobody@example.org", "host.test"))
        self.assertEqual(certificate.subject, "O=Nameless")

    def test_it_cannot_be_changed(self):
        certificate = certificate_in(tls.certificate_authority().client_cert())
        with self.assertRaises(dataclasses.FrozenInstanceError):
            certificate.subject = "CN=someone else"


class ConfigurationTests(unittest.TestCase):
    def test_client_certs_needs_tls(self):
        with self.assertRaises(ConfigurationError) as raised:
            wsgi.Layer(certificate_app, name="MTLS_NO_TLS", client_certs="required")
        self.assertIn("client_certs='required'", str(raised.exception))
        self.assertIn("add tls=True", str(raised.exception))
        self.assertIn("MTLS_NO_TLS", str(raised.exception))

    def test_client_certs_has_two_choices(self):
        with self.assertRaises(ConfigurationError) as raised:
            wsgi.Layer(certificate_app, name="MTLS_YES", tls=True, client_certs="yes")
        self.assertIn("client_certs='yes' is not a choice", str(raised.exception))
        self.assertIn("'optional'", str(raised.exception))
        self.assertIn("'required'", str(raised.exception))

    def test_a_client_name_a_certificate_cannot_carry(self):
        authority = tls.certificate_authority()
        for name in ("Alice Smith", "", "-alice", "alice@", 42):
            with self.subTest(name=name), self.assertRaises(ConfigurationError) as raised:
                authority.client_cert(name)
            self.assertIn(repr(name), str(raised.exception))
            self.assertIn("e-mail address", str(raised.exception))

    def test_issuing_is_safe_from_several_threads(self):
        authority = tls.certificate_authority()
        paths: list[str] = []
        threads = [threading.Thread(target=lambda: paths.append(authority.client_cert("concurrent"))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(len(set(paths)), 1)
