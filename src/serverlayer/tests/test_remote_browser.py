"""A browser on another machine, as on a Selenium grid: level 2.

Users of gocept.selenium run their browsers on a Selenium grid: the browser
is on a node, another machine, and reaches the layers only through an
address of this machine's network interfaces, never through 127.0.0.1. A
network namespace stands in for that node: it has interfaces and a
loopback of its own, and one veth pair to this machine's namespace, with
private addresses only the test uses. chromedriver, and with it Chromium,
runs inside; the test drives it with ``selenium.webdriver.Remote`` over the
veth pair, as it would drive a grid, and the layers bind the veth address
(``host=``) and publish it or a name (``public_host=``,
``SERVERLAYER_HTTP_PUBLIC_HOST``).

Creating namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and
iproute2's ``ip``; without them every test here is skipped and says why.
CI runs as root, installs iproute2 and sets ``SERVERLAYER_REQUIRE_GRID_NODE``,
which turns such a skip into an error: there they must run.

Run them with the other browser tests::

    zope-testrunner --test-path=src --only-level 2
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import unittest
import unittest.mock
import urllib.parse
from email.message import EmailMessage
from typing import Any, NoReturn, TypeVar

import plone.testing

from serverlayer import smtp, static, tls, wsgi
from serverlayer.tests.test_browser import (
    BROWSER_LEVEL,
    CHROMEDRIVER_CANDIDATES,
    INSTALL_HINT,
    PATIENCE,
    _find,
    _tail,
    chromium_options,
    html,
    png,
    secure_app,
    trust_in_nss,
)

#: Where the test's node addresses come from: private, and a /30 per node.
NODE_NETWORKS = ipaddress.IPv4Network("10.231.0.0/16")
#: chromedriver's port inside the node's namespace (the grid's usual port);
#: the namespace is the test's own, so nothing else can hold it.
NODE_PORT = 4444
#: The name the grid node knows this machine by, in the tests that publish
#: a name instead of the address; only the node's browser resolves it.
PUBLIC_NAME = "ci-runner.test"
#: Set (CI as root does) to fail instead of skipping where no node can be made.
REQUIRE_VARIABLE = "SERVERLAYER_REQUIRE_GRID_NODE"

_node_numbers = itertools.count(1)
LayerT = TypeVar("LayerT", bound=plone.testing.Layer)


def _ip(*arguments: str) -> str:
    """Run iproute2's ``ip``; its complaint becomes the error message."""
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout


def free_subnet() -> ipaddress.IPv4Network:
    """A /30 of ``NODE_NETWORKS`` that no route of this machine touches.

    A second veth with the same addresses (another test run at the same
    time) would make replies take either pair; the search starts at a place
    given by the process id, so parallel runs start apart.
    """
    routes = json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]")
    taken = [
        ipaddress.ip_network(route["dst"], strict=False) for route in routes if route.get("dst") != "default"
    ]
    subnets = list(NODE_NETWORKS.subnets(new_prefix=30))
    start = os.getpid() % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(network) for network in taken):
            return subnet
    raise RuntimeError(f"Every /30 of {NODE_NETWORKS} is in use on this machine.")


def unavailable(reason: str) -> NoReturn:
    """Skip the test, for lack of what a grid node needs; an error instead
    where ``$SERVERLAYER_REQUIRE_GRID_NODE`` is set (CI, as root)."""
    if os.environ.get(REQUIRE_VARIABLE):
        raise RuntimeError(f"{reason}, and ${REQUIRE_VARIABLE} is set")
    raise unittest.SkipTest(reason)


