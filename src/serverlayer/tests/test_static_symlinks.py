"""Symbolic links in the document root, as tests use them: fixtures linked in.

gocept.httpserverlayer (like ``SimpleHTTPRequestHandler``, nginx and
Apache) serves a link in the document root wherever it points, and tests
rely on it to serve fixture files and folders without copying them. Our
static layer follows them too; ``follow_symlinks=False`` refuses those
that lead outside. A URL itself leaves the root in neither mode.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import unittest

from serverlayer import ConfigurationError, static
from serverlayer.tests.helpers import raw_request

FIXTURE = b"fixture kept outside the document root"
SECRET = b"beside the fixtures, reachable by no URL"

#: Written as a gocept.httpserverlayer user writes them: unnamed.
FILES = static.Layer()
STRICT_FILES = static.Layer(follow_symlinks=False)

#: URLs that try to leave the document root (or the linked folder) by themselves.
TRAVERSALS = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E%2fsecret.txt",
    "/..%2fsecret.txt",
    "/%252e%252e/secret.txt",
    "/..\\secret.txt",
    "/%5c..%5csecret.txt",
    "/secret.txt%00.html",
    "/linked-folder/../../secret.txt",
    "/linked-folder/..%2f..%2fsecret.txt",
    "/linked-folder/%2e%2e/secret.txt",
]


def get(layer, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class LinkedFixtures:
    """Links ``fixture.txt`` and the folder ``fixtures`` of a directory
    outside into the layer's document root."""

    def setUp(self):
        outside = tempfile.mkdtemp(prefix="serverlayer-symlinks-")
        self.addCleanup(shutil.rmtree, outside)
        fixtures = os.path.join(outside, "fixtures")
        os.mkdir(fixtures)
        for path, data in ((os.path.join(outside, "fixture.txt"), FIXTURE),
                           (os.path.join(fixtures, "data.txt"), FIXTURE),
                           (os.path.join(outside, "secret.txt"), SECRET)):
            with open(path, "wb") as file:
                file.write(data)
        root = self.layer["documentroot"]
        os.symlink(os.path.join(outside, "fixture.txt"), os.path.join(root, "linked-file.txt"))
        os.symlink(fixtures, os.path.join(root, "linked-folder"))
        with open(os.path.join(root, "inside.txt"), "wb") as file:
            file.write(b"inside")
        self.absolute_secret = os.path.join(outside, "secret.txt")

    def test_no_url_leaves_the_root_by_itself(self):
        attempts = [*TRAVERSALS, self.absolute_secret, "/" + self.absolute_secret.replace("/", "%2f")]
        for target in attempts:
            with self.subTest(target=target):
                response = raw_request(
                    self.layer["http_host"], self.layer["http_port"], f"GET {target} HTTP/1.0\r\n\r\n".encode()
                )
                self.assertNotIn(SECRET, response)
                self.assertEqual(response.partition(b"\r\n")[0], b"HTTP/1.1 404 File not found", response[:200])
                self.assertEqual(get(self.layer, "/inside.txt"), (200, b"inside"))  # still serving


class FollowedLinksTests(LinkedFixtures, unittest.TestCase):
    layer = FILES

    def test_a_linked_file_is_served(self):
        self.assertEqual(get(self.layer, "/linked-file.txt"), (200, FIXTURE))

    def test_a_linked_folder_is_served(self):
        self.assertEqual(get(self.layer, "/linked-folder/data.txt"), (200, FIXTURE))
        status, listing = get(self.layer, "/linked-folder/")
        self.assertEqual(status, 200)
        self.assertIn(b"data.txt", listing)


class StrictLinksTests(LinkedFixtures, unittest.TestCase):
    layer = STRICT_FILES

    def test_a_linked_file_is_refused(self):
        status, body = get(self.layer, "/linked-file.txt")
        self.assertEqual(status, 404)
        self.assertNotIn(FIXTURE, body)
        self.assertEqual(get(self.layer, "/inside.txt"), (200, b"inside"))  # still serving

    def test_a_linked_folder_is_refused(self):
        status, body = get(self.layer, "/linked-folder/data.txt")
        self.assertEqual(status, 404)
        self.assertNotIn(FIXTURE, body)
        status, listing = get(self.layer, "/linked-folder/")
        self.assertEqual(status, 404)
        self.assertNotIn(b"data.txt", listing)
        self.assertEqual(get(self.layer, "/inside.txt"), (200, b"inside"))  # still serving

    def test_a_linked_index_page_is_refused(self):
        os.mkdir(os.path.join(self.layer["documentroot"], "site"))
        os.symlink(os.path.join(os.path.dirname(self.absolute_secret), "fixture.txt"),
                   os.path.join(self.layer["documentroot"], "site", "index.html"))
        status, body = get(self.layer, "/site/")
        self.assertEqual(status, 404)
        self.assertNotIn(FIXTURE, body)
        self.assertEqual(get(self.layer, "/inside.txt"), (200, b"inside"))  # still serving

    def test_files_inside_are_still_served(self):
        self.assertEqual(get(self.layer, "/inside.txt"), (200, b"inside"))


class FollowSymlinksSettingTests(unittest.TestCase):

    def test_follow_symlinks_is_true_or_false(self):
        # follow_symlinks="no" (or "false", read from a configuration) was
        # taken as true: the layer served links leading outside, the very
        # thing it was asked not to. tls="no" is refused the same way.
        for value in ("no", "false", "False", 0, 1):
            with self.subTest(value=value):
                with self.assertRaises(ConfigurationError) as raised:
                    static.Layer(name="symlinks_setting", follow_symlinks=value)
                self.assertIn(f"follow_symlinks={value!r} must be True or False", str(raised.exception))
        self.assertFalse(static.Layer(name="symlinks_strict", follow_symlinks=False).follow_symlinks)
