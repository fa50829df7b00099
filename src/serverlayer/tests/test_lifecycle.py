"""The server core as seen through a layer: where it listens, what it
publishes, and how it starts and stops."""

from __future__ import annotations

import errno
import gc
import os
import socket
import sys
import threading
import time
import types
import unittest
import urllib.request
import warnings
from unittest import mock

import plone.testing

from serverlayer import (
    AddressInUseError,
    ConfigurationError,
    ResourceError,
    ServerSideError,
    SetUpError,
    custom,
    server,
    wsgi,
)
from serverlayer.layer import ServerLayer
from serverlayer.server import ServerThread, remembering
from serverlayer.tests.helpers import open_descriptors, reserved_port, set_up_by_hand, thread_names


def hello_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from " + environ["SERVER_PORT"].encode()]


class Hello(custom.RequestHandler):
    def do_GET(self):
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


class Running:
    """Sets a layer up for the duration of a ``with`` block, for tests of
    what ``tearDown`` leaves; the block is a test of the layer, which what
    the server raised fails."""

    def __init__(self, layer: ServerLayer) -> None:
        self.layer = layer

    def __enter__(self) -> ServerLayer:
        self.layer.setUp()
        try:
            self.layer.testSetUp()
        except BaseException:
            self.layer.tearDown()
            raise
        return self.layer

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            self.layer.testTearDown()
            if exc_type is None:
                self.layer.check_server_errors()  # now: setting up again would forget them
        finally:
            self.layer.tearDown()


