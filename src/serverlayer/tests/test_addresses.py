"""A host name that resolves to several addresses is listened on at each.

On Debian and Ubuntu ``localhost`` is ``::1`` and ``127.0.0.1``; a layer
listening at only one of them refuses every client that tries the other.
These tests make up names with a patched resolver (no /etc/hosts editing),
set the layer up while the patch lasts, and then connect with real clients
and real name resolution to every address.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import smtplib
import socket
import ssl
import unittest
from collections.abc import Iterator
from typing import Any
from unittest import mock

import plone.testing

from serverlayer import AddressInUseError, SetUpError, content, custom, smtp, static, wsgi
from serverlayer import server as server_module
from serverlayer.layer import ServerLayer
from serverlayer.tests.helpers import (
    open_descriptors,
    reserved_port,
    set_up_by_hand,
    thread_names,
    without_host_variables,
)
from serverlayer.tests.test_hardening import listening_addresses
from serverlayer.tests.test_lifecycle import Hello

CLIENT_TIMEOUT = 5.0
#: How ``localhost`` resolves on a stock Debian or Ubuntu host: ``::1`` first.
DUAL = ["::1", "127.0.0.1"]


def hello_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]




class PresetHost(plone.testing.Layer):
    """Presets ``http_host`` as gocept.selenium's integration layers do."""

    def setUp(self):
        self["http_host"] = "localhost"

    def tearDown(self):
        del self["http_host"]


_real_getaddrinfo = socket.getaddrinfo


@contextlib.contextmanager
def resolving(names: dict[str, list[str]]) -> Iterator[None]:
    """Resolve each made-up name in ``names`` to its addresses, in order;
    every other name as this machine does."""

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        if host not in names:
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        answers = []
        for address in names[host]:
            for info in _real_getaddrinfo(address, port, family, type or socket.SOCK_STREAM, proto, flags):
                answers.append(info)
        return answers

    with mock.patch("socket.getaddrinfo", getaddrinfo):
        yield


def get(address: str, port: int, *, context: ssl.SSLContext | None = None) -> bytes:
    """GET / from ``address`` (an IP address, not a name) and ``port``."""
    if context is None:
        connection = http.client.HTTPConnection(address, port, timeout=CLIENT_TIMEOUT)
    else:
        connection = http.client.HTTPSConnection(address, port, timeout=CLIENT_TIMEOUT, context=context)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"GET from {address} port {port}: {response.status} {body!r}")
        return body
    finally:
        connection.close()


