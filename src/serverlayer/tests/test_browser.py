"""A real browser against the layers: headless Chromium driven by selenium.

These tests are at zope.testrunner level 2, so a plain run (level 1) does
not select them and does not count them. Run them on their own, with
selenium (the ``browser`` extra) and Debian's ``chromium``,
``chromium-driver`` and ``libnss3-tools`` installed::

    zope-testrunner --test-path=src --only-level 2

Selected without what they need, they fail in the browser layer's
``setUp`` and say what to install; they are never skipped.

One Chromium serves every test that only needs a browser (``CHROMIUM``);
the HTTPS and WSS tests that trust the test CA have their own
(``TRUSTING_CHROMIUM``, ``TRUSTING_LIVE_CHROMIUM``), and so has
gocept.selenium's layer. Each Chromium gets a fresh temporary
``$HOME`` and profile, and never asks Selenium Manager for a driver.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest
import urllib.parse
import zlib
from email.message import EmailMessage
from typing import Any

import plone.testing

from serverlayer import asgi, content, smtp, static, wsgi

#: zope.testrunner level of every test here: select with --only-level 2.
BROWSER_LEVEL = 2

#: Debian's real browser binary; /usr/bin/chromium is a shell wrapper that
#: adds flags of its own from /etc/chromium.d.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # we may run as root, in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
)
INSTALL_HINT = (
    "The browser tests need selenium (pip install -e '.[browser]') and"
    " Chromium with its driver (apt-get install chromium chromium-driver"
    " libnss3-tools)."
)
#: Seconds to wait for anything a page does by itself.
PATIENCE = 10.0

#: What every page links as its icon, so that Chromium does not ask the
#: server for /favicon.ico and the recorded requests are only the page's.
NO_FAVICON = '<link rel="icon" href="data:,">'


def _find(candidates: tuple[str, ...], what: str) -> str:
    for candidate in candidates:
        found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else shutil.which(candidate)
        if found:
            return found
    raise RuntimeError(f"No {what} found (looked for {', '.join(candidates)}). {INSTALL_HINT}")


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError:
        return "(no log)"


class ChromiumLayer(plone.testing.Layer):
    """One headless Chromium for the tests of the layer, as ``webdriver``.

    With ``trust_test_ca=True`` the browser trusts the certificate
    authority a base layer publishes as ``ca_bundle``: it goes into the NSS
    database of the browser's temporary ``$HOME``, where Chromium on Linux
    looks for locally trusted roots. Certificate errors are never ignored.

    Before each test the browser's cache and cookies are cleared; after it
    the browser goes to ``about:blank``, so that a page of one test makes no
    requests during the next.
    """

    trust_test_ca = False

    def __init__(self, *, trust_test_ca: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if trust_test_ca is not None:
            self.trust_test_ca = trust_test_ca
        self._home: str | None = None
        self._driver: Any = None

    def setUp(self) -> None:
        try:
            import selenium.webdriver  # noqa: F401  (the `browser` extra)
        except ImportError as error:
            raise RuntimeError(f"{self.__name__}: cannot import selenium. {INSTALL_HINT}") from error
        home = self._home = tempfile.mkdtemp(prefix="serverlayer-chromium-")
        try:
            if self.trust_test_ca:
                self._trust(self["ca_bundle"])
            self["webdriver"] = self._driver = start_chromium(home)
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            self._home = None
            raise

    def tearDown(self) -> None:
        driver, self._driver = self._driver, None
        try:
            if driver is not None:
                del self["webdriver"]
                driver.quit()
        finally:
            if self._home is not None:
                shutil.rmtree(self._home, ignore_errors=True)
                self._home = None

    def testSetUp(self) -> None:
        driver = self["webdriver"]
        driver.execute_cdp_cmd("Network.clearBrowserCache", {})
        driver.delete_all_cookies()

    def testTearDown(self) -> None:
        self["webdriver"].get("about:blank")

    def _trust(self, ca_bundle: str) -> None:
        assert self._home is not None
        trust_in_nss(self._home, ca_bundle)


def trust_in_nss(home: str, ca_bundle: str) -> None:
    """Make a Chromium whose ``$HOME`` is ``home`` trust ``ca_bundle``: on
    Linux it reads locally trusted roots from ``~/.pki/nssdb``."""
    certutil = _find(("certutil",), "certutil (Debian package libnss3-tools)")
    database = os.path.join(home, ".pki", "nssdb")
    os.makedirs(database)
    for arguments in (
        ["-N", "--empty-password"],
        ["-A", "-t", "C,,", "-n", "serverlayer test CA", "-i", ca_bundle],
    ):
        subprocess.run(
            [certutil, "-d", f"sql:{database}", *arguments],
            check=True, capture_output=True, timeout=30,
        )


def chromium_options(home: str) -> Any:
    """Chromium's options: headless, its profile in ``home``, its binary found."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = _find(CHROMIUM_CANDIDATES, "Chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={os.path.join(home, 'profile')}")
    return options