class WhereItListensTests(unittest.TestCase):

    def setUp(self):
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in ("SERVERLAYER_HTTP_HOST", "GOCEPT_HTTP_APP_HOST", "SERVERLAYER_HTTP_PUBLIC_HOST"):
            os.environ.pop(name, None)

    def test_binds_loopback_and_a_free_port_by_default(self):
        layer = wsgi.Layer(hello_app, name="default_address")
        set_up_by_hand(self, layer)
        self.assertEqual(layer["http_host"], "127.0.0.1")
        self.assertEqual(layer["httpd"].socket.getsockname()[0], "127.0.0.1")
        port = layer["http_port"]
        self.assertIsInstance(port, int)
        self.assertNotEqual(port, 0)
        self.assertEqual(layer["http_address"], f"127.0.0.1:{port}")
        self.assertEqual(layer["http_url"], f"http://127.0.0.1:{port}/")
        self.assertEqual(fetch(layer["http_url"]), f"hello from {port}".encode())

    def test_publishes_the_server_and_its_named_thread(self):
        layer = custom.Layer(Hello, name="server_and_thread")
        set_up_by_hand(self, layer)
        self.assertIs(layer["httpd_thread"].daemon, True)
        self.assertTrue(layer["httpd_thread"].is_alive())
        self.assertIn("server_and_thread", layer["httpd_thread"].name)
        self.assertEqual(layer["httpd"].socket.getsockname()[1], layer["http_port"])

    def test_ipv6_address_is_bracketed(self):
        layer = wsgi.Layer(hello_app, name="ipv6", host="::1")
        set_up_by_hand(self, layer)
        port = layer["http_port"]
        self.assertEqual(layer["http_host"], "::1")
        self.assertEqual(layer["http_address"], f"[::1]:{port}")
        self.assertEqual(fetch(layer["http_url"]), f"hello from {port}".encode())

    def test_host_from_environment(self):
        os.environ["SERVERLAYER_HTTP_HOST"] = "localhost"
        layer = wsgi.Layer(hello_app, name="host_from_environment")
        set_up_by_hand(self, layer)
        self.assertEqual(layer["http_host"], "localhost")
        self.assertEqual(fetch(layer["http_url"]), f"hello from {layer['http_port']}".encode())

    def test_gocept_host_variable_is_honoured(self):
        os.environ["GOCEPT_HTTP_APP_HOST"] = "localhost"
        layer = wsgi.Layer(hello_app, name="gocept_host")  # gocept read it in its wsgi layer only
        set_up_by_hand(self, layer)
        self.assertEqual(layer["http_host"], "localhost")
        self.assertEqual(fetch(layer["http_url"]), f"hello from {layer['http_port']}".encode())

    def test_keyword_beats_environment(self):
        os.environ["SERVERLAYER_HTTP_HOST"] = "localhost"
        layer = wsgi.Layer(hello_app, name="keyword_beats_environment", host="127.0.0.1")
        set_up_by_hand(self, layer)
        self.assertEqual(layer["http_host"], "127.0.0.1")

    def test_fixed_port(self):
        free_port = reserved_port(self)
        layer = wsgi.Layer(hello_app, name="fixed_port", port=free_port)
        set_up_by_hand(self, layer)
        self.assertEqual(layer["http_port"], free_port)
        self.assertEqual(fetch(layer["http_url"]), f"hello from {free_port}".encode())

    def test_fixed_port_is_set_up_again_right_after_tear_down(self):
        """The server closed a connection first, so the port has a
        connection in TIME_WAIT: setting up on it again at once works."""
        free_port = reserved_port(self)
        layer = custom.Layer(Hello, name="fixed_port_again", port=free_port)
        for _ in range(2):
            with Running(layer):
                with socket.create_connection(("127.0.0.1", free_port), timeout=5) as client:
                    client.sendall(b"GET / HTTP/1.0\r\n\r\n")  # HTTP/1.0: the server closes first
                    answer = b""
                    while chunk := client.recv(4096):
                        answer += chunk
                self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer)
                self.assertTrue(answer.endswith(b"hello"), answer)

    def test_host_and_port_preset_by_a_base_layer(self):
        free_port = reserved_port(self)

        class Preset(plone.testing.Layer):
            def setUp(self):
                self["http_host"] = "localhost"
                self["http_port"] = free_port

            def tearDown(self):
                del self["http_host"]
                del self["http_port"]

        preset = Preset(name="preset")
        layer = wsgi.Layer(hello_app, name="uses_preset", bases=(preset,))
        set_up_by_hand(self, preset)
        with Running(layer):
            self.assertEqual(layer["http_host"], "localhost")
            self.assertEqual(layer["http_port"], free_port)
            self.assertEqual(layer["http_address"], f"localhost:{free_port}")
            self.assertEqual(fetch(layer["http_url"]), f"hello from {free_port}".encode())
        # The preset shows through again once our layer is gone.
        self.assertEqual(layer["http_host"], "localhost")

    def test_a_server_layer_below_is_no_preset(self):
        below = custom.Layer(Hello, name="server_below")
        above = wsgi.Layer(hello_app, name="server_above", bases=(below,))
        with Running(below):
            below_port = below["http_port"]
            with Running(above):
                # plone.testing stacks resources: the upper layer shadows.
                self.assertNotEqual(above["http_port"], below_port)
                self.assertEqual(fetch(above["http_url"]), f"hello from {above['http_port']}".encode())
                self.assertEqual(fetch(f"http://127.0.0.1:{below_port}/"), b"hello")
            self.assertEqual(below["http_port"], below_port)
        self.assertNotIn("http_port", above)

    def test_remote_browser_setup_binds_one_address_and_publishes_another(self):
        layer = wsgi.Layer(hello_app, name="public_host", host="0.0.0.0", public_host="app.example.test")
        set_up_by_hand(self, layer)
        self.assertEqual(layer["httpd"].socket.getsockname()[0], "0.0.0.0")
        self.assertEqual(layer["http_host"], "app.example.test")
        port = layer["http_port"]
        self.assertEqual(layer["http_url"], f"http://app.example.test:{port}/")
        self.assertEqual(fetch(f"http://127.0.0.1:{port}/"), f"hello from {port}".encode())

    def test_public_host_from_environment(self):
        os.environ["SERVERLAYER_HTTP_PUBLIC_HOST"] = "grid-client.example.test"
        layer = custom.Layer(Hello, name="public_host_environment")
        set_up_by_hand(self, layer)
        self.assertEqual(layer["http_host"], "grid-client.example.test")
        self.assertEqual(layer["httpd"].socket.getsockname()[0], "127.0.0.1")