def send_mail(layer: ServerLayer, address: str, subject: str) -> bytes:
    """Send a message to ``address`` (TLS verifies that name); the server's EHLO reply."""
    port = layer["smtp_port"]
    client: smtplib.SMTP
    if getattr(layer, "implicit_tls", False):
        client = smtplib.SMTP_SSL(address, port, timeout=CLIENT_TIMEOUT, context=layer["ssl_context"])
    else:
        client = smtplib.SMTP(address, port, timeout=CLIENT_TIMEOUT)
    with client:
        if getattr(layer, "starttls", False):
            client.starttls(context=layer["ssl_context"])
        client.sendmail("a@example.com", ["b@example.com"], f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        return client.ehlo_resp or b""


#: Addresses reserved for documentation, which hardly any machine has.
DOCUMENTATION_ADDRESSES = ("2001:db8::1", "2001:db8::2", "192.0.2.1", "198.51.100.1", "203.0.113.1")


def lacking(count: int) -> list[str]:
    """``count`` addresses this machine does not have, so listening there
    fails as at ``::1`` where IPv6 is switched off."""
    found = []
    for address in DOCUMENTATION_ADDRESSES:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            try:
                probe.bind((address, 0))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    found.append(address)
    if len(found) < count:
        raise AssertionError(f"this machine has all but {found} of {DOCUMENTATION_ADDRESSES}; add another")
    return found[:count]


def listening_at(port: int) -> set[str]:
    """The addresses this process listens on at ``port``."""
    return {address for address, bound in listening_addresses() if bound == port}


class MadeUpNames(unittest.TestCase):
    """No host variable of the environment interferes."""

    def setUp(self):
        without_host_variables(self)

    def set_up(self, layer: ServerLayer, names: dict[str, list[str]]) -> None:
        """Set ``layer`` up while ``names`` resolve as given, for the rest
        of the test, which what its server raises fails."""
        with resolving(names):
            set_up_by_hand(self, layer)


class EveryAddressTests(MadeUpNames):

    def http_layers(self) -> dict[str, Any]:
        return {
            "wsgi": wsgi.Layer(hello_app, name="dual_wsgi", host="dual.test"),
            "custom": custom.Layer(Hello, name="dual_custom", host="dual.test"),
            "static": static.Layer(name="dual_static", host="dual.test"),
            "content": content.Layer(name="dual_content", host="dual.test"),
            "wsgi tls": wsgi.Layer(hello_app, name="dual_wsgi_tls", host="dual.test", tls=True),
            "custom tls": custom.Layer(Hello, name="dual_custom_tls", host="dual.test", tls=True),
            "content tls": content.Layer(name="dual_content_tls", host="dual.test", tls=True),
        }

    def test_every_http_layer_kind_serves_at_every_address_on_one_port(self):
        for kind, layer in self.http_layers().items():
            with self.subTest(kind=kind):
                self.set_up(layer, {"dual.test": DUAL})
                port = layer["http_port"]
                self.assertEqual(layer["http_host"], "dual.test")
                self.assertEqual(layer["http_url"], f"{layer.scheme}://dual.test:{port}/")
                if kind.startswith("static"):
                    with open(os.path.join(layer["documentroot"], "index.html"), "wb") as file:
                        file.write(b"hello")
                if kind.startswith("content"):
                    layer["http_content"].serve_content("hello")
                context = layer["ssl_context"] if layer.tls else None
                for address in DUAL:
                    self.assertEqual(get(address, port, context=context), b"hello", address)
                # The TLS layers' server behind the front still listens on 127.0.0.1 alone.
                self.assertEqual(listening_at(port), set(DUAL))

    def test_smtp_layer_receives_at_every_address_on_one_port(self):
        layers = {
            "plain": smtp.Layer(name="dual_smtp", host="dual.test"),
            "starttls": smtp.Layer(name="dual_smtp_starttls", host="dual.test", starttls=True),
            "implicit_tls": smtp.Layer(name="dual_smtp_implicit_tls", host="dual.test", implicit_tls=True),
        }
        for kind, layer in layers.items():
            with self.subTest(kind=kind):
                self.set_up(layer, {"dual.test": DUAL})
                self.assertEqual(layer["smtp_host"], "dual.test")
                for address in DUAL:
                    send_mail(layer, address, f"to {address}")
                subjects = [message["Subject"] for message in layer["outbox"].wait_for(2, timeout=CLIENT_TIMEOUT)]
                self.assertEqual(subjects, [f"to {address}" for address in DUAL])
                self.assertEqual(listening_at(layer["smtp_port"]), set(DUAL))

    def test_smtp_layer_greets_and_is_certified_as_its_host(self):
        """A mail server's greeting names its host, and a client that
        connects by the name ``smtp_host`` verifies the certificate against it."""
        layers = {
            "plain": smtp.Layer(name="named_smtp", host="mail.test"),
            "starttls": smtp.Layer(name="named_smtp_starttls", host="mail.test", starttls=True),
            "implicit_tls": smtp.Layer(name="named_smtp_implicit_tls", host="mail.test", implicit_tls=True),
        }
        for kind, layer in layers.items():
            with self.subTest(kind=kind):
                self.set_up(layer, {"mail.test": DUAL})
                self.assertEqual(layer["smtp_host"], "mail.test")
                with resolving({"mail.test": DUAL}):
                    reply = send_mail(layer, "mail.test", kind)
                self.assertEqual(reply.split(b"\n")[0], b"mail.test")
                self.assertEqual([message["Subject"] for message in layer["outbox"]], [kind])

    def test_an_ipv6_socket_leaves_ipv4_to_a_socket_of_its_own(self):
        """Without IPV6_V6ONLY a socket at ``::`` would take the port at
        0.0.0.0 as well, and a wildcard host, which names both, would fail
        with "address in use" at its second address. Tests listen on
        loopback only, where Linux sets the option by itself as it binds:
        this checks the socket before that."""
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            server_module._set_listening_options(sock)
            self.assertEqual(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)

    def test_the_ipv6_wildcard_alone_listens_on_ipv4_too(self):
        """``host="::"`` is every interface, and the layer publishes this
        machine's name, which most often resolves to IPv4 alone. IPv4 gets
        a socket of its own, so that the application sees its clients'
        addresses as IPv4 ones. Checked before binding: tests listen on
        loopback only."""
        def resolved(host):
            return [address[3][0] for address in server_module.resolve(host, 0, owner="a layer", source="a test")]

        self.assertEqual(resolved("::"), ["::", "0.0.0.0"])
        for host in ("::1", "127.0.0.1", "0.0.0.0"):
            with self.subTest(host):
                self.assertEqual(resolved(host), [host])

    def test_a_link_local_address_keeps_its_interface(self):
        """Tests listen on loopback only, and ``fe80::`` addresses are not;
        this checks what would be bound."""
        link_local = (socket.AF_INET6, socket.SOCK_STREAM, 6, ("fe80::1", 0, 0, 3))
        self.assertEqual(server_module._bind_address(link_local, 8080), ("fe80::1", 8080, 0, 3))
        ipv4 = (socket.AF_INET, socket.SOCK_STREAM, 6, ("127.0.0.1", 0))
        self.assertEqual(server_module._bind_address(ipv4, 8080), ("127.0.0.1", 8080))

    def test_localhost_as_debian_resolves_it_reaches_clients_of_either_address(self):
        # The reported case: GOCEPT_HTTP_APP_HOST=localhost, and a client
        # that connects to 127.0.0.1 while localhost is ::1 first.
        os.environ["GOCEPT_HTTP_APP_HOST"] = "localhost"
        layer = wsgi.Layer(hello_app, name="debian_localhost")
        self.set_up(layer, {"localhost": DUAL})
        port = layer["http_port"]
        self.assertEqual(layer["http_host"], "localhost")
        self.assertEqual(layer["http_address"], f"localhost:{port}")
        self.assertEqual(get("127.0.0.1", port), b"hello")
        self.assertEqual(get("::1", port), b"hello")

    def test_localhost_preset_by_a_base_layer_as_gocept_selenium_does(self):
        base = PresetHost(name="preset_localhost")
        layer = custom.Layer(Hello, name="on_preset_localhost", bases=[base])
        set_up_by_hand(self, base)
        self.set_up(layer, {"localhost": DUAL})
        self.assertEqual(layer["http_host"], "localhost")
        for address in DUAL:
            self.assertEqual(get(address, layer["http_port"]), b"hello")

    def test_ipv4_first_order_works_too(self):
        layer = custom.Layer(Hello, name="ipv4_first", host="dual.test")
        self.set_up(layer, {"dual.test": ["127.0.0.1", "::1"]})
        for address in DUAL:
            self.assertEqual(get(address, layer["http_port"]), b"hello")

    def test_an_address_named_twice_is_listened_on_once(self):
        layer = wsgi.Layer(hello_app, name="named_twice", host="twice.test")
        self.set_up(layer, {"twice.test": ["127.0.0.1", "::1", "127.0.0.1", "::1"]})
        port = layer["http_port"]
        self.assertEqual(listening_at(port), set(DUAL))
        self.assertEqual(len([1 for _, bound in listening_addresses() if bound == port]), 2)
        self.assertEqual(get("127.0.0.1", port), b"hello")

    def test_an_ipv4_only_machine_listens_at_its_one_address(self):
        layer = wsgi.Layer(hello_app, name="ipv4_only", host="v4only.test")
        self.set_up(layer, {"v4only.test": ["127.0.0.1"]})
        self.assertEqual(listening_at(layer["http_port"]), {"127.0.0.1"})
        self.assertEqual(get("127.0.0.1", layer["http_port"]), b"hello")

    def test_an_address_this_machine_lacks_is_left_out(self):
        # As ::1 is where IPv6 is switched off but /etc/hosts still names it.
        [missing] = lacking(1)
        layer = custom.Layer(Hello, name="lacking_one", host="stale.test")
        self.set_up(layer, {"stale.test": [missing, "127.0.0.1"]})
        self.assertEqual(listening_at(layer["http_port"]), {"127.0.0.1"})
        self.assertEqual(get("127.0.0.1", layer["http_port"]), b"hello")

    def test_a_name_of_only_addresses_this_machine_lacks_fails_clearly(self):
        missing = lacking(2)
        layer = custom.Layer(Hello, name="lacking_all", host="gone.test")
        self.addCleanup(layer.tearDown)
        with resolving({"gone.test": missing}), self.assertRaises(SetUpError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn(missing[0], message)
        self.assertIn("'gone.test'", message)
        self.assertIn("lacking_all", message)
        self.assertIn("Cannot assign requested address", message)

    def test_the_real_localhost_of_this_machine(self):
        expected = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
        layer = set_up_by_hand(self, wsgi.Layer(hello_app, name="real_localhost", host="localhost"))
        port = layer["http_port"]
        self.assertEqual(listening_at(port), expected)
        for address in expected:
            self.assertEqual(get(address, port), b"hello", address)

    def test_tear_down_closes_every_socket_and_thread(self):
        for layer in (
            wsgi.Layer(hello_app, name="closing_wsgi", host="dual.test"),
            custom.Layer(Hello, name="closing_custom", host="dual.test", tls=True),
            smtp.Layer(name="closing_smtp", host="dual.test"),
        ):
            with self.subTest(layer=layer):
                descriptors, threads = open_descriptors(), thread_names()
                with resolving({"dual.test": DUAL}):
                    layer.setUp()
                port = layer[f"{layer.resource_prefix}_port"]
                self.assertEqual(listening_at(port), set(DUAL))
                layer.tearDown()
                self.assertEqual(listening_at(port), set())
                self.assertEqual(open_descriptors(), descriptors)
                self.assertEqual(thread_names(), threads)


class BusyPortTests(MadeUpNames):

    def occupy(self, address: str) -> int:
        """Listen at ``address`` for the rest of the test; the port, which
        is free at the other loopback address (not some client's port)."""
        other = "127.0.0.1" if ":" in address else "::1"
        for _ in range(20):  # bounded: another program may take a port in between
            with self.listener(other, 0) as reserved:  # free there while held
                port = int(reserved.getsockname()[1])
                try:
                    occupier = self.listener(address, port)
                except OSError:
                    continue
            self.addCleanup(occupier.close)
            return port
        self.fail(f"found no port free at both {address} and {other}")

    @staticmethod
    def listener(address: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        try:
            if ":" in address:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen()
        except BaseException:
            sock.close()
            raise
        return sock

    def picking(self, port: int, times: int) -> list[int]:
        """Patch ``bind`` so that the system's first ``times`` picks are
        ``port``; the ports it asked to listen on, as they happen."""
        real_listen = server_module._listen
        asked: list[int] = []

        def listen(address: Any, wanted: int) -> socket.socket:
            asked.append(wanted)
            if wanted == 0 and asked.count(0) <= times:
                wanted = port
            return real_listen(address, wanted)

        patcher = mock.patch.object(server_module, "_listen", listen)
        patcher.start()
        self.addCleanup(patcher.stop)
        return asked

    def test_port_taken_at_another_address_makes_the_system_pick_again(self):
        taken = self.occupy("::1")  # and free at 127.0.0.1
        asked = self.picking(taken, times=2)
        layer = wsgi.Layer(hello_app, name="picks_again", host="dual.test")
        self.set_up(layer, {"dual.test": ["127.0.0.1", "::1"]})
        port = layer["http_port"]
        self.assertNotEqual(port, taken)
        self.assertEqual(asked, [0, taken, 0, taken, 0, port])  # two collisions, then a port free at both
        self.assertEqual(listening_at(port), set(DUAL))
        self.assertEqual(listening_at(taken), {"::1"})  # the occupier alone
        for address in DUAL:
            self.assertEqual(get(address, port), b"hello")

    def test_picking_again_is_bounded_and_names_every_address(self):
        taken = self.occupy("::1")
        asked = self.picking(taken, times=1000)
        descriptors = open_descriptors()
        layer = custom.Layer(Hello, name="always_taken", host="dual.test")
        with resolving({"dual.test": ["127.0.0.1", "::1"]}), self.assertRaises(AddressInUseError) as caught:
            layer.setUp()
        self.assertEqual(asked.count(0), server_module.BIND_ATTEMPTS)
        message = str(caught.exception)
        self.assertIn("always_taken", message)
        self.assertIn("every address of 'dual.test' ('dual.test' is 127.0.0.1 and ::1;", message)
        self.assertIn(f"{server_module.BIND_ATTEMPTS} times", message)
        self.assertIn("port from port 0", message)
        self.assertNotIn("http_port", layer)
        self.assertEqual(listening_at(taken), {"::1"})
        self.assertEqual(open_descriptors(), descriptors)
        layer.tearDown()

    def test_another_bind_error_at_a_later_address_fails_at_once(self):
        """Only "in use" makes the system pick a port again; any other
        error at a later address ends setUp with that error."""
        real_listen = server_module._listen
        asked: list[tuple[str, int]] = []

        def listen(address: Any, wanted: int) -> socket.socket:
            asked.append((address[3][0], wanted))
            if address[3][0] == "::1":
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_listen(address, wanted)

        descriptors = open_descriptors()
        layer = wsgi.Layer(hello_app, name="denied_at_one", host="dual.test")
        with mock.patch.object(server_module, "_listen", listen), resolving({"dual.test": ["127.0.0.1", "::1"]}):
            with self.assertRaises(SetUpError) as caught:
                layer.setUp()
        self.assertNotIsInstance(caught.exception, AddressInUseError)
        [(first, zero), (second, picked)] = asked
        self.assertEqual((first, zero, second), ("127.0.0.1", 0, "::1"))
        self.assertEqual(
            str(caught.exception),
            f"{layer!r}: cannot listen on [::1]:{picked} ('dual.test' is 127.0.0.1 and ::1;"
            " host from host=, port from port 0): Permission denied.",
        )
        self.assertEqual(open_descriptors(), descriptors)
        layer.tearDown()

    def test_fixed_port_busy_at_one_address_fails_at_once(self):
        port = self.occupy("::1")
        descriptors = open_descriptors()
        layer = wsgi.Layer(hello_app, name="fixed_busy", host="dual.test", port=port)
        with resolving({"dual.test": ["127.0.0.1", "::1"]}), self.assertRaises(AddressInUseError) as caught:
            layer.setUp()
        self.assertEqual(
            str(caught.exception),
            f"{layer!r}: cannot listen on [::1]:{port} ('dual.test' is 127.0.0.1 and ::1;"
            " host from host=, port from port=): the port is already"
            " in use. Stop whatever listens there, choose another port, or use port 0"
            " to let the system pick a free one.",
        )
        self.assertEqual(listening_at(port), {"::1"})  # 127.0.0.1 was let go again
        self.assertEqual(open_descriptors(), descriptors)
        layer.tearDown()

    def test_a_name_sorting_before_its_addresses_is_still_explained(self):
        port = self.occupy("::1")
        layer = wsgi.Layer(hello_app, name="digit_name_busy", host="0.dual.test", port=port)
        with resolving({"0.dual.test": ["127.0.0.1", "::1"]}), self.assertRaises(AddressInUseError) as caught:
            layer.setUp()
        self.assertIn(f"[::1]:{port} ('0.dual.test' is 127.0.0.1 and ::1; host from host=", str(caught.exception))
        layer.tearDown()

    def test_fixed_port_free_at_every_address_is_used_at_every_address(self):
        port = reserved_port(self)  # at 127.0.0.1; ::1 is left to chance
        layer = smtp.Layer(name="fixed_free", host="dual.test", port=port)
        self.set_up(layer, {"dual.test": DUAL})
        self.assertEqual(layer["smtp_port"], port)
        self.assertEqual(listening_at(port), set(DUAL))