def chromedriver_service(home: str) -> Any:
    """The system's chromedriver, with ``$HOME`` at ``home`` (Chromium
    inherits it, and reads its NSS database from there), logging into it."""
    from selenium.webdriver.chrome.service import Service

    return Service(
        _find(CHROMEDRIVER_CANDIDATES, "chromedriver"),
        env={**os.environ, "HOME": home},
        log_output=os.path.join(home, "chromedriver.log"),
    )


def start_chromium(home: str) -> Any:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException

    try:
        driver = webdriver.Chrome(options=chromium_options(home), service=chromedriver_service(home))
    except WebDriverException as error:
        log = os.path.join(home, "chromedriver.log")
        raise RuntimeError(f"Chromium did not start: {error}\nchromedriver's log ends:\n{_tail(log)}") from error
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(PATIENCE)
    return driver


CHROMIUM = ChromiumLayer(name="CHROMIUM")


class BrowserTestCase(unittest.TestCase):
    """What the tests below share; it has no tests of its own."""

    level = BROWSER_LEVEL
    layer: Any  # each test class sets its own

    @property
    def driver(self) -> Any:
        return self.layer["webdriver"]

    def wait_until(self, condition, message: str, timeout: float = PATIENCE) -> Any:
        """Poll ``condition(driver)`` until it returns something true."""
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout).until(condition, message)

    def text(self, css: str) -> str:
        return self.driver.find_element("css selector", css).text


# (a) Many scripts and images at once, from the static layer.

COUNT = 6
STATIC = static.Layer(name="BROWSER_STATIC")
STATIC_BROWSER = plone.testing.Layer(bases=(STATIC, CHROMIUM), name="STATIC_BROWSER")