class BadAddressTests(unittest.TestCase):

    def test_busy_fixed_port_fails_at_once_naming_host_port_and_source(self):
        with socket.socket() as occupier:
            occupier.bind(("127.0.0.1", 0))
            occupier.listen()
            port = occupier.getsockname()[1]
            layer = wsgi.Layer(hello_app, name="busy_port", port=port)
            started = time.monotonic()
            with self.assertRaises(AddressInUseError) as caught:
                layer.setUp()
            self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(
            str(caught.exception),
            f"{layer!r}: cannot listen on 127.0.0.1:{port} (host from the default host, port from port=):"
            " the port is already in use. Stop whatever listens there, choose another port, or use port 0"
            " to let the system pick a free one.",
        )
        self.assertEqual(caught.exception.__cause__.errno, errno.EADDRINUSE)
        self.assertNotIn("http_port", layer)
        layer.tearDown()  # harmless after a failed setUp
        with self.assertRaises(ResourceError) as missing:
            layer["http_url"]
        self.assertIn("busy_port> is not set up", str(missing.exception))  # it never was

    def test_busy_port_preset_by_environment_names_the_variable(self):
        with socket.socket() as occupier, mock.patch.dict(os.environ, {"SERVERLAYER_HTTP_HOST": "127.0.0.1"}):
            occupier.bind(("127.0.0.1", 0))
            occupier.listen()
            layer = custom.Layer(Hello, name="busy_from_env", port=occupier.getsockname()[1])
            with self.assertRaises(AddressInUseError) as caught:
                layer.setUp()
        self.assertIn("$SERVERLAYER_HTTP_HOST", str(caught.exception))

    def test_addresses_that_cannot_be_listened_on_say_what_to_use(self):
        for host, hint in (
            ("192.0.2.1", "This machine has no such address: use 127.0.0.1, ::1, or an address it has."),
            ("fe80::1", "A link-local address needs its interface, as in fe80::1%lo"),
            ("::ffff:127.0.0.1", "That is an IPv4 address written as IPv6: use 127.0.0.1."),
        ):
            with self.subTest(host=host):
                layer = wsgi.Layer(hello_app, name=f"unlistenable_{len(hint)}", host=host)
                with self.assertRaises(SetUpError) as caught:
                    layer.setUp()
                message = str(caught.exception)
                self.assertIn(f"{server.format_address(host, 0)} (any free port)", message)
                self.assertIn(hint, message)

    def test_unresolvable_host(self):
        layer = wsgi.Layer(hello_app, name="unresolvable", host="no-such-host.invalid")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("no-such-host.invalid", str(caught.exception))
        self.assertIn("host=", str(caught.exception))

    def test_a_host_written_as_a_url_writes_it_is_explained(self):
        # The generic "Use an IP address such as 127.0.0.1 or ::1, or a
        # name that this machine resolves" puzzled whoever wrote a name the
        # machine does resolve, with a port or a scheme, as in a URL.
        for number, (host, hint) in enumerate((
            ("[::1]", "without brackets: '::1'"),
            ("localhost:8080", "port=8080, and the host alone: 'localhost'"),
            ("127.0.0.1:8080", "port=8080, and the host alone: '127.0.0.1'"),
            ("[::1]:8080", "port=8080, and the host alone: '::1'"),
            ("http://localhost:8080/", "the host alone: 'localhost'"),
            ("", "'0.0.0.0'"),
        )):
            with self.subTest(host=host):
                layer = wsgi.Layer(hello_app, name=f"url_like_host_{number}", host=host)
                with self.assertRaises(ConfigurationError) as caught:
                    layer.setUp()
                message = str(caught.exception)
                self.assertIn(f"cannot listen on host {host!r}", message)
                self.assertIn(hint, message)

    def test_a_host_that_is_no_text_is_refused_saying_so(self):
        # A socketserver address, or bytes: a TypeError from getaddrinfo
        # ("argument 1 must be string or None") named neither setting nor layer.
        for setting in ("host", "public_host"):
            for value in (("127.0.0.1", 8080), b"127.0.0.1", 127001):
                with self.subTest(setting=setting, value=value):
                    with self.assertRaises(ConfigurationError) as caught:
                        wsgi.Layer(hello_app, name="host_of_no_text", **{setting: value})
                    message = str(caught.exception)
                    self.assertIn(f"{setting}={value!r} must be a host name or IP address as a str", message)

    def test_tls_keyword_beats_the_class_attribute(self):
        class PlainByDefault(wsgi.Layer):
            tls = False

        class TLSByDefault(wsgi.Layer):
            tls = True

        https = set_up_by_hand(self, PlainByDefault(hello_app, name="tls_by_keyword", tls=True))
        plain = set_up_by_hand(self, TLSByDefault(hello_app, name="plain_by_keyword", tls=False))
        self.assertTrue(https["http_url"].startswith("https://"), https["http_url"])
        with urllib.request.urlopen(https["http_url"], timeout=5, context=https["ssl_context"]) as response:
            self.assertEqual(response.read(), f"hello from {https['http_port']}".encode())
        self.assertTrue(plain["http_url"].startswith("http://"), plain["http_url"])
        self.assertEqual(fetch(plain["http_url"]), f"hello from {plain['http_port']}".encode())

    def test_wsgi_threads_at_least_one(self):
        self.assertEqual(wsgi.Layer(hello_app, name="one_thread", threads=1).threads, 1)
        with self.assertRaises(ConfigurationError) as caught:
            wsgi.Layer(hello_app, name="no_threads", threads=0)
        self.assertIn("threads=0 must be a whole number of at least 1", str(caught.exception))

    def test_port_numbers_at_the_bounds(self):
        self.assertEqual(wsgi.Layer(hello_app, name="highest_port", port=65535).port, 65535)
        self.assertEqual(wsgi.Layer(hello_app, name="highest_port_text", port="65535").port, 65535)
        layer = set_up_by_hand(self, wsgi.Layer(hello_app, name="port_zero", port=0))
        self.assertNotEqual(layer["http_port"], 0)  # the system picked one
        self.assertEqual(fetch(layer["http_url"]), f"hello from {layer['http_port']}".encode())

    def test_bad_port_number(self):
        for bad in (-1, 65536, "http", 1.5, True):
            with self.subTest(port=bad):
                with self.assertRaises(ConfigurationError) as caught:
                    wsgi.Layer(hello_app, name=f"bad_port_{bad!r}", port=bad)
                self.assertIn("not a port number", str(caught.exception))
                self.assertIn(repr(bad), str(caught.exception))