class GridNode:
    """A stand-in for a Selenium grid node on another machine.

    A context manager: entering creates a network namespace, a veth pair
    from this machine's namespace into it (``host_address`` here,
    ``node_address`` there), and starts chromedriver inside, listening on
    ``command_executor`` for this machine's address only. Leaving removes
    all of it: chromedriver and its browsers, the veth pair, the
    namespace, the temporary ``$HOME``; so does a failure half-way in.

    With ``trusted_ca``, the node's browsers trust that certificate
    authority (through the NSS database in the node's ``$HOME``), as a
    grid whose administrators installed the company's CA would.

    Where a namespace cannot be made (not root, no ``ip``), entering raises
    ``unittest.SkipTest`` with the reason.
    """

    def __init__(self, *, trusted_ca: str | None = None) -> None:
        number = next(_node_numbers)
        pid = os.getpid()
        self.name = f"serverlayer-node-{pid}-{number}"
        # Interface names have at most 15 characters.
        self.host_interface = f"slh{pid}n{number}"
        self.node_interface = f"sln{pid}n{number}"
        self.trusted_ca = trusted_ca
        self.host_address = self.node_address = ""
        self.home = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._exit = contextlib.ExitStack()

    @property
    def command_executor(self) -> str:
        """The URL a ``selenium.webdriver.Remote`` is given, as for a grid."""
        return f"http://{self.node_address}:{NODE_PORT}"

    def __enter__(self) -> GridNode:
        if os.geteuid() != 0:
            unavailable("creating a network namespace for the grid node needs root")
        if shutil.which("ip") is None:
            unavailable("no `ip` command (Debian package iproute2) to create the grid node's namespace")
        chromedriver = _find(CHROMEDRIVER_CANDIDATES, "chromedriver")
        with contextlib.ExitStack() as stack:
            try:
                _ip("netns", "add", self.name)
            except RuntimeError as error:
                unavailable(f"cannot create a network namespace for the grid node: {error}")
            stack.callback(_ip, "netns", "delete", self.name)
            subnet = free_subnet()
            host, node = list(subnet.hosts())
            self.host_address, self.node_address = str(host), str(node)
            _ip("link", "add", self.host_interface, "type", "veth",
                "peer", "name", self.node_interface, "netns", self.name)
            stack.callback(_ip, "link", "delete", self.host_interface)  # takes its peer along
            # No IPv6 link-local addresses: each would finish its duplicate
            # address detection a moment after its link comes up, which
            # Chromium, loading a page by then, reads as a network change
            # (ERR_NETWORK_CHANGED).
            _ip("link", "set", self.host_interface, "addrgenmode", "none")
            _ip("address", "add", f"{host}/{subnet.prefixlen}", "dev", self.host_interface)
            _ip("link", "set", self.host_interface, "up")
            inside = ("netns", "exec", self.name, "ip")
            _ip(*inside, "link", "set", self.node_interface, "addrgenmode", "none")
            _ip(*inside, "address", "add", f"{node}/{subnet.prefixlen}", "dev", self.node_interface)
            _ip(*inside, "link", "set", self.node_interface, "up")
            _ip(*inside, "link", "set", "lo", "up")  # chromedriver talks to Chromium over it

            self.home = tempfile.mkdtemp(prefix="serverlayer-grid-node-")
            stack.callback(shutil.rmtree, self.home, ignore_errors=True)
            if self.trusted_ca:
                trust_in_nss(self.home, self.trusted_ca)
            self._process = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.name, chromedriver,
                    f"--port={NODE_PORT}",
                    f"--allowed-ips={self.host_address}",
                    "--allowed-origins=*",
                    f"--log-path={os.path.join(self.home, 'chromedriver.log')}",
                ],
                env={**os.environ, "HOME": self.home},  # Chromium reads its NSS database there
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, browsers included
            )
            stack.callback(self._stop_chromedriver)
            self._wait_until_listening()
            self._exit = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit.close()

    def _wait_until_listening(self) -> None:
        """Read chromedriver's output until it says that it listens.

        Its log goes to a file; on stdout it only announces itself, so the
        pipe never fills up after this.
        """
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        output = b""
        deadline = time.monotonic() + PATIENCE
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"started successfully" not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise RuntimeError(f"chromedriver in {self.name} did not start within {PATIENCE} s: {output!r}")
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(
                        f"chromedriver in {self.name} exited with {self._process.wait()}: {output!r}"
                    )
                output += chunk

    def _stop_chromedriver(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # chromedriver and any browser it left
        try:
            process.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=PATIENCE)
        finally:
            assert process.stdout is not None
            process.stdout.close()

    def browser_options(self, *, resolve: dict[str, str] | None = None) -> Any:
        """Chromium's options for a session on this node: a fresh profile,
        and ``resolve`` host names to addresses (the node's DNS)."""
        options = chromium_options(tempfile.mkdtemp(prefix="session-", dir=self.home))
        if resolve:
            rules = ", ".join(f"MAP {name} {address}" for name, address in resolve.items())
            options.add_argument(f"--host-resolver-rules={rules}")
        return options

    def remote_driver(self, *, resolve: dict[str, str] | None = None) -> Any:
        """A ``selenium.webdriver.Remote`` session on this node."""
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException

        try:
            driver = webdriver.Remote(command_executor=self.command_executor, options=self.browser_options(
                resolve=resolve
            ))
        except WebDriverException as error:
            log = os.path.join(self.home, "chromedriver.log")
            raise RuntimeError(f"No browser on the grid node: {error}\nchromedriver's log ends:\n{_tail(log)}") \
                from error
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(PATIENCE)
        return driver