def png(width: int) -> bytes:
    """A green PNG ``width`` pixels wide and one high."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, 1, 8, 2, 0, 0, 0)  # 8-bit RGB
    row = b"\x00" + b"\x00\xc0\x00" * width  # filter byte, then the pixels
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b"")


class ManyResourcesTests(BrowserTestCase):
    layer = STATIC_BROWSER

    def write(self, name: str, data: str | bytes) -> None:
        with open(os.path.join(self.layer["documentroot"], name), "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)

    def test_page_loads_all_its_scripts_and_images_at_once(self):
        scripts = "".join(f'<script async src="script-{n}.js"></script>' for n in range(1, COUNT + 1))
        images = "".join(
            f'<img id="image-{n}" src="image-{n}.png"'
            ' onload="arrived.push(this.id + \' \' + this.naturalWidth + \'px\')"'
            ' onerror="arrived.push(this.id + \' failed\')">'
            for n in range(1, COUNT + 1)
        )
        self.write(
            "index.html",
            f"<!doctype html><html><head><meta charset=utf-8>{NO_FAVICON}<title>Many at once</title>"
            f"<script>window.arrived = [];</script>{scripts}</head><body>{images}</body></html>",
        )
        for n in range(1, COUNT + 1):
            self.write(f"script-{n}.js", f"window.arrived.push('script-{n} ran');")
            self.write(f"image-{n}.png", png(n))

        self.driver.get(self.layer["http_url"] + "index.html")  # returns after the load event

        self.assertEqual(self.driver.title, "Many at once")
        self.assertEqual(
            sorted(self.driver.execute_script("return window.arrived")),
            sorted([f"script-{n} ran" for n in range(1, COUNT + 1)]
                   + [f"image-{n} {n}px" for n in range(1, COUNT + 1)]),
        )
        self.assertEqual(
            sorted(str(request) for request in self.layer["http_requests"]),
            sorted(["GET /index.html"]
                   + [f"GET /script-{n}.js" for n in range(1, COUNT + 1)]
                   + [f"GET /image-{n}.png" for n in range(1, COUNT + 1)]),
        )

    def test_a_missing_script_is_a_404_the_page_survives(self):
        self.write(
            "index.html",
            f"<!doctype html>{NO_FAVICON}<title>Gap</title><script>window.failed = [];</script>"
            '<script src="missing.js" onerror="failed.push(\'missing.js\')"></script>',
        )
        self.driver.get(self.layer["http_url"] + "index.html")
        self.assertEqual(self.driver.execute_script("return window.failed"), ["missing.js"])
        self.assertEqual([str(r) for r in self.layer["http_requests"]], ["GET /index.html", "GET /missing.js"])


def wav(seconds: int, rate: int = 8000) -> bytes:
    """A silent mono 16-bit PCM WAV file ``seconds`` long."""
    data = b"\x00\x00" * rate * seconds
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, 1,
                         rate, rate * 2, 2, 16, b"data", len(data))
    return header + data


class MediaRangeTests(BrowserTestCase):
    """Chromium fetches media in byte ranges, and seeks with them."""

    layer = STATIC_BROWSER

    def test_an_audio_element_loads_and_seeks_in_ranges(self):
        root = self.layer["documentroot"]
        with open(os.path.join(root, "silence.wav"), "wb") as file:
            file.write(wav(60))  # 960,000 bytes: more than Chromium reads ahead for metadata
        with open(os.path.join(root, "player.html"), "w") as file:
            file.write(
                f"<!doctype html>{NO_FAVICON}<title>Player</title>"
                '<audio id="player" src="silence.wav" preload="metadata"></audio><p id="state">loading</p>'
                "<script>const player = document.getElementById('player'), state = document.getElementById('state');"
                "player.onloadedmetadata = () => { state.textContent = 'duration ' + player.duration;"
                " player.currentTime = 59; };"
                "player.onseeked = () => { state.textContent += ', seeked to ' + player.currentTime; };"
                "player.onerror = () => { state.textContent = 'error ' + player.error.code; };</script>"
            )
        self.driver.get(self.layer["http_url"] + "player.html")
        self.wait_until(lambda driver: "seeked" in self.text("#state") or "error" in self.text("#state"),
                        "the audio never loaded and seeked")
        self.assertEqual(self.text("#state"), "duration 60, seeked to 59")
        media = [request for request in self.layer["http_requests"] if request.path == "/silence.wav"]
        ranges = [request.headers.get("Range") for request in media]
        self.assertTrue(ranges and all(ranges), f"every media request asks for a range: {ranges}")
        # The seek to second 59 asked for bytes near the end, not the file again.
        self.assertTrue(any(int(value.split("=")[1].split("-")[0]) > 900_000 for value in ranges), ranges)


# (b) A form posted in the browser sends a mail: smtp + wsgi layers.

PAGE = (
    "<!doctype html><html><head><meta charset=utf-8>" + NO_FAVICON
    + "<title>{title}</title></head><body>{body}</body></html>"
)
CONTACT_FORM = """
<form method="post" action="/contact">
  <label>Name <input name="name"></label>
  <label>E-mail <input name="email" type="email"></label>
  <label>Message <textarea name="text"></textarea></label>
  <button type="submit">Send</button>
