"""The content layer matches requests on their body (JSON, forms, bytes, a
function) and on the decoded path, and says how a near miss differs.
Requests come from requests, httpx and urllib, as applications send them."""

from __future__ import annotations

import gzip
import json
import re
import unittest
import urllib.request
from unittest import mock

import httpx
import requests

from serverlayer import ConfigurationError, ExpectationError, content
from serverlayer.matching import form_differences, form_fields, json_differences, shortened, shown

MATCHING = content.Layer(name="MATCHING")


class BodyMatchingTests(unittest.TestCase):
    layer = MATCHING

    def setUp(self):
        self.http_content = self.layer["http_content"]
        self.url = self.layer["http_url"]

    def test_json_equal_after_parsing(self):
        self.http_content.route("/charges", "POST", json={"amount": 4200, "currency": "EUR"}).respond("charged")
        self.http_content.route("/charges", "POST").respond("other", status=400)
        self.assertEqual(requests.post(self.url + "charges", json={"currency": "EUR", "amount": 4200}, timeout=10).text,
                         "charged")
        for other in ({"amount": 42.0, "currency": "EUR"}, {"amount": 4200, "currency": "EUR", "extra": 1}, [4200]):
            with self.subTest(other=other):
                self.assertEqual(requests.post(self.url + "charges", json=other, timeout=10).text, "other")

    def test_json_null_is_matched_too(self):
        self.http_content.route("/null", json=None).respond("null")
        self.assertEqual(requests.post(self.url + "null", data=b"null", timeout=10).text, "null")
        self.assertEqual(requests.post(self.url + "null", data=b"0", timeout=10).status_code, 404)

    def test_json_subset_at_any_depth(self):
        self.http_content.route("/events", json_subset={"type": "order", "order": {"total": 10}}).respond("seen")
        body = {"type": "order", "id": 7, "order": {"total": 10, "items": [1, 2]}}
        self.assertEqual(httpx.post(self.url + "events", json=body, timeout=10).text, "seen")
        body["order"]["total"] = 11
        self.assertEqual(httpx.post(self.url + "events", json=body, timeout=10).status_code, 404)

    def test_urlencoded_and_multipart_forms(self):
        self.http_content.route("/login", form={"user": "ann", "role": ["a", "b"]}).respond("welcome")
        fields = {"user": "ann", "role": ["a", "b"], "remember": "1"}
        self.assertEqual(requests.post(self.url + "login", data=fields, timeout=10).text, "welcome")
        multipart = {"user": (None, "ann"), "role": (None, "a")}  # role has one value, not two
        self.assertEqual(requests.post(self.url + "login", files=multipart, timeout=10).status_code, 404)
        self.http_content.route("/upload", form={"note": "hi", "file": "contents"}).respond("stored")
        response = httpx.post(self.url + "upload", data={"note": "hi"}, files={"file": ("a.txt", b"contents")},
                              timeout=10)
        self.assertEqual(response.text, "stored")

    def test_exact_data(self):
        self.http_content.route("/raw", data=b"\x00\x01").respond("bytes")
        self.http_content.route("/text", data="café").respond("text")
        self.assertEqual(urllib.request.urlopen(self.url + "raw", data=b"\x00\x01", timeout=10).read(), b"bytes")
        self.assertEqual(urllib.request.urlopen(self.url + "text", data="café".encode(), timeout=10).read(), b"text")
        for other in (b"\x00\x02", b"\x00", b""):  # after, before and empty: only equal bytes match
            self.assertEqual(requests.post(self.url + "raw", data=other, timeout=10).status_code, 404)

    def test_a_match_function_sees_the_recorded_request(self):
        self.http_content.route("/any", match=lambda request: request.headers["X-Tenant"] == "blue").respond("blue")
        self.assertEqual(requests.get(self.url + "any", headers={"X-Tenant": "blue"}, timeout=10).text, "blue")
        self.assertEqual(requests.get(self.url + "any", headers={"X-Tenant": "red"}, timeout=10).status_code, 404)

    def test_the_decoded_path_matches_and_raw_path_matches_as_sent(self):
        self.http_content.route("/café").respond("decoded")
        self.http_content.route("/a%2Fb", raw_path=True).respond("as sent")
        self.assertEqual(requests.get(self.url + "café", timeout=10).text, "decoded")  # sent as /caf%C3%A9
        self.assertEqual(requests.get(self.url + "a%2Fb", timeout=10).text, "as sent")
        self.assertEqual(requests.get(self.url + "a/b", timeout=10).status_code, 404)  # not the same path

    def test_a_route_written_encoded_still_matches(self):
        self.http_content.route("/caf%C3%A9").respond("encoded")
        self.assertEqual(requests.get(self.url + "café", timeout=10).text, "encoded")

    def test_a_match_that_is_no_function_is_refused(self):
        with self.assertRaises(ConfigurationError):
            self.http_content.route("/x", match="yes")  # type: ignore[arg-type]

    def test_fields_that_are_no_text_are_refused_when_declared(self):
        # form={"n": 1} failed inside the server at the first request (a
        # TypeError that dropped the client's connection); query= with a
        # bare TypeError.
        for call, message in (
            (lambda: self.http_content.route("/f", "POST", form={"n": 1}), "field 'n' is 1; a value is a str or"
             " a list of str, as fields arrive in a request (write '1')."),
            (lambda: self.http_content.expect("/f", "POST", form={"n": [1, 2]}, times=1), "(write ['1', '2'])"),
            (lambda: self.http_content.route("/s", query={"page": 1}), "query=: field 'page' is 1"),
            (lambda: self.http_content.route("/s", query={"page": b"1"}), "field 'page' is b'1'; a value is a"),
            (lambda: self.http_content.route("/s", query={1: "x"}), "a field's name is a str; 1 is not."),
            (lambda: self.http_content.route("/s", query=[("page", "1")]), "give a mapping of field names"),
        ):
            with self.assertRaises(ConfigurationError) as caught:
                call()
            self.assertIn(message, str(caught.exception))
        self.http_content.route("/f", "POST", form={"n": ["1", "2"]}).respond("listed")
        self.assertEqual(requests.post(self.url + "f", data={"n": ["1", "2"]}, timeout=10).text, "listed")
        self.http_content.route("/g", query={"tag": (each for each in ["a", "b"])}).respond("generated")
        self.assertEqual(requests.get(self.url + "g?tag=a&tag=b", timeout=10).text, "generated")  # as before

    def test_body_conditions_no_body_could_meet_are_refused_when_declared(self):
        # data={"amount": 4200} (JSON meant) or data=5 matched no request,
        # and said so only when the test ended; json={1, 2} answered the
        # client a 500 and made the end-of-test report raise a TypeError.
        for call, message in (
            (lambda: self.http_content.route("/d", data={"amount": 4200}),
             "data={'amount': 4200}: the exact body, bytes or str; to match it parsed as JSON, write json="),
            (lambda: self.http_content.expect("/d", data=5), "data=5: the exact body, bytes or str"),
            (lambda: self.http_content.expect("/j", json={1, 2}), "json={1, 2} is no JSON value"),
            (lambda: self.http_content.route("/j", json=float("nan")), "json=nan is no JSON value"),
            (lambda: self.http_content.route("/j", json_subset={"at": object()}), "json_subset={'at': <object"),
        ):
            with self.assertRaises(ConfigurationError) as caught:
                call()
            self.assertIn(message, str(caught.exception))
        self.assertEqual(self.http_content.expectations, [])
        self.http_content.route("/d", data=bytearray(b"ab")).respond("bytes")
        self.assertEqual(requests.post(self.url + "d", data=b"ab", timeout=10).text, "bytes")