class RaisesAfterAnswering(Hello):
    def do_GET(self):
        super().do_GET()
        raise RuntimeError("raised on purpose after answering")


class OutsideARunningTestTests(unittest.TestCase):

    def test_test_tear_down_reports_what_the_server_raised(self):
        """Driven where no test is running (a script, a thread of its own),
        the layer has no test to hand its end-of-test check to, so
        ``testTearDown`` checks itself."""
        layer = custom.Layer(RaisesAfterAnswering, name="outside_a_test")
        outcome: list[object] = []

        def drive() -> None:
            layer.setUp()
            try:
                layer.testSetUp()
                outcome.append(fetch(layer["http_url"]))
                try:
                    layer.testTearDown()
                except ServerSideError as error:
                    outcome.append(error)
            finally:
                layer.tearDown()

        thread = threading.Thread(target=drive, name="outside_a_test driver")
        thread.start()
        thread.join(10)
        self.assertFalse(thread.is_alive())
        self.assertEqual(len(outcome), 2, outcome)
        self.assertEqual(outcome[0], b"hello")
        self.assertIn("RuntimeError: raised on purpose after answering", str(outcome[1]))


class WithBlockTests(unittest.TestCase):
    """``with layer:`` checks the server's errors as a test's end does."""

    def test_a_block_that_fails_keeps_its_own_error_with_the_servers_as_a_note(self):
        class RaisesLater(Hello):
            def do_GET(self):
                super().do_GET()
                time.sleep(0.2)  # still at work when the block ends
                raise RuntimeError("raised on purpose after answering")

        layer = custom.Layer(RaisesLater, name="with_block_fails")
        with self.assertRaises(KeyError) as raised:  # the block's error, not the server's
            with layer:
                fetch(layer["http_url"])
                raise KeyError("the block's own")
        self.assertEqual(raised.exception.args, ("the block's own",))
        if sys.version_info < (3, 11):  # no notes: the block's error alone
            return
        [note] = raised.exception.__notes__  # often the reason the block failed
        self.assertIn("RuntimeError: raised on purpose after answering", note)
        self.assertNotIn("http_port", layer)  # torn down all the same

    def test_a_block_that_passes_gets_the_servers_error(self):
        layer = custom.Layer(RaisesAfterAnswering, name="with_block_passes")
        with self.assertRaises(ServerSideError) as raised:
            with layer:
                fetch(layer["http_url"])
        self.assertIn("made by this test", str(raised.exception))  # not "after the layer's last test"
        self.assertNotIn("http_port", layer)


