"""The notes application, tested through a real HTTP server.

The tests talk to the server the way a browser would, with the standard
library's clients: ``urllib.request`` follows redirects like a browser,
``http.client`` does not, so it shows the redirect itself. Nothing here
calls the application directly; what passes here works over the wire.
"""

from __future__ import annotations

import http.client
import json
import os
import unittest
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from notes.testing import NOTES_HTTP
from serverlayer.static import STATIC_FILES

#: Seconds a request may take before the test fails instead of hanging.
TIMEOUT = 10


class NotesTests(unittest.TestCase):
    """The notes application served by ``NOTES_HTTP``.

    Several tests assert the exact list of notes. They pass in any order
    only because ``NOTES_APP`` empties the store before each test; if it
    did not, whichever ran second would see the notes of the first.
    """

    layer = NOTES_HTTP

    def url(self, path: str) -> str:
        """An absolute URL on the test server; ``http_url`` ends in ``/``."""
        return urllib.parse.urljoin(str(self.layer["http_url"]), path)

    def get(self, path: str) -> tuple[str, str, bytes]:
        """GET ``path``; return the final URL, the content type and the body."""
        with urllib.request.urlopen(self.url(path), timeout=TIMEOUT) as response:
            return response.url, response.headers["Content-Type"], response.read()

    def get_json(self, path: str) -> Any:
        _, content_type, body = self.get(path)
        self.assertEqual(content_type, "application/json")
        return json.loads(body)

    def post_note(self, text: str) -> str:
        """Submit the form like a browser; return the page it ends up on."""
        data = urllib.parse.urlencode({"text": text}).encode("ascii")
        with urllib.request.urlopen(self.url("notes"), data=data, timeout=TIMEOUT) as response:
            self.assertEqual(response.status, 200)
            self.assertEqual(response.url, self.url("/"))
            page: bytes = response.read()
            return page.decode("utf-8")

    def raw_post(self, path: str, body: str) -> http.client.HTTPResponse:
        """POST without following redirects, to see the response itself."""
        connection = http.client.HTTPConnection(
            self.layer["http_host"], self.layer["http_port"], timeout=TIMEOUT
        )
        self.addCleanup(connection.close)
        connection.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = connection.getresponse()
        response.read()  # so that closing the connection leaves nothing unread
        return response

    def test_front_page_shows_form_and_no_notes(self) -> None:
        _, content_type, body = self.get("/")
        page = body.decode("utf-8")
        self.assertEqual(content_type, "text/html; charset=utf-8")
        self.assertIn('<form method="post" action="/notes">', page)
        self.assertIn('<input name="text"', page)
        self.assertIn("No notes yet.", page)

    def test_post_answers_303_see_other_to_front_page(self) -> None:
        response = self.raw_post("/notes", "text=remember+the+milk")
        self.assertEqual(response.status, 303)
        self.assertEqual(response.getheader("Location"), "/")

    def test_posted_note_shows_on_page_and_in_json(self) -> None:
        page = self.post_note("Buy milk")
        self.assertIn("<li>Buy milk</li>", page)
        self.assertNotIn("No notes yet.", page)
        self.assertEqual(self.get_json("/notes.json"), ["Buy milk"])

    def test_notes_keep_their_order(self) -> None:
        self.post_note("first")
        self.post_note("second")
        self.assertEqual(self.get_json("/notes.json"), ["first", "second"])
        page = self.get("/")[2].decode("utf-8")
        self.assertLess(page.index("<li>first</li>"), page.index("<li>second</li>"))

    def test_note_text_is_escaped_and_survives_unicode(self) -> None:
        text = "<script>alert('hi')</script> Grüße ☕"
        page = self.post_note(text)
        self.assertNotIn("<script>", page)
        self.assertIn("&lt;script&gt;alert(&#x27;hi&#x27;)&lt;/script&gt; Grüße ☕", page)
        self.assertEqual(self.get_json("/notes.json"), [text])

    def test_empty_note_is_rejected(self) -> None:
        response = self.raw_post("/notes", "text=++")
        self.assertEqual(response.status, 400)
        self.assertEqual(self.get_json("/notes.json"), [])

    def test_unknown_path_is_404(self) -> None:
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.get("/no-such-page")
        caught.exception.close()
        self.assertEqual(caught.exception.code, 404)

    def test_wrong_method_is_405(self) -> None:
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.get("/notes")
        caught.exception.close()
        self.assertEqual(caught.exception.code, 405)
        self.assertEqual(caught.exception.headers["Allow"], "POST")


class StaticFilesTests(unittest.TestCase):
    """``STATIC_FILES`` serves whatever a test writes into ``documentroot``.

    Handy for anything that must fetch files over HTTP: a client under
    test, a downloader, a page loading assets. The layer empties the
    directory before each test, which ``setUp`` checks here.
    """

    layer = STATIC_FILES

    def setUp(self) -> None:
        self.documentroot = str(self.layer["documentroot"])
        self.assertEqual(os.listdir(self.documentroot), [])

    def fetch(self, path: str) -> tuple[str, bytes]:
        url = urllib.parse.urljoin(str(self.layer["http_url"]), path)
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.headers["Content-Type"], response.read()

    def test_serves_a_file_written_by_the_test(self) -> None:
        with open(os.path.join(self.documentroot, "notes.json"), "w", encoding="utf-8") as file:
            json.dump(["from a file"], file)
        content_type, body = self.fetch("notes.json")
        self.assertEqual(content_type, "application/json")
        self.assertEqual(json.loads(body), ["from a file"])

    def test_serves_subdirectories_and_404s_missing_files(self) -> None:
        os.mkdir(os.path.join(self.documentroot, "css"))
        with open(os.path.join(self.documentroot, "css", "site.css"), "wb") as file:
            file.write(b"body { margin: 0 }\n")
        self.assertEqual(self.fetch("css/site.css"), ("text/css", b"body { margin: 0 }\n"))
        with self.assertRaises(urllib.error.HTTPError) as caught:
            self.fetch("css/missing.css")
        caught.exception.close()
        self.assertEqual(caught.exception.code, 404)