class MatchingCostTests(unittest.TestCase):
    """Body matchers cost a request only what it must: bench_matching.py
    measures the rate; these count the work."""

    layer = MATCHING

    def test_the_body_is_parsed_once_for_all_routes(self):
        stand_in = self.layer["http_content"]
        for amount in range(5):
            stand_in.route("/charges", json={"amount": amount}).respond(f"route {amount}")
        with mock.patch("serverlayer.recording.json.loads", wraps=json.loads) as loads:
            answer = requests.post(stand_in.url_for("/charges"), json={"amount": 4}, timeout=10).text
        self.assertEqual(answer, "route 4")
        self.assertEqual(loads.call_count, 1)

    def test_a_route_on_another_path_leaves_the_body_alone(self):
        stand_in = self.layer["http_content"]
        seen = []
        stand_in.route("/elsewhere", json={"amount": 1}, match=seen.append).respond("no")
        stand_in.route("/charges").respond("yes")
        self.assertEqual(requests.post(stand_in.url_for("/charges"), json={"amount": 1}, timeout=10).text, "yes")
        [request] = self.layer["http_requests"]
        self.assertNotIn("parsed_json", vars(request))
        self.assertEqual(seen, [])


class URLTests(unittest.TestCase):

    def test_url_for_while_set_up(self):
        layer = content.Layer(name="url_for")
        http_content = layer.content
        with self.assertRaises(ConfigurationError) as caught:
            http_content.url_for("/x")
        self.assertIn("while the layer is set up", str(caught.exception))
        layer.setUp()
        self.addCleanup(layer.tearDown)
        self.assertEqual(http_content.url_for("/charges"), layer["http_url"] + "charges")
        self.assertEqual(http_content.url_for("charges?x=1"), layer["http_url"] + "charges?x=1")
        layer.tearDown()
        with self.assertRaises(ConfigurationError):
            http_content.url_for("/x")