class TearDownTests(unittest.TestCase):

    def test_deletes_every_resource_it_set(self):
        layer = wsgi.Layer(hello_app, name="deletes_resources")
        with Running(layer):
            keys = {"http_host", "http_port", "http_address", "http_url", "httpd", "httpd_thread"}
            self.assertTrue(keys <= set(layer._resources))
        self.assertEqual(layer._resources, {})

    def test_twice_is_harmless(self):
        layer = custom.Layer(Hello, name="teardown_twice")
        layer.setUp()
        layer.tearDown()
        layer.tearDown()
        self.assertNotIn("http_port", layer)

    def test_setup_twice_without_teardown_is_refused(self):
        layer = custom.Layer(Hello, name="setup_twice")
        with Running(layer):
            port = layer["http_port"]
            with self.assertRaises(SetUpError):
                layer.setUp()
            self.assertEqual(layer["http_port"], port)
            self.assertEqual(fetch(layer["http_url"]), b"hello")

    def test_an_asyncio_server_runs_its_loop_once_to_start_and_once_to_close(self):
        # Each run_until_complete costs a task and two turns of the loop:
        # a noticeable part of a setUp that takes half a millisecond.
        import asyncio

        from serverlayer import smtp

        runs = []
        run_until_complete = asyncio.BaseEventLoop.run_until_complete

        def counting(loop, future):
            if "one_loop_run_each" in threading.current_thread().name:  # this layer's loop only
                runs.append(future)
            return run_until_complete(loop, future)

        layer = smtp.Layer(name="one_loop_run_each", host="127.0.0.1")
        with mock.patch.object(asyncio.BaseEventLoop, "run_until_complete", counting):
            layer.setUp()
            started = len(runs)
            layer.tearDown()
        self.assertEqual((started, len(runs) - started), (1, 1), runs)

    def test_one_layer_survives_many_cycles_on_new_ports(self):
        layer = wsgi.Layer(hello_app, name="many_cycles")
        for _ in range(3):
            with Running(layer):
                self.assertEqual(fetch(layer["http_url"]), f"hello from {layer['http_port']}".encode())

    def test_idle_keep_alive_client_does_not_delay_stop(self):
        import http.client
        for layer in (wsgi.Layer(hello_app, name="idle_wsgi"), custom.Layer(KeepAliveHello, name="idle_custom")):
            with self.subTest(layer=layer):
                layer.setUp()
                layer.testSetUp()
                connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
                connection.request("GET", "/")
                connection.getresponse().read()
                layer.check_server_errors()
                started = time.monotonic()
                layer.tearDown()
                self.assertLess(time.monotonic() - started, 0.5)
                connection.close()

    def test_slow_request_does_not_hang_stop(self):
        import threading
        entered, release = threading.Event(), threading.Event()

        def slow_app(environ, start_response):
            entered.set()
            release.wait(10)
            start_response("200 OK", [])
            return [b"late"]

        layer = wsgi.Layer(slow_app, name="slow_wsgi")
        layer.stop_timeout = 0.2
        layer.setUp()
        layer.testSetUp()
        outcome: list[object] = []

        def client_fetch() -> None:
            try:
                outcome.append(fetch(layer["http_url"]))
            except OSError as error:
                outcome.append(error)

        client = threading.Thread(target=client_fetch)
        client.start()
        self.assertTrue(entered.wait(5))
        server = layer["httpd"]
        # A worker, or the acceptor, which answers a new connection's request itself.
        workers = [*server.task_dispatcher.started, *([server.acceptor] if server.acceptor else [])]
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(any(worker.is_alive() for worker in workers))
        release.set()
        client.join(5)
        for worker in workers:
            worker.join(5)
        # The abandoned request's connection was closed: its client got no answer.
        [error] = outcome
        self.assertIsInstance(error, OSError)
        layer.check_server_errors()

    def test_no_thread_or_descriptor_is_left_after_stop(self):
        threads, descriptors = thread_names(), open_descriptors()
        for layer in (wsgi.Layer(hello_app, name="leak_wsgi"), custom.Layer(Hello, name="leak_custom")):
            with Running(layer):
                fetch(layer["http_url"])
        self.assertEqual(thread_names(), threads)
        self.assertEqual(open_descriptors(), descriptors)


class KeepAliveHello(Hello):
    protocol_version = "HTTP/1.1"


class BrokenServer:
    def serve(self, ready):
        raise RuntimeError("cannot serve today")

    def request_stop(self):
        pass

    def release(self, timeout):
        pass