</form>
"""


def html(start_response, title: str, body: str, status: str = "200 OK") -> list[bytes]:
    start_response(status, [("Content-Type", "text/html; charset=utf-8")])
    return [PAGE.format(title=title, body=body).encode()]


def make_contact_app(smtp_host: str, smtp_port: int):
    import smtplib

    def contact_app(environ, start_response):
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        if path == "/contact" and method == "GET":
            return html(start_response, "Contact us", CONTACT_FORM)
        if path == "/contact" and method == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            form = urllib.parse.parse_qs(environ["wsgi.input"].read(size).decode("ascii"))
            message = EmailMessage()
            message["From"] = "website@example.com"
            message["To"] = "sales@example.com"
            message["Reply-To"] = form["email"][0]
            message["Subject"] = f"Contact form: {form['name'][0]}"
            message.set_content(form["text"][0])
            with smtplib.SMTP(smtp_host, smtp_port) as connection:
                connection.send_message(message)
            start_response("303 See Other", [("Location", "/thanks"), ("Content-Length", "0")])
            return [b""]
        if path == "/thanks":
            return html(start_response, "Thanks", "<p id=thanks>Thank you, we will be in touch.</p>")
        return html(start_response, "Not found", "<p>Not found</p>", "404 Not Found")

    return contact_app


MAIL = smtp.Layer(name="BROWSER_MAIL")


class ContactAppLayer(plone.testing.Layer):
    defaultBases = (MAIL,)

    def setUp(self):
        self["wsgi_app"] = make_contact_app(self["smtp_host"], self["smtp_port"])

    def tearDown(self):
        del self["wsgi_app"]


CONTACT_APP = ContactAppLayer(name="BROWSER_CONTACT_APP")
CONTACT_HTTP = wsgi.Layer(bases=(CONTACT_APP,), name="BROWSER_CONTACT_HTTP")
CONTACT_BROWSER = plone.testing.Layer(bases=(CONTACT_HTTP, CHROMIUM), name="CONTACT_BROWSER")


class ContactFormTests(BrowserTestCase):
    layer = CONTACT_BROWSER

    def test_the_typed_message_arrives_by_mail(self):
        name, email, text = "Zoë Müller", "zoe@example.com", "Grüße aus Köln – please call me back & soon!"
        self.driver.get(self.layer["http_url"] + "contact")
        self.driver.find_element("name", "name").send_keys(name)
        self.driver.find_element("name", "email").send_keys(email)
        self.driver.find_element("name", "text").send_keys(text)
        self.driver.find_element("css selector", "button[type=submit]").click()

        self.wait_until(lambda driver: driver.current_url.endswith("/thanks"), "no redirect to /thanks")
        self.assertEqual(self.text("#thanks"), "Thank you, we will be in touch.")
        [mail] = self.layer["outbox"].wait_for(1)
        self.assertEqual(mail["Subject"], f"Contact form: {name}")
        self.assertEqual(mail["Reply-To"], email)
        self.assertEqual(mail.get_content(), text + "\n")
        self.assertEqual(mail.rcpt_tos, ["sales@example.com"])

        [post] = [request for request in self.layer["http_requests"] if request.method == "POST"]
        self.assertEqual(post.headers["Content-Type"], "application/x-www-form-urlencoded")
        self.assertEqual(post.headers["Origin"], self.layer["http_url"].rstrip("/"))
        self.assertEqual(
            urllib.parse.parse_qs(post.body.decode("ascii")), {"name": [name], "email": [email], "text": [text]}
        )
        self.assertEqual(
            [str(request) for request in self.layer["http_requests"]],
            ["GET /contact", f"POST /contact ({len(post.body)} bytes)", "GET /thanks"],
        )

    def test_each_test_starts_with_an_empty_outbox(self):
        import smtplib

        with smtplib.SMTP(self.layer["smtp_host"], self.layer["smtp_port"], timeout=PATIENCE) as connection:
            connection.sendmail("a@example.com", ["b@example.com"], b"Subject: earlier\r\n\r\nhi\r\n")
        self.assertEqual([mail["Subject"] for mail in self.layer["outbox"]], ["earlier"])
        MAIL.testTearDown()  # what the test runner calls between this test and the next
        MAIL.testSetUp()
        self.assertEqual(len(self.layer["outbox"]), 0)


# (c) A page that fetches JSON and renders it: from its own wsgi app, and
# across origins from a content layer.

NOTES = [
    {"title": "Buy milk", "tags": ["home"]},
    {"title": "<b>not bold</b> & not escaped twice", "tags": ["html", "ünïcode"]},
]
RENDER_NOTES = """
<ul id="notes"><li>loading</li></ul>
<script>
fetch("/api/notes", {headers: {"Accept": "application/json"}})
  .then(response => response.ok ? response.json() : Promise.reject(new Error("HTTP " + response.status)))
  .then(notes => {
    document.getElementById("notes").replaceChildren(...notes.map(note => {
      const item = document.createElement("li");
      item.textContent = note.title + " [" + note.tags.join(", ") + "]";
      return item;
    }));
    document.body.dataset.state = "rendered";
  })
  .catch(error => { document.body.dataset.state = "failed: " + error.message; });
