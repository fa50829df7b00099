"""The static layer answers what browsers and download clients rely on:
byte ranges, entity tags and conditional requests, and 405 for methods it
does not serve. Tried with requests, httpx, http.client and curl."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import http.client
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest
from unittest import mock

import httpx
import requests

from serverlayer import ranges, static
from serverlayer.ranges import Representation, precondition_status, requested

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset's byte known

RANGES = static.Layer(name="RANGES")


class RangeTests(unittest.TestCase):
    layer = RANGES

    def setUp(self):
        with open(os.path.join(self.layer["documentroot"], "data.bin"), "wb") as file:
            file.write(DATA)
        self.url = self.layer["http_url"] + "data.bin"
        self.session = requests.Session()
        self.addCleanup(self.session.close)

    def get(self, **headers: str) -> requests.Response:
        return self.session.get(self.url, headers=headers, timeout=10)

    def test_a_whole_file_says_ranges_are_accepted_and_has_an_etag(self):
        response = self.get()
        self.assertEqual((response.status_code, response.content), (200, DATA))
        self.assertEqual(response.headers["Accept-Ranges"], "bytes")
        self.assertRegex(response.headers["ETag"], r'^"[0-9a-f]+-2800-[0-9a-f]+"$')  # strong: no W/
        # A browser shared by the tests asks each time whether a file
        # changed, rather than taking it from its cache by heuristic.
        self.assertEqual(response.headers["Cache-Control"], "no-cache")
        with mock.patch.object(self.layer["request_handler"], "cache_control", None):  # a subclass's choice
            self.assertNotIn("Cache-Control", self.get().headers)

    def test_single_ranges(self):
        for spec, first, last in [("0-9", 0, 9), ("100-", 100, 10239), ("-16", 10224, 10239),
                                  ("10000-99999", 10000, 10239), ("-99999", 0, 10239), ("5-5", 5, 5)]:
            with self.subTest(spec=spec):
                response = self.get(Range=f"bytes={spec}")
                self.assertEqual(response.status_code, 206)
                self.assertEqual(response.headers["Content-Range"], f"bytes {first}-{last}/10240")
                self.assertEqual(response.content, DATA[first:last + 1])
                self.assertEqual(response.headers["Content-Length"], str(last - first + 1))

    def test_several_ranges_come_as_multipart_byteranges(self):
        response = self.get(Range="bytes=0-3, 20-23,-2")
        self.assertEqual(response.status_code, 206)
        self.assertTrue(response.headers["Content-Type"].startswith("multipart/byteranges; boundary="))
        self.assertEqual(int(response.headers["Content-Length"]), len(response.content))
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + response.headers["Content-Type"].encode() + b"\r\n\r\n" + response.content
        )
        parts = [(part["Content-Range"], part["Content-Type"], part.get_payload(decode=True))
                 for part in message.iter_parts()]
        self.assertEqual(parts, [
            ("bytes 0-3/10240", "application/octet-stream", DATA[0:4]),
            ("bytes 20-23/10240", "application/octet-stream", DATA[20:24]),
            ("bytes 10238-10239/10240", "application/octet-stream", DATA[10238:]),
        ])

    def test_a_suffix_range_first_is_one_of_several(self):
        response = self.get(Range="bytes=-2,0-1")
        self.assertTrue(response.headers["Content-Type"].startswith("multipart/byteranges; boundary="))
        self.assertEqual(response.content.count(b"Content-Range: "), 2)

    def test_an_unsatisfiable_range_is_416_and_the_connection_goes_on(self):
        for spec in ("10240-", "20000-30000", "-0"):
            with self.subTest(spec=spec):
                response = self.get(Range=f"bytes={spec}")
                self.assertEqual(response.status_code, 416)
                self.assertEqual(response.headers["Content-Range"], "bytes */10240")
        self.assertEqual(self.get().content, DATA)  # same session, same connection

    def test_a_range_that_does_not_parse_is_ignored(self):
        for value in ("bytes=9-1", "bytes=a-b", "bytes=", "items=0-1", "bits=0-1", "bytes=-", "bytes=1-2,x"):
            with self.subTest(value=value):
                response = self.get(Range=value)
                self.assertEqual((response.status_code, len(response.content)), (200, 10240))

    def test_empty_list_elements_are_ignored(self):
        # RFC 9110 section 5.6.1.2: a recipient accepts and ignores them.
        for value in ("bytes=0-1,", "bytes=0-1, ,3-4", "bytes=,0-1"):
            with self.subTest(value=value):
                self.assertEqual(self.get(Range=value).status_code, 206)
        self.assertEqual(self.get(Range="bytes=, ,").status_code, 200)  # nothing but empty elements

    def test_positions_of_thousands_of_digits(self):
        # int() refuses more than 4,300 digits: the server raised, the client got nothing.
        huge = "9" * 5000
        response = self.get(Range=f"bytes=0-{huge}")
        self.assertEqual((response.status_code, response.content), (206, DATA))
        self.assertEqual(self.get(Range=f"bytes={huge}-").status_code, 416)
        self.assertEqual(self.get(Range=f"bytes=-{huge}").content, DATA)
        zeros = "0" * 5000  # int() counts leading zeros too
        self.assertEqual(self.get(Range=f"bytes=0-{zeros}5").content, DATA[:6])
        self.assertEqual(self.get(Range=f"bytes={zeros}5-").content, DATA[5:])
        # Still in order however long: last before first is no range, and the field is ignored.
        self.assertEqual(self.get(Range="bytes=10000000000000000000-9999999999999999999").status_code, 200)
        self.assertEqual(self.get(Range=f"bytes=0-1,{huge}-{'9' * 4999}").status_code, 200)

    def test_overlapping_ranges_never_send_more_than_the_file(self):
        response = self.get(Range="bytes=" + ",".join(["0-"] * 1000))
        self.assertEqual((response.status_code, len(response.content)), (200, len(DATA)))  # the whole, once
        self.assertTrue(response.content == DATA)
        response = self.get(Range="bytes=0-9,5-14")  # 20 bytes of 10240: still ranges
        self.assertEqual(response.status_code, 206)
        self.assertEqual(response.content.count(b"Content-Range: "), 2)

    def test_too_many_ranges_get_the_whole_file(self):
        most = ranges.MOST_RANGES
        response = self.get(Range="bytes=" + ",".join(f"{2 * n}-{2 * n}" for n in range(most)))
        self.assertEqual((response.status_code, response.content.count(b"Content-Range: ")), (206, most))
        response = self.get(Range="bytes=" + ",".join(f"{2 * n}-{2 * n}" for n in range(most + 1)))
        self.assertEqual((response.status_code, len(response.content)), (200, len(DATA)))

    def test_if_range_with_the_current_etag_or_date_honours_the_range(self):
        whole = self.get()
        for validator in (whole.headers["ETag"], whole.headers["Last-Modified"]):
            with self.subTest(validator=validator):
                response = self.get(Range="bytes=0-1", **{"If-Range": validator})
                self.assertEqual((response.status_code, response.content), (206, DATA[:2]))

    def test_if_range_with_an_old_validator_sends_the_whole_file(self):
        older = email.utils.formatdate(0, usegmt=True)
        later = "Fri, 01 Jan 2100 00:00:00 GMT"  # only the exact date counts
        # '"!"' sorts before every tag we make: only equality may match.
        for validator in ('"old"', '"!"', older, later, "W/" + self.get().headers["ETag"]):
            with self.subTest(validator=validator):
                response = self.get(Range="bytes=0-1", **{"If-Range": validator})
                self.assertEqual((response.status_code, len(response.content)), (200, 10240))

    def test_head_ignores_the_range(self):
        response = self.session.head(self.url, headers={"Range": "bytes=0-1"}, timeout=10)
        self.assertEqual((response.status_code, response.headers["Content-Length"]), (200, "10240"))

    def test_a_range_goes_out_with_sendfile(self):
        with mock.patch.object(socket.socket, "sendfile", autospec=True, side_effect=socket.socket.sendfile) as sent:
            self.assertEqual(self.get(Range="bytes=100-199").content, DATA[100:200])
        [call] = sent.call_args_list
        self.assertEqual(call.args[2:], (100, 100))

    def test_an_empty_file(self):
        open(os.path.join(self.layer["documentroot"], "empty"), "wb").close()
        url = self.layer["http_url"] + "empty"
        self.assertEqual(self.session.get(url, timeout=10).content, b"")
        self.assertEqual(self.session.get(url, headers={"Range": "bytes=0-"}, timeout=10).status_code, 416)

    def test_a_directory_index_is_a_file_like_any_other(self):
        os.mkdir(os.path.join(self.layer["documentroot"], "docs"))
        with open(os.path.join(self.layer["documentroot"], "docs", "index.html"), "wb") as file:
            file.write(b"<h1>Docs</h1>")
        response = self.session.get(self.layer["http_url"] + "docs/", headers={"Range": "bytes=1-2"}, timeout=10)
        self.assertEqual((response.status_code, response.content), (206, b"h1"))
        self.assertEqual(response.headers["Content-Type"], "text/html")
        self.assertIn("ETag", response.headers)
        redirect = self.session.get(self.layer["http_url"] + "docs", allow_redirects=False, timeout=10)
        self.assertEqual((redirect.status_code, redirect.headers["Location"]), (301, "/docs/"))

    def test_httpx_reads_a_range(self):
        with httpx.Client(timeout=10) as client:
            response = client.get(self.url, headers={"Range": "bytes=256-511"})
        self.assertEqual((response.status_code, response.content), (206, DATA[256:512]))


class ConditionalTests(unittest.TestCase):
    layer = RANGES

    def setUp(self):
        with open(os.path.join(self.layer["documentroot"], "page.html"), "wb") as file:
            file.write(b"<p>hello</p>")
        self.url = self.layer["http_url"] + "page.html"
        self.etag = requests.head(self.url, timeout=10).headers["ETag"]

    def status(self, method: str = "GET", **headers: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=10)
        try:
            connection.request(method, "/page.html", headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def test_if_none_match(self):
        for value in (self.etag, f'"other", {self.etag}', "*", "W/" + self.etag):  # a weak comparison
            with self.subTest(value=value):
                self.assertEqual(self.status(**{"If-None-Match": value}), (304, b""))
        self.assertEqual(self.status(**{"If-None-Match": '"other"'})[0], 200)
        self.assertEqual(self.status(**{"If-None-Match": '"!"'})[0], 200)  # sorts before: only equality matches
        many = ", ".join(f'"tag-{n}"' for n in range(30)) + ", " + self.etag  # longer than 256 characters
        self.assertEqual(self.status(**{"If-None-Match": many})[0], 304)

    def test_a_304_carries_the_etag(self):
        response = requests.get(self.url, headers={"If-None-Match": self.etag}, timeout=10)
        self.assertEqual((response.status_code, response.headers["ETag"]), (304, self.etag))
        self.assertEqual(response.headers["Cache-Control"], "no-cache")  # as the 200 said

    def test_if_none_match_wins_over_if_modified_since(self):
        older = email.utils.formatdate(0, usegmt=True)
        self.assertEqual(self.status(**{"If-None-Match": self.etag, "If-Modified-Since": older})[0], 304)
        later = "Fri, 01 Jan 2100 00:00:00 GMT"
        self.assertEqual(self.status(**{"If-None-Match": '"x"', "If-Modified-Since": later})[0], 200)

    def test_if_modified_since(self):
        last_modified = requests.head(self.url, timeout=10).headers["Last-Modified"]
        self.assertEqual(self.status(**{"If-Modified-Since": last_modified}), (304, b""))
        self.assertEqual(self.status(**{"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})[0], 304)
        self.assertEqual(self.status(**{"If-Modified-Since": email.utils.formatdate(0, usegmt=True)})[0], 200)
        self.assertEqual(self.status("POST", **{"If-Modified-Since": last_modified})[0], 405)  # GET and HEAD only

    def test_dates_in_the_obsolete_asctime_format_count(self):
        # RFC 9110 section 5.6.7: a recipient MUST accept all three HTTP-date
        # formats; asctime's has no zone and is UTC. http.server, which
        # gocept.httpserverlayer's static layer was, answers 304 to it.
        last_modified = email.utils.parsedate_to_datetime(requests.head(self.url, timeout=10).headers["Last-Modified"])
        asctime = time.asctime(last_modified.timetuple())  # "Tue Dec  1 21:33:52 2026"
        self.assertEqual(self.status(**{"If-Modified-Since": asctime}), (304, b""))
        self.assertEqual(self.status(**{"If-Unmodified-Since": "Thu Jan  1 00:00:00 1970"})[0], 412)
        self.assertEqual(self.status(**{"If-Unmodified-Since": asctime})[0], 200)

    def test_if_match(self):
        self.assertEqual(self.status(**{"If-Match": self.etag}), (200, b"<p>hello</p>"))
        self.assertEqual(self.status(**{"If-Match": "*"})[0], 200)
        for value in ('"other"', '"!"', "W/" + self.etag, "garbage"):  # a strong comparison: no weak tag matches
            with self.subTest(value=value):
                self.assertEqual(self.status(**{"If-Match": value})[0], 412)

    def test_if_unmodified_since(self):
        self.assertEqual(self.status(**{"If-Unmodified-Since": email.utils.formatdate(0, usegmt=True)})[0], 412)
        self.assertEqual(self.status(**{"If-Unmodified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})[0], 200)
        self.assertEqual(self.status(**{"If-Unmodified-Since": "not a date"})[0], 200)
        last_modified = requests.head(self.url, timeout=10).headers["Last-Modified"]
        self.assertEqual(self.status(**{"If-Unmodified-Since": last_modified})[0], 200)  # not modified since

    def test_a_changed_file_gets_a_new_etag(self):
        with open(os.path.join(self.layer["documentroot"], "page.html"), "wb") as file:
            file.write(b"<p>changed, and longer</p>")
        self.assertEqual(self.status(**{"If-None-Match": self.etag})[0], 200)

    def test_other_methods_are_405_with_allow(self):
        for method in ("POST", "PUT", "DELETE", "PATCH", "PROPFIND"):
            with self.subTest(method=method):
                response = requests.request(method, self.url, data=b"x" * 10, timeout=10)
                self.assertEqual(response.status_code, 405)
                self.assertEqual(response.headers["Allow"], "GET, HEAD")
                self.assertIn(f"{method} is not allowed here", response.text)

    def test_a_handler_subclass_keeps_its_own_methods(self):
        class Uploads(static.StaticFileHandler):
            def do_POST(self):
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

        with mock.patch.object(self.layer["httpd"], "handler_class", Uploads):
            self.assertEqual(requests.post(self.url, data=b"x", timeout=10).status_code, 201)


class FileHandlingTests(unittest.TestCase):
    """What happens to the file being served when something goes wrong."""

    layer = RANGES

    def setUp(self):
        with open(os.path.join(self.layer["documentroot"], "data.bin"), "wb") as file:
            file.write(DATA)
        self.url = self.layer["http_url"] + "data.bin"

    def test_a_file_that_cannot_be_opened_is_not_found(self):
        # As root, as tests often run, no permission keeps a file from
        # being read: make the open fail instead.
        with mock.patch("serverlayer.static.open", create=True, side_effect=PermissionError(13, "denied")):
            response = requests.get(self.url, timeout=10)
        self.assertEqual(response.status_code, 404)
        self.assertEqual(requests.get(self.url, timeout=10).content, DATA)  # and it keeps serving

    def test_the_file_is_closed_when_answering_fails(self):
        opened = []

        def tracking_open(*args, **kwargs):
            opened.append(open(*args, **kwargs))  # noqa: SIM115 - the handler closes it
            return opened[-1]

        with mock.patch("serverlayer.static.open", create=True, side_effect=tracking_open), \
                mock.patch("serverlayer.ranges.precondition_status", side_effect=RuntimeError("boom")):
            with self.assertRaises(requests.ConnectionError):
                requests.get(self.url, timeout=10)
            self.assertTrue(self.layer["httpd"].wait_quiet(5))
        [error] = self.layer.server_errors.take()
        self.assertIn("RuntimeError: boom", error)
        [file] = opened
        self.assertTrue(file.closed)

    def test_a_handler_that_buffers_its_output_gets_the_range(self):
        class Buffering(static.StaticFileHandler):
            def do_GET(self):
                body = self.send_head()
                if body is not None:
                    buffer = io.BytesIO()
                    try:
                        self.copyfile(body, buffer)
                    finally:
                        body.close()
                    self.wfile.write(buffer.getvalue())

        with mock.patch.object(self.layer["httpd"], "handler_class", Buffering):
            for headers, expected in [({"Range": "bytes=2-4"}, DATA[2:5]), ({}, DATA)]:
                with self.subTest(headers=headers):
                    self.assertEqual(requests.get(self.url, headers=headers, timeout=10).content, expected)
            self.assertEqual(requests.get(self.layer["http_url"], timeout=10).status_code, 200)  # a listing


@unittest.skipUnless(shutil.which("curl"), "curl is not installed")
class CurlTests(unittest.TestCase):
    layer = RANGES

    def test_curl_resumes_a_download(self):
        with open(os.path.join(self.layer["documentroot"], "big.bin"), "wb") as file:
            file.write(DATA * 10)
        with tempfile.TemporaryDirectory() as directory:
            target = os.path.join(directory, "big.bin")
            with open(target, "wb") as partial:
                partial.write((DATA * 10)[:30000])  # what an interrupted download left
            completed = subprocess.run(
                ["curl", "--silent", "--show-error", "--fail", "-C", "-", "-o", target,
                 "--write-out", "%{http_code}", self.layer["http_url"] + "big.bin"],
                capture_output=True, text=True, timeout=60,
            )
            self.assertEqual((completed.returncode, completed.stdout, completed.stderr), (0, "206", ""))
            with open(target, "rb") as result:
                self.assertEqual(result.read(), DATA * 10)
        [request] = self.layer["http_requests"]
        self.assertEqual(request.headers["Range"], "bytes=30000-")


class RuleTests(unittest.TestCase):
    """The RFC 9110 rules, without a server."""

    file = Representation(size=100, etag='"abc"', modified=1_000_000)

    def test_a_put_with_a_matching_if_none_match_fails_the_precondition(self):
        self.assertEqual(precondition_status(self.file, "PUT", {"If-None-Match": "*"}), 412)
        self.assertIsNone(precondition_status(self.file, "PUT", {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}))

    def test_range_only_for_get(self):
        for method in ("HEAD", "DELETE", "CONNECT", "POST"):
            self.assertIsNone(requested(self.file, method, {"Range": "bytes=0-1"}))
        self.assertEqual(requested(self.file, "GET", {"Range": "BYTES=0-1"}), [(0, 1)])

    def test_a_date_without_a_zone_is_no_date(self):
        self.assertIsNone(precondition_status(self.file, "GET", {"If-Unmodified-Since": "Mon, 12 Jan 1970 13:46:40"}))


if __name__ == "__main__":
    unittest.main()