class RememberingSocketTests(unittest.TestCase):
    """The listening sockets of asyncio servers remember what they accept,
    to close connections still waiting to be served when the server stops."""

    def setUp(self):
        plain = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.listening = remembering(plain)
        self.addCleanup(self.listening.close)
        self.clients = []

        def close_all():
            for each in self.clients + list(self.listening.accepted):
                each.close()

        self.addCleanup(close_all)

    def accept_one(self):
        self.clients.append(socket.create_connection(self.listening.getsockname()[:2], timeout=5))
        connection, _ = self.listening.accept()
        return connection

    def test_each_accept_costs_the_same_however_many_are_open(self):
        # It used to look at every connection it remembered on each accept:
        # 200 open connections, some 20,000 looks.
        looks = []
        fileno = socket.socket.fileno

        def counting(sock):
            looks.append(sock)
            return fileno(sock)

        with mock.patch.object(socket.socket, "fileno", counting):
            for _ in range(200):
                self.accept_one()
        self.assertLess(len(looks), 4 * 200)
        self.assertEqual(len(self.listening.accepted), 200)  # all open, all remembered

    def test_forgets_closed_connections_and_keeps_open_ones(self):
        kept = [self.accept_one() for _ in range(10)]
        for _ in range(3 * server.PRUNE_AT_LEAST):
            self.accept_one().close()
        accepted = self.listening.accepted
        self.assertTrue(set(kept) <= accepted)
        self.assertLessEqual(len(accepted), 2 * len(kept) + server.PRUNE_AT_LEAST)


