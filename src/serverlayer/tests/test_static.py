"""The static layer: a directory served with correct HTTP, and nothing outside it."""

from __future__ import annotations

import email.message
import email.utils
import http.client
import os
import shutil
import socket
import tempfile
import unittest
import urllib.error
import urllib.request
from unittest import mock

from serverlayer import ConfigurationError, custom, static
from serverlayer.tests.helpers import (
    assert_the_test_end_cuts_the_write,
    raw_request,
    reader_that_stops,
    set_up_by_hand,
    thread_names,
    wait_until_a_write_stalls,
)

SECRET = b"TOP-SECRET: must never be served"
#: The status line of every refusal: the static layer answers 404, as for a missing file.
REFUSED = b"HTTP/1.1 404 File not found"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, email.message.Message, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


class TemporaryDirectoryTests(unittest.TestCase):
    layer = static.STATIC_FILES

    def write(self, name: str, data: bytes) -> None:
        path = os.path.join(self.layer["documentroot"], name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(data)

    def test_serves_files_with_their_content_type(self):
        cases = {
            "page.html": "text/html",
            "style.css": "text/css",
            "data.json": "application/json",
            "image.png": "image/png",
            "notes.txt": "text/plain",
        }
        for name in cases:
            self.write(name, name.encode())
        self.write("sub/dir/deep.txt", b"deep")
        for name, content_type in cases.items():
            status, headers, body = get(self.layer["http_url"] + name)
            self.assertEqual((status, body), (200, name.encode()))
            self.assertEqual(headers["Content-Type"].split(";")[0], content_type)
        self.assertEqual(get(self.layer["http_url"] + "sub/dir/deep.txt")[2], b"deep")
        status, headers, _ = get(self.layer["http_url"] + "script.js")
        self.assertEqual(status, 404)

    def test_directory_is_emptied_between_tests(self):
        self.write("page.html", b"left by a test")
        self.write("sub/dir/deep.txt", b"deep")
        self.assertEqual(get(self.layer["http_url"] + "page.html")[::2], (200, b"left by a test"))
        # What the runner does between two tests of the layer.
        self.layer.testTearDown()
        self.layer.testSetUp()
        self.assertEqual(os.listdir(self.layer["documentroot"]), [])
        self.assertEqual(get(self.layer["http_url"] + "page.html")[0], 404)
        self.assertEqual(get(self.layer["http_url"] + "sub/dir/deep.txt")[0], 404)

    def test_head_sends_headers_only(self):
        self.write("file.txt", b"0123456789")
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("HEAD", "/file.txt")
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Length"), "10")
        self.assertEqual(response.read(), b"")
        connection.request("GET", "/file.txt")  # same connection: keep-alive
        self.assertEqual(connection.getresponse().read(), b"0123456789")

    def test_missing_file_is_404(self):
        self.assertEqual(get(self.layer["http_url"] + "nothing-here.txt")[0], 404)

    def test_every_final_answer_says_how_to_cache_it(self):
        # A browser shared by the tests keeps a 301 (and may keep a 404 or
        # a listing) unless told otherwise; a later test may make what was
        # missing, or a file where a directory was.
        os.mkdir(os.path.join(self.layer["documentroot"], "sub"))
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for path, status in [("/sub", 301), ("/sub/", 200), ("/missing.txt", 404)]:
            with self.subTest(path=path):
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                self.assertEqual(response.status, status)
                self.assertEqual(response.getheader("Cache-Control"), "no-cache")
                if response.will_close:
                    connection.close()
        connection.request("POST", "/sub/", body=b"x")
        response = connection.getresponse()
        response.read()
        self.assertEqual((response.status, response.msg.get_all("Cache-Control")), (405, ["no-cache"]))
        # An interim 100 Continue has none; the answer after it has one.
        answer = raw_request(
            self.layer["http_host"], self.layer["http_port"],
            b"GET /missing.txt HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        interim, _, final = answer.partition(b"\r\n\r\n")
        self.assertEqual(interim, b"HTTP/1.1 100 Continue")
        self.assertTrue(final.startswith(b"HTTP/1.1 404 "), final)
        self.assertEqual(final.count(b"\r\nCache-Control: no-cache\r\n"), 1, final)

    def test_if_modified_since(self):
        self.write("cached.txt", b"cached")
        status, headers, _ = get(self.layer["http_url"] + "cached.txt")
        self.assertEqual(status, 200)
        last_modified = headers["Last-Modified"]
        status, _, body = get(self.layer["http_url"] + "cached.txt", {"If-Modified-Since": last_modified})
        self.assertEqual((status, body), (304, b""))
        older = email.utils.formatdate(email.utils.parsedate_to_datetime(last_modified).timestamp() - 3600,
                                       usegmt=True)
        self.assertEqual(get(self.layer["http_url"] + "cached.txt", {"If-Modified-Since": older})[0], 200)


class TraversalTests(unittest.TestCase):
    """Every attempt to read ``outside/secret.txt`` from ``outside/root``.

    The links in the root that lead outside are followed by default; only
    ``follow_symlinks=False`` refuses them (``StrictTraversalTests``).
    """

    follow_symlinks = True

    @classmethod
    def make_tree(cls) -> str:
        outside = tempfile.mkdtemp(prefix="serverlayer-traversal-")
        root = os.path.join(outside, "root")
        os.makedirs(os.path.join(root, "sub"))
        with open(os.path.join(outside, "secret.txt"), "wb") as file:
            file.write(SECRET)
        with open(os.path.join(root, "public.txt"), "wb") as file:
            file.write(b"public")
        os.symlink(os.path.join(outside, "secret.txt"), os.path.join(root, "link-to-secret.txt"))
        os.symlink(outside, os.path.join(root, "link-to-outside"))
        os.symlink("../../secret.txt", os.path.join(root, "sub", "relative-link.txt"))
        return outside

    def setUp(self):
        self.outside = self.make_tree()
        self.addCleanup(shutil.rmtree, self.outside)
        self.layer = set_up_by_hand(self, static.Layer(
            os.path.join(self.outside, "root"),
            name=f"traversal_{type(self).__name__}_{self._testMethodName}",
            follow_symlinks=self.follow_symlinks,
        ))

    def assert_refused_and_still_serving(self, target: str) -> None:
        """``GET target`` is answered with a 404 that holds no secret, and
        the next request is served as before."""
        response = raw_request(
            self.layer["http_host"], self.layer["http_port"], f"GET {target} HTTP/1.0\r\n\r\n".encode(),
        )
        self.assertNotIn(SECRET, response)
        self.assertEqual(response.partition(b"\r\n")[0], REFUSED, response[:200])
        self.assertEqual(get(self.layer["http_url"] + "public.txt")[::2], (200, b"public"))

    ATTEMPTS = [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/.%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/..%2fsecret.txt",
        "/sub%2f..%2f..%2fsecret.txt",
        "/%252e%252e/secret.txt",
        "/%252e%252e%252fsecret.txt",
        "/..\\secret.txt",
        "/%5c..%5csecret.txt",
        "/..%5csecret.txt",
        "/%c0%ae%c0%ae/secret.txt",
        "/secret.txt%00.html",
        "/%00../secret.txt",
        "/./../secret.txt",
        "//../secret.txt",
        "/sub/./../.././secret.txt",
    ]
    #: The links in the root that lead outside: refused only when not followed.
    LINK_ATTEMPTS = [
        "/link-to-secret.txt",
        "/link-to-outside/secret.txt",
        "/sub/relative-link.txt",
    ]

    def test_no_attempt_reads_outside_the_root(self):
        absolute = os.path.join(self.outside, "secret.txt")
        attempts = [*self.ATTEMPTS, absolute, "/" + absolute, "/" + absolute.replace("/", "%2f")]
        if not self.follow_symlinks:
            attempts += self.LINK_ATTEMPTS
        for target in attempts:
            with self.subTest(target=target):
                self.assert_refused_and_still_serving(target)
        self.layer.check_server_errors()

    def test_absolute_form_request_target(self):
        self.assert_refused_and_still_serving(f"http://{self.layer['http_address']}/../secret.txt")

    def test_a_file_asked_for_by_a_client_that_uses_the_layer_as_its_proxy(self):
        # The target names the host (RFC 9112 section 3.2.2: a server must accept that form).
        for target in ("http://api.example.com/public.txt", "http://api.example.com:8080/sub/../public.txt?x=1"):
            with self.subTest(target=target):
                response = raw_request(
                    self.layer["http_host"], self.layer["http_port"], f"GET {target} HTTP/1.0\r\n\r\n".encode(),
                )
                self.assertEqual(response.partition(b"\r\n")[0], b"HTTP/1.1 200 OK", response[:200])
                self.assertTrue(response.endswith(b"\r\n\r\npublic"), response[-100:])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": self.layer["http_url"]}))
        with opener.open("http://api.example.com/public.txt", timeout=5) as response:
            self.assertEqual(response.read(), b"public")


class StrictTraversalTests(TraversalTests):
    """The same with ``follow_symlinks=False``, which refuses links that lead outside."""

    follow_symlinks = False

    def test_directory_listing_names_no_outside_files(self):
        status, _, body = get(self.layer["http_url"] + "link-to-outside/")
        self.assertEqual(status, 404)
        self.assertNotIn(b"secret.txt", body)
        self.assertEqual(get(self.layer["http_url"] + "public.txt")[::2], (200, b"public"))


class GivenDirectoryTests(unittest.TestCase):

    def test_a_given_directory_is_never_modified(self):
        root = tempfile.mkdtemp(prefix="serverlayer-given-")
        self.addCleanup(shutil.rmtree, root)
        with open(os.path.join(root, "keep.txt"), "w") as file:
            file.write("keep me")
        layer = static.Layer(root, name="given_directory")
        layer.setUp()
        try:
            self.assertEqual(layer["documentroot"], root)
            layer.testSetUp()
            try:
                self.assertEqual(get(layer["http_url"] + "keep.txt")[::2], (200, b"keep me"))
            finally:
                layer.testTearDown()
            self.assertEqual(os.listdir(root), ["keep.txt"])  # testTearDown left it alone
        finally:
            layer.tearDown()
        self.assertEqual(os.listdir(root), ["keep.txt"])

    def test_temporary_directory_is_removed_in_teardown(self):
        layer = static.Layer(name="removed_directory")
        layer.setUp()
        root = layer["documentroot"]
        self.assertTrue(os.path.isdir(root))
        layer.tearDown()
        self.assertFalse(os.path.exists(root))
        self.assertNotIn("documentroot", layer)

    def test_two_layers_serve_their_own_directories(self):
        first, second = static.Layer(name="first_root"), static.Layer(name="second_root")
        for layer, text in ((first, b"first"), (second, b"second")):
            set_up_by_hand(self, layer)
            with open(os.path.join(layer["documentroot"], "which.txt"), "wb") as file:
                file.write(text)
        self.assertNotEqual(first["documentroot"], second["documentroot"])
        self.assertEqual(get(first["http_url"] + "which.txt")[::2], (200, b"first"))
        self.assertEqual(get(second["http_url"] + "which.txt")[::2], (200, b"second"))

    def test_missing_directory_is_a_clear_error(self):
        layer = static.Layer("/no/such/directory", name="missing_directory")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("/no/such/directory", str(caught.exception))
        self.assertIn("not a directory", str(caught.exception))
        self.assertEqual(layer._resources, {})


class HandlerTests(unittest.TestCase):
    """What the handler does beyond what SimpleHTTPRequestHandler does."""

    def test_the_root_directory_is_listed(self):
        layer = set_up_by_hand(self, static.Layer(name="static_root_listed"))
        with open(os.path.join(layer["documentroot"], "listed.txt"), "wb") as file:
            file.write(b"x")
        status, _, body = get(layer["http_url"])
        self.assertEqual(status, 200)
        self.assertIn(b"listed.txt", body)

    def test_files_go_out_with_sendfile(self):
        layer = set_up_by_hand(self, static.Layer(name="static_sendfile"))
        with open(os.path.join(layer["documentroot"], "big.bin"), "wb") as file:
            file.write(b"0123456789" * 100_000)
        with mock.patch.object(socket.socket, "sendfile", autospec=True, side_effect=socket.socket.sendfile) as sent:
            status, _, body = get(layer["http_url"] + "big.bin")
        self.assertEqual((status, len(body)), (200, 1_000_000))
        self.assertEqual(sent.call_count, 1)

    def test_a_file_that_shrinks_while_it_is_sent_ends_the_connection(self):
        """The client learns at once that the answer is cut, instead of
        waiting for the rest of what Content-Length announced."""
        layer = set_up_by_hand(self, static.Layer(name="static_shrinking"))
        path = os.path.join(layer["documentroot"], "shrinking.bin")
        with open(path, "wb") as file:
            file.write(b"x" * 64_000_000)
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10) as client:
            client.sendall(b"GET /shrinking.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            received = client.recv(100_000)
            os.truncate(path, 1_000_000)
            while chunk := client.recv(1_000_000):  # TimeoutError if the server kept the connection
                received += chunk
        self.assertIn(b"Content-Length: 64000000", received)
        self.assertLess(len(received), 64_000_000)

    def test_a_name_the_file_system_cannot_encode_is_not_found(self):
        layer = set_up_by_hand(self, static.Layer(name="static_surrogate"))
        self.assertTrue(raw_request(layer["http_host"], layer["http_port"],
                                    b"GET /%ED%A0%80 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(REFUSED))
        self.assertEqual(get(layer["http_url"] + "missing")[0], 404)  # still serving; the test checks for errors

    def test_a_handler_without_a_directory_names_its_server(self):
        class Homeless(static.StaticFileRequestHandler):
            pass

        layer = set_up_by_hand(self, custom.Layer(Homeless, name="static_homeless"))
        with self.assertRaises(http.client.HTTPException):
            http_get_raw(layer)
        [error] = layer.server_errors.take()
        self.assertIn(
            f"Homeless, serving {layer['http_host']}:{layer['http_port']}, has no directory to serve.", error
        )

    def test_a_gocept_style_handler_follows_symbolic_links(self):
        outside = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, outside)
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        with open(os.path.join(outside, "elsewhere.txt"), "wb") as file:
            file.write(b"linked")
        os.symlink(os.path.join(outside, "elsewhere.txt"), os.path.join(root, "link.txt"))

        class Handler(static.StaticFileRequestHandler):
            documentroot = root

        layer = set_up_by_hand(self, custom.Layer(Handler, name="static_gocept_links"))
        self.assertEqual(get(layer["http_url"] + "link.txt")[::2], (200, b"linked"))

    def test_a_temporary_directory_the_test_removed_is_no_error_in_tear_down(self):
        layer = static.Layer(name="static_removed_root")
        layer.setUp()
        shutil.rmtree(layer["documentroot"])
        layer.tearDown()  # no FileNotFoundError

    def test_a_link_to_a_directory_is_removed_between_tests_not_its_target(self):
        outside = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, outside)
        with open(os.path.join(outside, "kept.txt"), "wb") as file:
            file.write(b"kept")
        layer = set_up_by_hand(self, static.Layer(name="static_dir_link"))
        os.symlink(outside, os.path.join(layer["documentroot"], "linked-dir"))
        layer.testTearDown()
        layer.testSetUp()
        self.assertEqual(os.listdir(layer["documentroot"]), [])
        self.assertEqual(os.listdir(outside), ["kept.txt"])


def http_get_raw(layer) -> bytes:
    connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
    try:
        connection.request("GET", "/")
        return connection.getresponse().read()
    finally:
        connection.close()


class ClientThatStopsReadingTests(unittest.TestCase):
    """A client that stops reading a file (a browser's <audio> or <video>
    with its buffer full, the page left open) does not keep the file's
    worker past the test: its end cuts the write."""

    def test_the_test_end_frees_the_worker(self):
        layer = set_up_by_hand(self, static.Layer(name="static_stalled_reader"))
        with open(os.path.join(layer["documentroot"], "media.wav"), "wb") as file:
            file.write(bytes(20_000_000))
        before = thread_names()
        reader_that_stops(self, layer, "/media.wav")
        wait_until_a_write_stalls(self, layer)
        assert_the_test_end_cuts_the_write(self, layer, before)
