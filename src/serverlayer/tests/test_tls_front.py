"""Behind the TLS front the application sees what it sees over plain HTTP:
the client's own address and port and the published port; and the front
settles HTTP/2-capable clients on HTTP/1.1 by ALPN."""

from __future__ import annotations

import gc
import json
import shutil
import socket
import ssl
import subprocess
import time
import unittest
import warnings

from serverlayer import custom, wsgi
from serverlayer.reporting import ErrorLog
from serverlayer.server import PRUNE_AT_LEAST
from serverlayer.tests.helpers import open_descriptors, set_up_by_hand, stop_in_the_round_that_accepts, thread_names
from serverlayer.tests.test_hardening import TEAR_DOWN_BOUND


def environ_app(environ, start_response):
    """Answers with what the server told the application about the connection."""
    body = json.dumps(
        {key: environ[key] for key in ("REMOTE_ADDR", "REMOTE_HOST", "REMOTE_PORT", "SERVER_PORT")}
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


class EnvironHandler(custom.RequestHandler):
    """environ_app's answer from a custom handler: its client_address and its server's port."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        host, port = self.client_address[:2]
        body = json.dumps({"REMOTE_ADDR": host, "REMOTE_HOST": host, "REMOTE_PORT": str(port),
                           "SERVER_PORT": str(self.server.server_port),
                           "SERVER_ADDRESS_PORT": str(self.server.server_address[1])}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTP_ENVIRON_LAYER = wsgi.Layer(environ_app, name="HTTP_ENVIRON_LAYER")
HTTPS_ENVIRON_LAYER = wsgi.Layer(environ_app, name="HTTPS_ENVIRON_LAYER", tls=True)


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ``::1``."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def ask(layer, connect_to: str, *, requests: int = 1) -> tuple[tuple[str, int], list[dict[str, str]]]:
    """The client socket's own address, and what the application saw for
    each of ``requests`` requests on that one connection."""
    with socket.create_connection((connect_to, layer["http_port"]), timeout=5) as raw:
        sock = raw
        if layer.tls:
            sock = layer["ssl_context"].wrap_socket(raw, server_hostname=connect_to)
        with sock:
            own = sock.getsockname()[:2]
            seen = []
            reader = sock.makefile("rb")
            for _ in range(requests):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                length = None
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                assert length is not None, "no response"
                seen.append(json.loads(reader.read(length)))
            reader.close()
    return own, seen


class ClientAddressTests(unittest.TestCase):

    def check(self, layer, connect_to: str) -> None:
        own, seen = ask(layer, connect_to, requests=2)
        for environ in seen:
            self.assertEqual(environ["REMOTE_ADDR"], own[0])
            self.assertEqual(environ["REMOTE_HOST"], own[0])
            self.assertEqual(environ["REMOTE_PORT"], str(own[1]))
            self.assertEqual(environ["SERVER_PORT"], str(layer["http_port"]))


class HTTPSClientAddressTests(ClientAddressTests):
    layer = HTTPS_ENVIRON_LAYER

    def test_application_sees_the_client_and_the_published_port(self):
        self.check(self.layer, "127.0.0.1")

    def test_each_connection_is_its_own_client(self):
        first, [seen_first] = ask(self.layer, "127.0.0.1")
        second, [seen_second] = ask(self.layer, "127.0.0.1")
        self.assertNotEqual(first[1], second[1])
        self.assertEqual((seen_first["REMOTE_PORT"], seen_second["REMOTE_PORT"]), (str(first[1]), str(second[1])))

    def test_ipv6_client(self):
        if not ipv6_loopback():
            self.skipTest("this machine has no IPv6 loopback")
        layer = set_up_by_hand(self, wsgi.Layer(environ_app, name="HTTPS_ENVIRON_LAYER_IPV6", host="::1", tls=True))
        self.check(layer, "::1")

    def test_forgets_connections_that_ended(self):
        for _ in range(3):
            ask(self.layer, "127.0.0.1")
        clients = self.layer["httpd"].forwarded_clients
        deadline = time.monotonic() + 5
        while len(clients) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(clients), 0)

    def test_lets_go_of_accepted_connections_once_closed(self):
        """The front keeps the connections it accepts, to close any still
        shaking hands when it stops; those that ended are dropped as more
        come, so a long run does not pile them up."""
        for _ in range(3 * PRUNE_AT_LEAST):
            ask(self.layer, "127.0.0.1")
        remembered = sum(len(sock.accepted) for sock in self.layer._running.server.sockets)
        # At most PRUNE_AT_LEAST since the last look, and twice the few still open then.
        self.assertLess(remembered, 2 * PRUNE_AT_LEAST)


class AcceptRecordingChannel(wsgi._Channel):
    """Records whom the front registered for a connection when waitress accepts it."""

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        server.clients_at_accept.append(server.forwarded_clients.client_of(addr, addr)[:2])


class AcceptRecordingServer(wsgi.WaitressServer):
    channel_class = AcceptRecordingChannel

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clients_at_accept = []


class AcceptRecordingLayer(wsgi.Layer):
    def make_server(self, sockets):
        return AcceptRecordingServer(
            self.application(), sockets, errors=self.server_errors, threads=self.threads,
            thread_name=f"serverlayer {self.__module__}.{self.__name__}", url_scheme=self.scheme,
        )


ACCEPT_RECORDING_LAYER = AcceptRecordingLayer(environ_app, name="ACCEPT_RECORDING_LAYER", tls=True)


class RegisteredBeforeAcceptTests(unittest.TestCase):
    """A server may look the client up as soon as it accepts (the custom
    layers' server may): the front registers it before it connects."""

    layer = ACCEPT_RECORDING_LAYER

    def test_the_client_is_known_when_the_server_accepts(self):
        server = self.layer["httpd"]
        own = [ask(self.layer, "127.0.0.1")[0] for _ in range(20)]
        self.assertEqual(server.clients_at_accept, own)


class CustomClientAddressTests(ClientAddressTests):
    """The thread-pool server behind the front (custom, static, content layers)."""

    def serve(self, **kwargs):
        layer = custom.Layer(EnvironHandler, name=f"custom_environ_{self._testMethodName}", **kwargs)
        return set_up_by_hand(self, layer)

    def check(self, layer, connect_to: str) -> None:
        super().check(layer, connect_to)
        # socketserver's server_address too: handlers build URLs from it.
        [environ] = ask(layer, connect_to, requests=1)[1]
        self.assertEqual(environ["SERVER_ADDRESS_PORT"], str(layer["http_port"]))
        self.assertEqual(layer["httpd"].server_address, (layer["http_host"], layer["http_port"]))

    def test_over_tls(self):
        self.check(self.serve(tls=True), "127.0.0.1")

    def test_over_tls_from_ipv6(self):
        if not ipv6_loopback():
            self.skipTest("this machine has no IPv6 loopback")
        self.check(self.serve(tls=True, host="::1"), "::1")

    def test_over_plain_http(self):
        self.check(self.serve(), "127.0.0.1")


class HTTPClientAddressTests(ClientAddressTests):
    """The same checks over plain HTTP, which the HTTPS ones must match."""

    layer = HTTP_ENVIRON_LAYER

    def test_application_sees_the_client_and_the_published_port(self):
        self.check(self.layer, "127.0.0.1")

    def test_not_behind_a_front(self):
        self.assertIsNone(self.layer["httpd"].forwarded_clients)


class ALPNTests(unittest.TestCase):
    layer = HTTPS_ENVIRON_LAYER

    def test_http2_capable_client_settles_on_http_1_1(self):
        context = ssl.create_default_context(cafile=self.layer["ca_bundle"])
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection((self.layer["http_host"], self.layer["http_port"]), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=self.layer["http_host"]) as sock:
            self.assertEqual(sock.selected_alpn_protocol(), "http/1.1")
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 200 OK"))

    def test_curl_asking_for_http2(self):
        if shutil.which("curl") is None:
            self.skipTest("no curl")
        version = subprocess.run(["curl", "--version"], capture_output=True, text=True, timeout=30).stdout
        if "HTTP2" not in version:
            self.skipTest("this curl speaks no HTTP/2")
        completed = subprocess.run(
            ["curl", "--silent", "--show-error", "--http2", "--cacert", self.layer["ca_bundle"],
             "--write-out", "\n%{http_version}", self.layer["http_url"]],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(completed.returncode, 0, completed.stderr)
        body, http_version = completed.stdout.rsplit("\n", 1)
        self.assertEqual(http_version, "1.1")
        self.assertEqual(json.loads(body)["SERVER_PORT"], str(self.layer["http_port"]))


class TearDownTests(unittest.TestCase):

    def test_tear_down_lets_go_of_clients_before_and_during_their_handshake(self):
        """A client that connected and never started its handshake, and one
        inside a request, are cut off; every socket is closed."""
        threads, descriptors = thread_names(), open_descriptors()
        layer = wsgi.Layer(environ_app, name="tls_front_tear_down", tls=True)
        layer.setUp()
        try:
            address = (layer["http_host"], layer["http_port"])
            silent = socket.create_connection(address, timeout=5)
            inside = layer["ssl_context"].wrap_socket(
                socket.create_connection(address, timeout=5), server_hostname=layer["http_host"]
            )
            inside.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: ")
            self.assertEqual(json.loads(ask(layer, "127.0.0.1")[1][0]["SERVER_PORT"]), layer["http_port"])
        finally:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                started = time.monotonic()
                layer.tearDown()
                took = time.monotonic() - started
                gc.collect()  # a socket left for the collector would warn now
        self.assertEqual([str(warning.message) for warning in caught], [])
        # Cut off, not closed politely: a TLS close waits up to a second
        # (tls.CLOSE_TIMEOUT) for the client's goodbye, which a stalled
        # client never sends.
        self.assertLess(took, TEAR_DOWN_BOUND, f"tearDown took {took:.3f}s")
        with silent, inside:
            self.assertEqual(silent.recv(1), b"")  # closed, not left to time out
            try:
                self.assertEqual(inside.recv(1), b"")
            except (ssl.SSLError, ConnectionResetError):
                pass  # cut off without a TLS goodbye: closed as well
        self.assertEqual(thread_names(), threads)
        self.assertEqual(open_descriptors(), descriptors)


    def test_connections_accepted_in_the_loops_last_round_are_closed(self):
        """One still waiting for its handshake task is closed by the front."""
        layer = wsgi.Layer(environ_app, name="tls_front_last_round", tls=True)
        layer.setUp()
        stop_in_the_round_that_accepts(self, layer, (layer["http_host"], layer["http_port"]))

    def test_asking_a_finished_loop_to_stop_is_harmless(self):
        """The loop may end on its own between the check that its thread
        lives and the request to stop it."""
        layer = wsgi.Layer(environ_app, name="tls_front_finished", tls=True)
        layer.setUp()
        front = layer._running.server
        layer.tearDown()
        self.assertTrue(front.loop.is_closed())
        front.request_stop()


class LoopExceptionTests(unittest.TestCase):
    """What asyncio reports to the front's loop goes into the layer's error log."""

    def front(self) -> tuple[ErrorLog, object]:
        from serverlayer.tls import TLSFront

        errors = ErrorLog("the test's layer")
        front = TLSFront.__new__(TLSFront)  # no sockets: only its exception handler is used
        front.errors = errors
        return errors, front

    def test_an_exception_is_reported_with_its_traceback(self):
        errors, front = self.front()
        try:
            raise ValueError("raised in a callback")
        except ValueError as error:
            front._loop_exception(None, {"message": "Exception in callback", "exception": error})
        [report] = errors.take()
        self.assertTrue(report.startswith("Exception in callback\nTraceback (most recent call last):"), report)
        self.assertIn("ValueError: raised in a callback", report)

    def test_a_message_without_an_exception_is_reported_as_it_is(self):
        errors, front = self.front()
        front._loop_exception(None, {"message": "Task was destroyed but it is pending!"})
        self.assertEqual(errors.take(), ["Task was destroyed but it is pending!"])

    def test_a_client_hanging_up_is_no_error(self):
        errors, front = self.front()
        front._loop_exception(None, {"message": "reset", "exception": ConnectionResetError()})
        self.assertEqual(errors.take(), [])