# The applications the node's browser uses.

CONTACT_PAGE = """
<link rel="stylesheet" href="{assets}style.css">
<script defer src="{assets}script.js"></script>
<h1 id="greeting">Contact us</h1>
<img id="logo" src="{assets}logo.png" alt="logo">
<p id="client">{client}</p>
<form method="post" action="/contact">
  <label>Name <input name="name"></label>
  <label>Message <textarea name="text"></textarea></label>
  <button type="submit">Send</button>
</form>
"""


def make_contact_app(assets_url: str, smtp_host: str, smtp_port: int):
    """A contact form whose page takes its CSS, script and image from
    ``assets_url`` and whose POST sends a mail; it shows the address the
    browser came from."""
    import smtplib

    def contact_app(environ, start_response):
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        if path == "/contact" and method == "GET":
            page = CONTACT_PAGE.format(assets=assets_url, client=environ["REMOTE_ADDR"])
            return html(start_response, "Contact", page)
        if path == "/contact" and method == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            form = urllib.parse.parse_qs(environ["wsgi.input"].read(size).decode("ascii"))
            message = EmailMessage()
            message["From"] = "website@example.com"
            message["To"] = "sales@example.com"
            message["Subject"] = f"Contact form: {form['name'][0]}"
            message.set_content(form["text"][0])
            with smtplib.SMTP(smtp_host, smtp_port) as connection:
                connection.send_message(message)
            start_response("303 See Other", [("Location", "/thanks"), ("Content-Length", "0")])
            return [b""]
        if path == "/thanks":
            return html(start_response, "Thanks", "<p id=thanks>Thank you.</p>")
        return html(start_response, "Not found", "<p>Not found</p>", "404 Not Found")

    return contact_app


ASSETS = {
    "style.css": b"#greeting { color: rgb(0, 128, 0); }",
    "script.js": b"document.body.dataset.script = 'ran';",
    "logo.png": png(3),
}

def hello_app(environ, start_response):
    return html(start_response, "Hello", f"<h1>Hello from {environ['HTTP_HOST']} to {environ['REMOTE_ADDR']}</h1>")


def page_state(driver) -> str | None:
    return driver.execute_script("return document.body && document.body.dataset.state")


def shown(driver: Any) -> str:
    """What the browser shows, for a failure message: Chromium's error
    pages name the error (``ERR_CONNECTION_RESET``) in their text."""
    text = driver.execute_script("return document.body ? document.body.innerText : ''") or ""
    return f"{driver.current_url} shows {' '.join(text.split())[:300]!r}"