</script>
"""


def notes_app(environ, start_response):
    if environ["PATH_INFO"] == "/":
        return html(start_response, "Notes", RENDER_NOTES)
    if environ["PATH_INFO"] == "/api/notes":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(NOTES).encode()]
    return html(start_response, "Not found", "<p>Not found</p>", "404 Not Found")


NOTES_HTTP = wsgi.Layer(notes_app, name="BROWSER_NOTES_HTTP")
NOTES_BROWSER = plone.testing.Layer(bases=(NOTES_HTTP, CHROMIUM), name="NOTES_BROWSER")


def page_state(driver) -> str | None:
    return driver.execute_script("return document.body && document.body.dataset.state")


class FetchJSONTests(BrowserTestCase):
    layer = NOTES_BROWSER

    def test_page_renders_the_fetched_notes(self):
        self.driver.get(self.layer["http_url"])
        self.assertEqual(self.wait_until(page_state, "the page rendered nothing"), "rendered")
        items = [item.text for item in self.driver.find_elements("css selector", "#notes li")]
        self.assertEqual(items, ["Buy milk [home]", "<b>not bold</b> & not escaped twice [html, ünïcode]"])
        [fetched] = [request for request in self.layer["http_requests"] if request.path == "/api/notes"]
        self.assertEqual(fetched.headers["Accept"], "application/json")
        self.assertEqual([str(request) for request in self.layer["http_requests"]], ["GET /", "GET /api/notes"])


API = content.Layer(name="BROWSER_API")
CORS_BROWSER = plone.testing.Layer(bases=(STATIC, API, CHROMIUM), name="CORS_BROWSER")

SAVE_NOTE = """
<p id="result">saving</p>
<script>
fetch(API + "notes", {
  method: "POST",
  headers: {"Content-Type": "application/json"},
  body: JSON.stringify({title: "Water the plants"}),
})
  .then(response => response.ok ? response.json() : Promise.reject(new Error("HTTP " + response.status)))
  .then(note => {
    document.getElementById("result").textContent = "Saved note " + note.id + ": " + note.title;
    document.body.dataset.state = "rendered";
  })
  .catch(error => { document.body.dataset.state = "failed: " + error.message; });