class ServerThreadTests(unittest.TestCase):

    def test_error_before_ready_surfaces_in_start(self):
        running = ServerThread(BrokenServer(), name="broken")
        with self.assertRaises(SetUpError) as caught:
            running.start(owner="<the broken layer>")
        self.assertIn("cannot serve today", str(caught.exception))
        self.assertIn("<the broken layer>", str(caught.exception))
        self.assertIsInstance(caught.exception.__cause__, RuntimeError)
        self.assertFalse(running.thread.is_alive())

    def test_tls_layer_setup_failure_closes_both_sockets(self):
        class BrokenBehindTLS(wsgi.Layer):
            def make_server(self, sockets):
                self.made_with = sockets
                raise RuntimeError("cannot make the server behind TLS")

        set_up_by_hand(self, wsgi.Layer(hello_app, name="tls_made_once", tls=True))  # the CA exists from here
        descriptors, threads = open_descriptors(), thread_names()
        layer = BrokenBehindTLS(hello_app, name="broken_behind_tls", tls=True)
        with self.assertRaises(RuntimeError):
            layer.setUp()
        self.assertEqual([sock.fileno() for sock in layer.made_with], [-1])
        self.assertEqual(open_descriptors(), descriptors)
        self.assertEqual(thread_names(), threads)
        layer.tearDown()

    def test_tls_layer_whose_server_behind_fails_closes_every_socket(self):
        """The front's own loop never ran: its listening sockets are closed
        by the front, not left to asyncio."""
        class FailsBehindTLS(wsgi.Layer):
            def make_server(self, sockets):
                self.made_with = sockets
                return BrokenServer()

        set_up_by_hand(self, wsgi.Layer(hello_app, name="tls_made_first", tls=True))  # the CA exists from here
        descriptors, threads = open_descriptors(), thread_names()
        layer = FailsBehindTLS(hello_app, name="fails_behind_tls", tls=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with self.assertRaises(SetUpError) as raised:
                layer.setUp()
            gc.collect()  # a socket left for the collector would warn now
        self.assertIn("cannot serve today", str(raised.exception))
        self.assertEqual([str(warning.message) for warning in caught], [])
        self.assertEqual([sock.fileno() for sock in layer.made_with], [-1])
        self.assertEqual(open_descriptors(), descriptors)
        self.assertEqual(thread_names(), threads)
        layer.tearDown()

    def test_layer_setup_failure_closes_the_socket(self):
        class BrokenLayer(ServerLayer):
            resource_prefix = "http"
            server_resource = "httpd"

            def make_server(self, sockets):
                self.sockets = sockets
                return BrokenServer()

        descriptors, threads = open_descriptors(), thread_names()
        layer = BrokenLayer(name="broken_layer")
        with self.assertRaises(SetUpError):
            layer.setUp()
        self.assertEqual(layer._resources, {})
        self.assertEqual([sock.fileno() for sock in layer.sockets], [-1])
        self.assertEqual(open_descriptors(), descriptors)
        self.assertEqual(thread_names(), threads)


class MistakesTests(unittest.TestCase):
    """What a newcomer gets wrong first is refused in words that say what to write."""

    def test_a_name_passed_where_bases_go(self):
        from serverlayer import content, static

        for make in (
            lambda: wsgi.Layer(Running, "HELLO"),
            lambda: custom.Layer(Hello, "HELLO"),
            lambda: static.Layer(None, "HELLO"),
            lambda: content.Layer(bases="HELLO"),
        ):
            with self.assertRaises(ConfigurationError) as refused:
                make()
            self.assertIn("bases='HELLO' is a string", str(refused.exception))
            self.assertIn("write name='HELLO'", str(refused.exception))

    def test_one_layer_as_bases(self):
        base = plone.testing.Layer(name="ONE_BASE")
        with self.assertRaises(ConfigurationError) as refused:
            custom.Layer(Hello, bases=base, name="ON_ONE_BASE")
        self.assertIn("is one layer; give a sequence: bases=(", str(refused.exception))
        with self.assertRaises(ConfigurationError) as refused:
            custom.Layer(Hello, bases=[base, "other"], name="ON_A_STRING")
        self.assertIn("'other' in bases= is not a layer", str(refused.exception))
        layer = custom.Layer(Hello, bases=[base], name="ON_A_LIST")  # any sequence of layers
        self.assertEqual(layer.__bases__, (base,))

    def test_switches_are_true_or_false(self):
        from serverlayer import smtp

        for make, setting in [
            (lambda: custom.Layer(Hello, name="TLS_NO", tls="no"), "tls='no'"),
            (lambda: custom.Layer(Hello, name="REPORT_0", report_server_errors=0), "report_server_errors=0"),
            (lambda: smtp.Layer(name="STARTTLS_YES", starttls="yes"), "starttls='yes'"),
            (lambda: smtp.Layer(name="LMTP_1", lmtp=1), "lmtp=1"),
        ]:
            with self.subTest(setting), self.assertRaises(ConfigurationError) as refused:
                make()
            self.assertIn(f"{setting} must be True or False", str(refused.exception))

    def test_timeouts_as_keywords(self):
        layer = custom.Layer(Hello, name="TIMEOUTS", stop_timeout=2, quiet_timeout=0.25)
        self.assertEqual((layer.stop_timeout, layer.quiet_timeout), (2.0, 0.25))
        for value in (0, -1, "1", float("nan"), float("inf"), True):
            with self.subTest(value=value), self.assertRaises(ConfigurationError) as refused:
                custom.Layer(Hello, name=f"BAD_TIMEOUT_{value}", quiet_timeout=value)
            self.assertIn(f"quiet_timeout={value!r} must be a positive number of seconds", str(refused.exception))

    def test_class_layers_of_zope_testrunner_are_bases(self):
        class Bare:  # no setUp: zope.testrunner calls what a class layer has
            __bases__ = ()

        layer = custom.Layer(Hello, bases=(Bare,), name="ON_A_CLASS_LAYER")
        self.assertEqual(layer.__bases__, (Bare,))

    def test_a_resource_of_a_layer_not_set_up(self):
        layer = custom.Layer(Hello, name="NEVER_SET_UP")
        with self.assertRaises(KeyError) as missing:  # as plone.testing's
            layer["http_url"]
        self.assertIsInstance(missing.exception, ResourceError)
        message = str(missing.exception)
        self.assertIn("NEVER_SET_UP> is not set up, so it has no 'http_url' resource yet", message)
        self.assertIn("zope-testrunner", message)
        self.assertIn("zope.pytestlayer", message)
        self.assertIsNone(layer.get("http_url"))
        self.assertNotIn("http_url", layer)

    def test_a_resource_of_a_layer_not_set_up_under_pytest(self):
        layer = custom.Layer(Hello, name="NOT_YET_UNDER_PYTEST")
        with mock.patch.dict(sys.modules, {"zope.pytestlayer": types.ModuleType("zope.pytestlayer")}):
            with self.assertRaises(ResourceError) as missing:
                layer["http_url"]
        message = str(missing.exception)
        self.assertIn("NOT_YET_UNDER_PYTEST> is not set up (yet), so it has no 'http_url' resource.", message)
        self.assertIn("after setUpClass: read resources in setUp or in the test", message)
        self.assertIn("fixture.create(LAYER, function_fixture_name='my_layer')", message)
        self.assertNotIn("installed", message)  # it is

    def test_a_resource_of_a_layer_torn_down(self):
        layer = custom.Layer(Hello, name="TORN_DOWN")
        layer.setUp()
        layer.tearDown()
        with self.assertRaises(ResourceError) as missing:
            layer["http_url"]
        self.assertEqual(str(missing.exception),
                         f"{layer!r} was torn down, so it has no 'http_url' resource any more.")

    def test_a_resource_a_layer_does_not_have(self):
        layer = set_up_by_hand(self, custom.Layer(Hello, name="NO_WS_URL"))
        with self.assertRaises(ResourceError) as missing:
            layer["ws_url"]
        self.assertIn(
            "NO_WS_URL> has no 'ws_url' resource; it has: http_address, http_host, http_port, http_requests,"
            " http_url, httpd, httpd_thread, request_handler.",
            str(missing.exception),
        )


class SecondSetUpTests(unittest.TestCase):
    """A layer set up twice without a tearDown in between refuses the second
    and keeps serving as it did: what a subclass does before the core's
    setUp (a static layer's new directory, a content layer's reset) must
    not happen either."""

    def refused(self, layer: ServerLayer) -> str:
        with self.assertRaises(SetUpError) as refused:
            layer.setUp()
        message = str(refused.exception)
        self.assertIn(repr(layer), message)
        self.assertIn("is already set up", message)
        self.assertIn("tear it down first", message)
        return message

    def test_every_kind_refuses_and_names_where_it_serves(self):
        from serverlayer import asgi, smtp, static
        from serverlayer import content as content_module

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                return

        for layer in (
            wsgi.Layer(hello_app, name="twice_wsgi"),
            custom.Layer(Hello, name="twice_custom"),
            static.Layer(name="twice_static"),
            content_module.Layer(name="twice_content"),
            asgi.Layer(app, name="twice_asgi"),
            smtp.Layer(name="twice_smtp"),
        ):
            with self.subTest(layer=layer):
                set_up_by_hand(self, layer)
                prefix = layer.resource_prefix
                self.assertIn(f"serving at {layer[f'{prefix}_address']}", self.refused(layer))

    def test_a_static_layer_keeps_serving_its_directory(self):
        from serverlayer import static

        layer = set_up_by_hand(self, static.Layer(name="twice_static_files"))
        root = layer["documentroot"]
        self.refused(layer)
        self.assertEqual(layer["documentroot"], root)
        with open(os.path.join(layer["documentroot"], "kept.txt"), "wb") as file:
            file.write(b"kept")
        self.assertEqual(fetch(layer["http_url"] + "kept.txt"), b"kept")
        layer.testTearDown()
        layer.tearDown()
        self.assertFalse(os.path.exists(root))  # the directory served is the one removed
        layer.testSetUp = layer.testTearDown = layer.tearDown = lambda: None  # done by hand here

    def test_a_content_layer_keeps_the_running_tests_routes(self):
        from serverlayer import content as content_module

        layer = set_up_by_hand(self, content_module.Layer(name="twice_content_routes"))
        layer["http_content"].route("/x").respond("programmed")
        self.refused(layer)
        self.assertEqual(fetch(layer["http_url"] + "x"), b"programmed")


class StaticRequestHandlerTests(unittest.TestCase):
    """``layer["request_handler"].documentroot`` names the directory served,
    as gocept.httpserverlayer's did, for each of several layers at once."""

    def test_each_layer_has_its_own(self):
        from serverlayer import static

        first = set_up_by_hand(self, static.Layer(name="handler_root_one"))
        second = set_up_by_hand(self, static.Layer(name="handler_root_two"))
        for layer in (first, second):
            handler = layer["request_handler"]
            self.assertEqual(handler.documentroot, layer["documentroot"])
            self.assertTrue(issubclass(handler, static.StaticFileRequestHandler))
            self.assertEqual(handler.__name__, "StaticFileHandler")
        self.assertIsNone(static.StaticFileRequestHandler.documentroot)
        handler = first["request_handler"]
        first.testTearDown()
        first.tearDown()
        self.assertIsNone(handler.documentroot)
        first.testTearDown = first.tearDown = lambda: None  # done by hand here