def wait_until(driver: Any, condition: Any, message: str) -> Any:
    """Poll ``condition(driver)`` until it returns something true."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PATIENCE).until(condition, message)


def remote_gocept_layer(node: GridNode, *, bases: tuple[plone.testing.Layer, ...], name: str) -> Any:
    """gocept.selenium's webdriver layer, its browser on ``node``.

    gocept.selenium 7.1 has no setting for a remote WebDriver (no hub or
    command-executor variable): its ``_start_selenium`` always starts a
    browser on this machine. Overriding that one method is all a grid
    needs; the environment variables, the Selenese layer on top and the
    tear-down stay gocept.selenium's own.
    """
    try:
        import gocept.selenium.webdriver as gocept_webdriver
    except ImportError as error:
        raise RuntimeError(f"cannot import gocept.selenium. {INSTALL_HINT}") from error

    class RemoteWebdriverLayer(gocept_webdriver.Layer):  # type: ignore[misc]
        def _start_selenium(self) -> None:
            self["seleniumrc"] = node.remote_driver(resolve={PUBLIC_NAME: node.host_address})

    return RemoteWebdriverLayer(bases=bases, name=name)


class RemoteBrowserTests(unittest.TestCase):
    """Each test makes its own grid node and sets its layers up by hand:
    they bind the node-facing address, which exists only while the node
    does."""

    level = BROWSER_LEVEL

    def start_node(self, *, trusted_ca: str | None = None) -> GridNode:
        node: GridNode = self.enter(GridNode(trusted_ca=trusted_ca))
        return node

    def serve(self, layer: LayerT) -> LayerT:
        """Set ``layer`` up as zope.testrunner would, around this test."""
        layer.setUp()
        self.addCleanup(layer.tearDown)
        layer.testSetUp()
        self.addCleanup(layer.testTearDown)
        return layer

    def browser(self, node: GridNode, **kwargs: Any) -> Any:
        driver = node.remote_driver(**kwargs)
        self.addCleanup(driver.quit)
        return driver

    def test_a_page_with_assets_and_a_form_that_sends_mail(self):
        node = self.start_node()
        assets = self.serve(static.Layer(name="REMOTE_ASSETS", host=node.host_address))
        for name, data in ASSETS.items():
            with open(os.path.join(assets["documentroot"], name), "wb") as file:
                file.write(data)
        mail = self.serve(smtp.Layer(name="REMOTE_MAIL"))  # the app runs here: loopback will do
        app = make_contact_app(assets["http_url"], mail["smtp_host"], mail["smtp_port"])
        http = self.serve(wsgi.Layer(app, name="REMOTE_CONTACT", host=node.host_address))
        self.assertEqual(http["http_url"], f"http://{node.host_address}:{http['http_port']}/")
        driver = self.browser(node)

        driver.get(http["http_url"] + "contact")  # returns after the load event

        self.assertEqual(driver.title, "Contact", shown(driver))
        self.assertEqual(driver.find_element("id", "client").text, node.node_address)  # from the node indeed
        greeting = driver.find_element("id", "greeting")
        self.assertEqual(greeting.value_of_css_property("color"), "rgba(0, 128, 0, 1)")
        self.assertEqual(driver.execute_script("return document.body.dataset.script"), "ran")
        self.assertEqual(driver.execute_script("return document.getElementById('logo').naturalWidth"), 3)
        self.assertEqual(
            sorted(str(request) for request in assets["http_requests"]),
            ["GET /logo.png", "GET /script.js", "GET /style.css"],
        )

        driver.find_element("name", "name").send_keys("Zoë")
        driver.find_element("name", "text").send_keys("Sent from the grid node.")
        driver.find_element("css selector", "button[type=submit]").click()
        wait_until(driver, lambda driver: driver.current_url.endswith("/thanks"), "no redirect to /thanks")
        self.assertEqual(driver.current_url, http["http_url"] + "thanks")
        [message] = mail["outbox"].wait_for(1)
        self.assertEqual(message["Subject"], "Contact form: Zoë")
        self.assertEqual(message.get_content(), "Sent from the grid node.\n")
        [post] = [request for request in http["http_requests"] if request.method == "POST"]
        self.assertEqual(post.headers["Origin"], f"http://{node.host_address}:{http['http_port']}")

    def test_an_https_page_verifies_against_the_test_ca(self):
        node = self.start_node(trusted_ca=tls.certificate_authority().ca_bundle)
        secure = self.serve(wsgi.Layer(secure_app, name="REMOTE_SECURE", host=node.host_address, tls=True))
        self.assertEqual(secure["http_url"], f"https://{node.host_address}:{secure['http_port']}/")
        driver = self.browser(node)

        driver.get(secure["http_url"])

        self.assertEqual(driver.title, "Secure", shown(driver))  # not "Privacy error"
        self.assertEqual(driver.find_element("id", "scheme").text, "https")
        self.assertEqual(wait_until(driver, page_state, "the page rendered nothing"), "rendered")
        self.assertEqual(driver.find_element("id", "ping").text, "pong over https:")
        self.assertEqual([str(request) for request in secure["http_requests"]], ["GET /", "GET /ping"])

    def test_a_public_name_other_than_the_bound_address(self):
        node = self.start_node(trusted_ca=tls.certificate_authority().ca_bundle)
        secure = self.serve(wsgi.Layer(
            secure_app, name="REMOTE_NAMED", host=node.host_address, public_host=PUBLIC_NAME, tls=True,
        ))
        self.assertEqual(secure["http_url"], f"https://{PUBLIC_NAME}:{secure['http_port']}/")
        driver = self.browser(node, resolve={PUBLIC_NAME: node.host_address})

        driver.get(secure["http_url"])

        self.assertEqual(driver.title, "Secure", shown(driver))  # the certificate names the public host
        self.assertEqual(wait_until(driver, page_state, "the page rendered nothing"), "rendered")
        self.assertEqual(driver.find_element("id", "ping").text, "pong over https:")
        [page, _ping] = secure["http_requests"]
        self.assertEqual(page.headers["Host"], f"{PUBLIC_NAME}:{secure['http_port']}")

    def test_a_layer_on_loopback_is_out_of_the_nodes_reach(self):
        """What the tests above rely on: the node is another machine, whose
        127.0.0.1 is its own."""
        node = self.start_node()
        local = self.serve(wsgi.Layer(hello_app, name="REMOTE_LOOPBACK"))
        self.assertEqual(local["http_host"], "127.0.0.1")
        driver = self.browser(node)

        from selenium.common.exceptions import WebDriverException

        try:
            driver.get(local["http_url"])
        except WebDriverException as refused:
            shown_error = str(refused)
        else:
            # Now and then (1 run in 6 here) chromedriver reports the
            # navigation done, with Chromium's error page on show.
            shown_error = driver.page_source
        self.assertIn("ERR_CONNECTION_REFUSED", shown_error)
        self.assertEqual(list(local["http_requests"]), [])

    def test_gocept_selenium_on_the_grid_node_through_the_environment(self):
        """The gocept drop-in: the layer stack is the one of a local
        browser; only the environment says where to bind and what to publish."""
        node = self.start_node()
        self.enter(unittest.mock.patch.dict(os.environ, {
            "GOCEPT_WEBDRIVER_BROWSER": "chrome",
            "GOCEPT_SELENIUM_HEADLESS": "true",
            "SERVERLAYER_HTTP_HOST": node.host_address,
            "SERVERLAYER_HTTP_PUBLIC_HOST": PUBLIC_NAME,
        }))
        import gocept.selenium.webdriver as gocept_webdriver

        http = wsgi.Layer(hello_app, name="REMOTE_GOCEPT_HTTP")
        browser = remote_gocept_layer(node, bases=(http,), name="REMOTE_GOCEPT_WEBDRIVER")
        selenese = gocept_webdriver.WebdriverSeleneseLayer(bases=(browser,), name="REMOTE_GOCEPT_SELENESE")
        for layer in (http, browser, selenese):
            self.serve(layer)
        self.assertEqual(selenese["http_address"], f"{PUBLIC_NAME}:{http['http_port']}")

        selenium = selenese["selenium"]
        selenium.open("/greeting")

        selenium.assertTitle("Hello")
        selenium.assertTextPresent(f"Hello from {PUBLIC_NAME}:{http['http_port']} to {node.node_address}")
        self.assertEqual([str(request) for request in http["http_requests"]], ["GET /greeting"])

    def enter(self, manager: contextlib.AbstractContextManager[Any]) -> Any:
        """``enterContext`` of Python 3.11, for 3.10."""
        result = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)
        return result