</script>
"""


class CrossOriginFetchTests(BrowserTestCase):
    """A page from the static layer posts JSON to a content layer, another
    origin: Chromium asks with a CORS preflight first, which the test answers."""

    layer = CORS_BROWSER

    def test_preflight_then_post_then_render(self):
        origin = STATIC["http_url"].rstrip("/")
        cors = {"Access-Control-Allow-Origin": origin}
        api = API["http_content"]
        api.expect("/notes", "OPTIONS", ordered=True).respond("", 204, headers={
            **cors,
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Content-Type",
        })
        api.expect("/notes", "POST", ordered=True).respond_json(
            {"id": 7, "title": "Water the plants"}, status=201, headers=cors
        )
        with open(os.path.join(STATIC["documentroot"], "save.html"), "w", encoding="utf-8") as page:
            script = SAVE_NOTE.replace("API +", f"{json.dumps(API['http_url'])} +")
            page.write(PAGE.format(title="Save", body=script))

        self.driver.get(STATIC["http_url"] + "save.html")
        self.assertEqual(self.wait_until(page_state, "the page rendered nothing"), "rendered")
        self.assertEqual(self.text("#result"), "Saved note 7: Water the plants")

        preflight, post = api.requests
        self.assertEqual(preflight.method, "OPTIONS")
        self.assertEqual(preflight.headers["Origin"], origin)
        self.assertEqual(preflight.headers["Access-Control-Request-Method"], "POST")
        self.assertEqual(preflight.headers["Access-Control-Request-Headers"], "content-type")
        self.assertEqual(post.method, "POST")
        self.assertEqual(post.headers["Origin"], origin)
        self.assertEqual(post.json(), {"title": "Water the plants"})
        self.assertEqual([str(request) for request in STATIC["http_requests"]], ["GET /save.html"])


# (d) HTTPS that Chromium trusts through the test CA, and only through it.

SECURE_PAGE = """
<h1 id="scheme">{scheme}</h1>
<p id="ping">pinging</p>
<script>
fetch("/ping").then(response => response.text()).then(text => {{
  document.getElementById("ping").textContent = text + " over " + location.protocol;
  document.body.dataset.state = "rendered";
}}, error => {{ document.body.dataset.state = "failed: " + error.message; }});
</script>
"""


def secure_app(environ, start_response):
    if environ["PATH_INFO"] == "/ping":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"pong"]
    return html(start_response, "Secure", SECURE_PAGE.format(scheme=environ["wsgi.url_scheme"]))


SECURE = wsgi.Layer(secure_app, name="BROWSER_SECURE", tls=True)
UNTRUSTING_BROWSER = plone.testing.Layer(bases=(SECURE, CHROMIUM), name="UNTRUSTING_BROWSER")
TRUSTING_CHROMIUM = ChromiumLayer(bases=(SECURE,), trust_test_ca=True, name="TRUSTING_CHROMIUM")


class UntrustedHTTPSTests(BrowserTestCase):
    layer = UNTRUSTING_BROWSER

    def test_a_browser_without_the_test_ca_refuses_the_certificate(self):
        self.assertTrue(self.layer["http_url"].startswith("https://"))
        self.driver.get(self.layer["http_url"])
        self.assertEqual(self.driver.title, "Privacy error")
        self.assertIn("net::ERR_CERT_AUTHORITY_INVALID", self.driver.page_source)
        self.assertEqual(list(self.layer["http_requests"]), [])  # no request got through


class TrustedHTTPSTests(BrowserTestCase):
    layer = TRUSTING_CHROMIUM

    def test_a_browser_with_the_test_ca_in_its_nss_database_loads_the_page(self):
        self.driver.get(self.layer["http_url"])
        self.assertEqual(self.driver.title, "Secure")
        self.assertEqual(self.text("#scheme"), "https")
        self.assertEqual(self.wait_until(page_state, "the page rendered nothing"), "rendered")
        self.assertEqual(self.text("#ping"), "pong over https:")
        self.assertEqual([str(request) for request in self.layer["http_requests"]], ["GET /", "GET /ping"])


# (e) A page that opens a WebSocket to the ASGI layer that served it, over
# ws:// and, with the test CA trusted, over wss://.

LIVE_PAGE = """
<p id="url">connecting</p>
<p id="received">nothing yet</p>
<script>
const socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/echo");
document.getElementById("url").textContent = socket.url;
socket.onopen = () => socket.send("hello from the page");
socket.onmessage = event => { document.getElementById("received").textContent = event.data; };
socket.onerror = () => { document.body.dataset.state = "failed: WebSocket error"; };
socket.onclose = event => {
  if (!document.body.dataset.state) document.body.dataset.state = "closed " + event.code;
};
</script>
"""


async def live_app(scope, receive, send):
    """The page at ``/``; at ``/echo`` a WebSocket that answers the first
    text it receives, naming its scheme, then closes normally."""
    assert scope["type"] in ("http", "websocket"), f"no {scope['type']} here"
    if scope["type"] == "http":
        await receive()
        body = PAGE.format(title="Live", body=LIVE_PAGE).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["path"] != "/echo":
        await send({"type": "websocket.close", "code": 4404})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    message = await receive()
    if message["type"] == "websocket.receive":
        text = f"the server got {message['text']!r} over {scope['scheme']}"
        await send({"type": "websocket.send", "text": text})
        await send({"type": "websocket.close", "code": 1000})


LIVE = asgi.Layer(live_app, name="BROWSER_LIVE")
LIVE_BROWSER = plone.testing.Layer(bases=(LIVE, CHROMIUM), name="LIVE_BROWSER")
SECURE_LIVE = asgi.Layer(live_app, name="BROWSER_SECURE_LIVE", tls=True)
TRUSTING_LIVE_CHROMIUM = ChromiumLayer(bases=(SECURE_LIVE,), trust_test_ca=True, name="TRUSTING_LIVE_CHROMIUM")


class WebSocketTests(BrowserTestCase):
    layer = LIVE_BROWSER
    scheme = "ws"

    def test_page_talks_to_its_layer_over_a_websocket(self):
        self.assertTrue(self.layer["ws_url"].startswith(f"{self.scheme}://"))
        self.driver.get(self.layer["http_url"])
        self.assertEqual(self.wait_until(page_state, "the WebSocket never closed"), "closed 1000")
        self.assertEqual(self.text("#url"), self.layer["ws_url"] + "echo")
        self.assertEqual(self.text("#received"), f"the server got 'hello from the page' over {self.scheme}")

        page, handshake = self.layer["http_requests"]
        self.assertEqual(str(page), "GET /")
        self.assertEqual(str(handshake), "GET /echo")
        self.assertEqual(handshake.headers["Upgrade"], "websocket")
        self.assertEqual(handshake.headers["Connection"], "Upgrade")
        self.assertEqual(handshake.headers["Origin"], self.layer["http_url"].rstrip("/"))
        self.assertEqual(handshake.headers["Sec-WebSocket-Version"], "13")


class SecureWebSocketTests(WebSocketTests):
    """The same page over HTTPS and WSS, in a Chromium that trusts the test CA."""

    layer = TRUSTING_LIVE_CHROMIUM
    scheme = "wss"


# gocept.selenium's webdriver layer, stacked on a serverlayer wsgi layer.

class GoceptSettings(plone.testing.Layer):
    """The environment gocept.selenium reads in its layer's ``setUp``
    (it warns about anything else, which -W error turns into an error)."""

    settings = {"GOCEPT_WEBDRIVER_BROWSER": "chrome", "GOCEPT_SELENIUM_HEADLESS": "true"}

    def setUp(self):
        self._saved = {name: os.environ.get(name) for name in self.settings}
        os.environ.update(self.settings)

    def tearDown(self):
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def hello_app(environ, start_response):
    return html(start_response, "Hello", f"<h1>Hello from serverlayer at {environ['PATH_INFO']}</h1>")


GOCEPT_SETTINGS = GoceptSettings(name="GOCEPT_SETTINGS")
GOCEPT_HTTP = wsgi.Layer(hello_app, name="GOCEPT_HTTP")

try:
    import gocept.selenium.webdriver as gocept_webdriver
except ImportError as error:  # the `browser` extra is missing: fail when selected, loudly
    _gocept_import_error = error

    class _MissingGoceptLayer(plone.testing.Layer):
        def setUp(self):
            raise RuntimeError(f"{self.__name__}: cannot import gocept.selenium. {INSTALL_HINT}") \
                from _gocept_import_error

    GoceptWebdriverLayer: Any = _MissingGoceptLayer
    GoceptSeleneseLayer: Any = _MissingGoceptLayer
else:

    class GoceptWebdriverLayer(gocept_webdriver.Layer):  # type: ignore[no-redef]
        """gocept.selenium's layer with the system's Chromium and chromedriver.

        Its own ``get_chrome_webdriver_args`` downloads a chromedriver with
        webdriver-manager, and passes ``service_args`` that
        ``selenium.webdriver.Chrome`` no longer takes (selenium >= 4.10), and
        no ``--no-sandbox``; so this hook is replaced, the rest is theirs.
        """

        def setUp(self):
            self._home = tempfile.mkdtemp(prefix="serverlayer-gocept-")
            try:
                super().setUp()
            except BaseException:
                shutil.rmtree(self._home, ignore_errors=True)
                raise

        def tearDown(self):
            try:
                super().tearDown()
            finally:
                shutil.rmtree(self._home, ignore_errors=True)

        def get_chrome_webdriver_args(self):
            options = chromium_options(self._home)
            options.add_experimental_option("prefs", {
                "download.default_directory": str(self["selenium_download_dir"]),
                "download.prompt_for_download": False,
            })
            return {"options": options, "service": chromedriver_service(self._home)}

    GoceptSeleneseLayer = gocept_webdriver.WebdriverSeleneseLayer

GOCEPT_WEBDRIVER = GoceptWebdriverLayer(bases=(GOCEPT_HTTP, GOCEPT_SETTINGS), name="GOCEPT_WEBDRIVER")
GOCEPT_SELENESE = GoceptSeleneseLayer(bases=(GOCEPT_WEBDRIVER,), name="GOCEPT_SELENESE")


class GoceptSeleniumTests(unittest.TestCase):
    level = BROWSER_LEVEL
    layer = GOCEPT_SELENESE

    def test_selenese_opens_a_page_of_the_wsgi_layer(self):
        selenium = self.layer["selenium"]
        selenium.open("/greeting")
        selenium.assertTextPresent("Hello from serverlayer at /greeting")
        selenium.assertTitle("Hello")
        self.assertEqual(self.layer["browser"], "chrome")
        self.assertEqual([str(request) for request in self.layer["http_requests"]], ["GET /greeting"])

    def test_webdriver_is_published_as_seleniumrc(self):
        driver = self.layer["seleniumrc"]
        driver.get(self.layer["http_url"] + "direct")
        self.assertEqual(driver.find_element("tag name", "h1").text, "Hello from serverlayer at /direct")