class NearMissTests(unittest.TestCase):
    """The closest requests say how their bodies differ."""

    layer = MATCHING

    def setUp(self):
        self.http_content = self.layer["http_content"]
        self.url = self.layer["http_url"]

    def tearDown(self):
        self.http_content.reset()  # these tests leave expectations unmet on purpose

    def failure(self) -> str:
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        return str(caught.exception)

    def test_json_paths_that_differ(self):
        self.http_content.expect("/charges", "POST", json={"amount": 4200, "currency": "EUR"})
        requests.post(self.url + "charges", json={"amount": 42.0, "currency": "EUR", "note": "x"}, timeout=10)
        self.assertIn(
            """- expected POST /charges with JSON '{"amount": 4200, "currency": "EUR"}' once,"""
            " it was requested 0 time(s).\n"
            "  Closest requests that arrived:\n"
            "    POST /charges (48 bytes): body $.amount is 42.0, not 4200; body $.note is not expected",
            self.failure(),
        )

    def test_form_fields_that_differ(self):
        self.http_content.expect("/login", form={"user": "ann", "pin": "1234"})
        requests.post(self.url + "login", data={"user": "bob"}, timeout=10)
        self.assertIn("field user is 'bob', not 'ann'; field pin is missing", self.failure())

    def test_long_bodies_that_differ_late_say_where(self):
        # Both bodies were cut to their first 60 characters, the same in
        # each: "body is b'aaaa..., not b'aaaa..." said nothing.
        self.http_content.expect("/upload", "POST", data=b"a" * 100_000)
        requests.post(self.url + "upload", data=b"a" * 99_999 + b"b", timeout=10)
        requests.post(self.url + "upload", data=b"a" * 50_000, timeout=10)
        text = self.failure()
        self.assertIn("- expected POST /upload with body b'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa..."
                      " (100000 bytes) once", text)
        self.assertIn("POST /upload (100000 bytes): body differs from byte 99999 on: it has b'b', not b'a'", text)
        self.assertIn("POST /upload (50000 bytes): body is 50000 bytes, not 100000, the same as far as it goes", text)

    def test_json_text_is_shown_as_written(self):
        # It was shown escaped, "Zo\\u00eb" and "Zo\u00eb", where the test wrote "Zoë".
        self.http_content.expect("/customers", "POST", json={"name": "Zoë", "city": "Köln"})
        requests.post(self.url + "customers", json={"name": "Zoe", "city": "Köln"}, timeout=10)
        text = self.failure()
        self.assertIn("""expected POST /customers with JSON '{"name": "Zoë", "city": "Köln"}' once""", text)
        self.assertIn('body $.name is "Zoe", not "Zoë"', text)

    def test_a_path_pattern_is_not_shown_as_a_path(self):
        # It was shown between slashes, "DELETE //users/\d+/", which reads as
        # the path //users/\d+/, though "//users" is a path of its own here.
        self.http_content.expect(re.compile(r"/users/\d+"), "DELETE")
        requests.delete(self.url + "users/ann", timeout=10)
        text = self.failure()
        self.assertIn("- expected DELETE a path matching '/users/\\\\d+' once", text)
        self.assertIn("DELETE /users/ann: path /users/ann does not match '/users/\\\\d+'", text)
        self.assertNotIn("//users", text)

    def test_a_compressed_body_is_said_to_be_compressed(self):
        # Compressed bodies are not decoded; the report said "body is no
        # JSON: b'\x1f\x8b...'" and, of a form, "field a is missing".
        self.http_content.expect("/ingest", "POST", json={"events": [1, 2]})
        self.http_content.expect("/form", "POST", form={"a": "1"})
        requests.post(self.url + "ingest", data=gzip.compress(b'{"events": [1, 2]}'), timeout=10,
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        requests.post(self.url + "form", data=gzip.compress(b"a=1"), timeout=10,
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"})
        text = self.failure()
        self.assertIn("POST /ingest (38 bytes): body is compressed (Content-Encoding: gzip), which json= and form="
                      " do not decode: match it with match=", text)
        self.assertIn("POST /form (23 bytes): body is compressed (Content-Encoding: gzip)", text)
        self.assertNotIn("field a is missing", text)

    def test_a_body_that_is_no_form_or_json(self):
        self.http_content.expect("/login", form={"user": "ann"})
        self.http_content.expect("/api", json={"a": 1})
        requests.post(self.url + "login", json={"user": "ann"}, timeout=10)
        requests.post(self.url + "api", data=b"a=1", timeout=10)
        text = self.failure()
        self.assertIn("body is no form (Content-Type application/json)", text)
        self.assertIn("body is no JSON: b'a=1'", text)

    def test_a_match_function_that_raises_is_reported_as_not_matching(self):
        def order_seven(request):
            return request.json()["id"] == 7

        self.http_content.expect("/orders", "POST", match=order_seven).respond("ok")
        answer = requests.post(self.url + "orders", data={"id": "7"}, timeout=10)  # a form, no JSON
        self.assertEqual(answer.status_code, 500)  # the function failed the request
        self.assertTrue(self.layer["httpd"].wait_quiet(5))
        [error] = self.layer.server_errors.take()
        self.assertIn("JSONDecodeError", error)
        self.assertIn(
            "  Closest requests that arrived:\n    POST /orders (4 bytes):"
            " NearMissTests.test_a_match_function_that_raises_is_reported_as_not_matching.<locals>.order_seven"
            "(request) raised JSONDecodeError: Expecting value: line 1 column 1 (char 0)",
            self.failure(),
        )

    def test_an_answer_function_that_raises_answers_500_and_fails_the_test(self):
        self.http_content.route("/quote").respond_with(lambda request: {"price": 1 / 0})
        self.assertEqual(requests.get(self.url + "quote", timeout=10).status_code, 500)
        [error] = self.layer.server_errors.take()
        self.assertIn("ZeroDivisionError", error)

    def test_many_differences_are_cut_short(self):
        self.http_content.expect("/bulk", json={f"k{n}": n for n in range(8)})
        requests.post(self.url + "bulk", json={f"k{n}": -n - 1 for n in range(8)}, timeout=10)
        text = self.failure()
        self.assertIn("body $.k4 is -5, not 4; and 3 more differences", text)
        self.assertNotIn("$.k5", text)


class DifferenceTests(unittest.TestCase):

    def test_the_match_function_is_asked_only_when_nothing_else_differs(self):
        from serverlayer.recording import RecordedRequest

        asked = []

        def never(request):
            asked.append(request)
            return False

        request = RecordedRequest("GET", "/other", "q=2", (("X-Key", "b"),), b"{}")
        for route, difference in [
            (content.Route("/other", "POST", match=never), "method is GET, not POST"),
            (content.Route("/path", match=never), "path is /other, not /path"),
            (content.Route("/other", query={"q": "1"}, match=never), "query q is ['2'], not ['1']"),
            (content.Route("/other", headers={"X-Key": "a"}, match=never), "header X-Key is 'b', not 'a'"),
            (content.Route("/other", json={"a": 1}, match=never), "body $.a is missing"),
        ]:
            with self.subTest(difference=difference):
                self.assertEqual(route.differences(request), [difference])
        self.assertEqual(asked, [])
        self.assertEqual(content.Route("/other", match=never).differences(request),
                         [f"{never.__qualname__}(request) returned false"])
        self.assertEqual(asked, [request])

    def test_json_subset_allows_more_keys_only(self):
        self.assertEqual(json_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}, "d": 3}, subset=True), [])
        self.assertEqual(json_differences({"a": [{"b": 1}]}, {"a": [{"b": 2, "c": 3}]}, subset=True),
                         ["$.a[0].b is 2, not 1"])

    def test_form_fields(self):
        self.assertEqual(form_fields("application/x-www-form-urlencoded; charset=utf-8", b"a=1&a=2&b="),
                         {"a": ["1", "2"], "b": [""]})
        self.assertIsNone(form_fields("text/plain", b"a=1"))
        self.assertIsNone(form_fields("multipart/form-data; boundary=x", b"not multipart"))
        self.assertEqual(form_differences({"a": ["1", "2"]}, {"a": ["1"]}), ["field a is '1', not ['1', '2']"])

    def test_json_kinds_that_differ(self):
        self.assertEqual(json_differences({"a": 1}, [1]), ['$ is [1], not {"a": 1}'])
        self.assertEqual(json_differences([1], {"a": 1}), ['$ is {"a": 1}, not [1]'])
        self.assertEqual(json_differences([1], [1, 2]), ["$ has 2 items, not 1"])
        self.assertEqual(json_differences([0] * 300, [0] * 300), [])  # long lists: lengths compared by value

    def test_a_field_with_several_values_shows_them_all(self):
        self.assertEqual(form_differences({"a": "1"}, {"a": ["1", "2"]}), ["field a is ['1', '2'], not '1'"])
        self.assertEqual(form_differences({"a": "1"}, {"a": ["2"]}), ["field a is '2', not '1'"])

    def test_shown_cuts_long_values(self):
        self.assertEqual(shown("y" * 58), "'" + "y" * 58 + "'")  # 60 characters: whole
        self.assertEqual(shown("y" * 59), "'" + "y" * 56 + "...")
        self.assertEqual(shown(b"ab", limit=5), "b'ab'")

    def test_shortened(self):
        self.assertEqual(shortened([str(n) for n in range(5)], ""), ["0", "1", "2", "3", "4"])  # all five, no "more"
        self.assertEqual(shortened(["a", "b"], "> "), ["> a", "> b"])
        self.assertEqual(shortened([str(n) for n in range(7)], ""), ["0", "1", "2", "3", "4", "and 2 more differences"])


if __name__ == "__main__":
    unittest.main()
