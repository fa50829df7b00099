"""The content layer: answers a test programs, faults, and expectations."""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import socket
import socketserver
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
from unittest import mock

import httpx
import requests

from serverlayer import ConfigurationError, ExpectationError, content, wsgi
from serverlayer.content import Response
from serverlayer.tests.helpers import run_testrunner
from serverlayer.tests.test_hardening import read_until_closed

CONTENT = content.HTTP_CONTENT


def raw_request_socket(layer) -> socket.socket:
    return socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)


def call(layer, path, data=None, method=None, headers=None, timeout=5):
    request = urllib.request.Request(layer["http_url"] + path.lstrip("/"), data=data, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


class DefaultAnswerTests(unittest.TestCase):
    layer = CONTENT

    def test_nothing_set_is_404(self):
        self.assertEqual(call(self.layer, "/anything")[0], 404)

    def test_serve_content_answers_everything(self):
        self.layer["http_content"].serve_content("hello", headers={"X-Served": "yes"})
        for path in ("/", "/a/b", "/c?d=e"):
            status, headers, body = call(self.layer, path)
            self.assertEqual((status, body, headers["X-Served"]), (200, b"hello", "yes"))
        self.assertEqual(call(self.layer, "/", data=b"x", method="DELETE")[2], b"hello")

    def test_defaults_are_back_for_each_test(self):
        http_content = self.layer["http_content"]
        http_content.serve_content("left over", code=201, headers={"X-Left": "over"})
        http_content.route("/route").respond("a route")
        http_content.handler = lambda request: Response(200, "a handler") if request.path == "/handled" else None
        self.assertEqual(call(self.layer, "/")[:3:2], (201, b"left over"))
        self.assertEqual(call(self.layer, "/route")[:3:2], (200, b"a route"))
        self.assertEqual(call(self.layer, "/handled")[:3:2], (200, b"a handler"))
        # What the runner does between two tests of the layer.
        self.layer.testTearDown()
        self.layer.testSetUp()
        status, headers, _ = call(self.layer, "/")
        self.assertEqual((status, headers["X-Left"]), (404, None))
        self.assertEqual(call(self.layer, "/route")[0], 404)
        self.assertEqual(call(self.layer, "/handled")[0], 404)
        self.assertEqual(http_content.routes, [])
        self.assertIsNone(http_content.handler)

    def test_attributes_as_in_pytest_localserver(self):
        http_content = self.layer["http_content"]
        http_content.code, http_content.content, http_content.headers = 418, b"teapot", {"X-Tea": "green"}
        status, headers, body = call(self.layer, "/")
        self.assertEqual((status, body, headers["X-Tea"]), (418, b"teapot", "green"))
        self.assertEqual((headers["Content-Length"], headers["Transfer-Encoding"]), ("6", None))

    def test_attributes_no_answer_could_have_are_refused_when_set(self):
        # They were taken, and each request then got a 500, the test a
        # TypeError or AttributeError from the server thread.
        http_content = self.layer["http_content"]
        for name, value, message in (
            ("code", "200", "code='200': an HTTP status is a whole number from 100 to 999: write 200."),
            ("content", {"id": 1}, "content: a body or chunk is bytes or str, not {'id': 1}."),
            ("headers", [("X-Tea", "green"), "X-Cup: 1"], "'X-Cup: 1' is none."),
            ("headers", "X-Tea: green", "headers='X-Tea: green': give a mapping of names to values"),
            ("handler", "teapot", "handler='teapot': a function of the recorded request that returns a"
             " content.Response, or None for the default answer"),
            ("chunked", "no", "chunked='no': True or False"),
        ):
            with self.subTest(name=name):
                with self.assertRaises(ConfigurationError) as caught:
                    setattr(http_content, name, value)
                self.assertIn(message, str(caught.exception))
        status, _, body = call(self.layer, "/")
        self.assertEqual((status, body), (404, b""))  # the defaults stay
        http_content.headers = [("X-Tea", "green")]  # pairs, as respond() takes them
        self.assertEqual(call(self.layer, "/")[1]["X-Tea"], "green")

    def test_headers_attribute_as_pairs_as_in_pytest_localserver(self):
        # pytest-localserver's headers take (name, value) pairs too, repeats
        # included; here the server raised AttributeError: 'list' object has
        # no attribute 'items', at the first request.
        http_content = self.layer["http_content"]
        http_content.code, http_content.content = 200, "cookies"
        http_content.headers = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
        status, headers, body = call(self.layer, "/")
        self.assertEqual((status, body, headers.get_all("Set-Cookie")), (200, b"cookies", ["a=1", "b=2"]))

    def test_the_default_404_has_a_length_not_chunks(self):
        status, headers, body = call(self.layer, "/anything")
        self.assertEqual((status, headers["Content-Length"], headers["Transfer-Encoding"], body),
                         (404, "0", None, b""))

    def test_chunked_default(self):
        self.layer["http_content"].serve_content("in two chunks", chunked=True)
        status, headers, body = call(self.layer, "/")
        self.assertEqual((headers["Transfer-Encoding"], body), ("chunked", b"in two chunks"))

    def test_head_gets_no_body(self):
        self.layer["http_content"].serve_content("body")
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("HEAD", "/")
        response = connection.getresponse()
        self.assertEqual((response.getheader("Content-Length"), response.read()), ("4", b""))


class WritesTests(unittest.TestCase):
    """A response's head goes out with its body, in one write, unless the
    body is large or comes in chunks."""

    layer = CONTENT

    def writes_of(self, method, path):
        """The writes the server made to answer one request, and what arrived."""
        with mock.patch.object(socketserver._SocketWriter, "write", autospec=True,
                               side_effect=socketserver._SocketWriter.write) as write:
            connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
            self.addCleanup(connection.close)
            connection.request(method, path)
            response = connection.getresponse()
            answer = (response.status, response.getheader("Content-Length"), response.read())
        return write.call_count, answer

    def test_a_small_answer_is_one_write(self):
        route = self.layer["http_content"].route
        route("/small").respond("hello")
        route("/empty").respond(status=204)
        route("/cut").respond("0123456789", truncate=4)
        route("/limit").respond(b"y" * 64 * 1024)
        self.assertEqual(self.writes_of("GET", "/small"), (1, (200, "5", b"hello")))
        self.assertEqual(self.writes_of("GET", "/limit"), (1, (200, "65536", b"y" * 64 * 1024)))
        self.assertEqual(self.writes_of("HEAD", "/small"), (1, (200, "5", b"")))
        self.assertEqual(self.writes_of("GET", "/empty"), (1, (204, None, b"")))
        with self.assertRaises(http.client.IncompleteRead) as cut:
            self.writes_of("GET", "/cut")
        self.assertEqual(cut.exception.partial, b"0123")

    def test_large_and_chunked_answers_are_written_apart(self):
        route = self.layer["http_content"].route
        large = b"x" * (64 * 1024 + 1)
        route("/large").respond(large)
        route("/chunked").respond("abcd", chunked=True)
        self.assertEqual(self.writes_of("GET", "/large"), (2, (200, str(len(large)), large)))
        self.assertEqual(self.writes_of("GET", "/chunked"), (4, (200, None, b"abcd")))


class RouteTests(unittest.TestCase):
    layer = CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_exact_path_and_method(self):
        self.http_content.route("/orders", "POST").respond("created", status=201)
        self.assertEqual(call(self.layer, "/orders", data=b"{}")[:3:2], (201, b"created"))
        self.assertEqual(call(self.layer, "/orders")[0], 404)  # GET does not match
        self.assertEqual(call(self.layer, "/orders/1", data=b"{}")[0], 404)

    def test_url_for_a_path_of_text_is_a_url_every_client_sends(self):
        # Routes match decoded paths (route("/café")); url_for of the same
        # path gave "http://.../café", which urllib and http.client refuse
        # to send (UnicodeEncodeError), as no URL holds "é" or a space.
        self.http_content.route("/café/a b", query={"q": "thé", "x": "1%"}).respond("found")
        url = self.http_content.url_for("/café/a b?q=thé&x=1%25")
        with urllib.request.urlopen(url, timeout=5) as response:
            self.assertEqual(response.read(), b"found")
        self.assertEqual(self.layer["http_requests"][0].target, "/caf%C3%A9/a%20b?q=th%C3%A9&x=1%25")
        # What is a URL already stays as it is: escapes, "//", the query's "&" and "=".
        self.assertEqual(self.http_content.url_for("//caf%C3%A9?a=1&b=%2F"),
                         self.layer["http_url"] + "/caf%C3%A9?a=1&b=%2F")

    def test_a_method_route_refuses_every_other_method(self):
        self.http_content.route("/orders", "post").respond("created", status=201)
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            with self.subTest(method=method):
                self.assertEqual(call(self.layer, "/orders", data=b"{}", method=method)[0], 404)
        self.assertEqual(call(self.layer, "/orders", data=b"{}", method="POST")[:3:2], (201, b"created"))

    def test_header_fields_to_match_are_text(self):
        http_content = content.HTTPContent()
        for headers, example in (({"X-Count": 1}, "{'X-Count': '1'}"),
                                 ("X: y", "{'Authorization': 'Bearer sk_test'}"),
                                 ({"A": None}, "{'Authorization': 'Bearer sk_test'}")):
            with self.subTest(headers=headers), self.assertRaises(ConfigurationError) as caught:
                http_content.route("/x", headers=headers)
            self.assertIn("a route matches header fields by their text", str(caught.exception))
            self.assertIn(f"such as {example}.", str(caught.exception))
        self.assertEqual(http_content.expect("/x", headers={"A": "b"}).headers, {"A": "b"})
        self.assertEqual(http_content.route("/x", headers=[("A", "b")]).headers, {"A": "b"})  # pairs, as before
        self.assertEqual(http_content.route("/x", headers=()).headers, {})

    def test_a_path_no_request_can_have_is_refused(self):
        # Accepted before, and never matched: a request's path starts with
        # "/", and its query is matched apart.
        http_content = content.HTTPContent()
        for declare, message in [
            (lambda: http_content.route("feed"),
             "route('feed'): a request's path starts with \"/\", so this one would never match;"
             " write route('/feed')."),
            (lambda: http_content.expect("orders/1", "POST"),
             "expect('orders/1'): a request's path starts with \"/\", so this one would never match;"
             " write expect('/orders/1')."),
            (lambda: http_content.route("https://api.example/feed"),
             "route('https://api.example/feed'): a request's path starts with \"/\", so this one would never"
             ' match; give the path alone, such as route("/feed").'),
            (lambda: http_content.route("/search?q=tea&page=1"),
             "route('/search?q=tea&page=1'): a path is matched without its query, so this one would never"
             " match; write route('/search', query={'q': 'tea', 'page': '1'}). A question mark that is part"
             " of the path is sent encoded: write it %3F."),
            (lambda: http_content.route("/search?q=caf%C3%A9+latte&tag=a&tag=b&empty="),  # decoded, as matched
             "route('/search?q=caf%C3%A9+latte&tag=a&tag=b&empty='): a path is matched without its query, so"
             " this one would never match; write route('/search', query={'q': 'café latte', 'tag': ['a', 'b'],"
             " 'empty': ''}). A question mark that is part of the path is sent encoded: write it %3F."),
            (lambda: http_content.route("feed?x=1"),  # one fix for both
             "route('feed?x=1'): a request's path starts with \"/\", so this one would never match;"
             " write route('/feed', query={'x': '1'})."),
            (lambda: http_content.route("/a?"),
             "route('/a?'): a path is matched without its query, so this one would never match;"
             " write route('/a'). A question mark that is part of the path is sent encoded: write it %3F."),
            (lambda: http_content.route(b"/feed"),  # type: ignore[arg-type]
             "route(b'/feed'): a path is a str or a compiled regular expression."),
        ]:
            with self.subTest(message=message), self.assertRaises(ConfigurationError) as caught:
                declare()
            self.assertEqual(str(caught.exception), message)

    def test_a_pattern_of_bytes_is_refused_when_declared(self):
        # Taken, it made every request a 500: the server's TypeError
        # ("cannot use a bytes pattern on a string-like object").
        for declare, where in ((lambda: self.http_content.route(re.compile(rb"/feeds/\d+")), "route"),
                               (lambda: self.http_content.websocket(re.compile(rb"/feeds/\d+")), "websocket")):
            with self.assertRaises(ConfigurationError) as caught:
                declare()
            self.assertIn(f"{where}(re.compile(b'/feeds/\\\\d+')): paths are text: compile a str pattern,"
                          " such as re.compile(r'/orders/\\d+').", str(caught.exception))
        self.assertEqual(call(self.layer, "/feeds/1")[0], 404)

    def test_a_path_with_an_encoded_question_mark_or_asterisk_form(self):
        self.http_content.route("/what%3F").respond("a question")
        self.http_content.route("*", "OPTIONS").respond("the server")  # OPTIONS * asks about the server
        self.assertEqual(call(self.layer, "/what%3F")[2], b"a question")
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("OPTIONS", "*")
        self.assertEqual(connection.getresponse().read(), b"the server")

    def test_a_route_with_no_answer_programmed_answers_200_and_no_body(self):
        self.http_content.route("/ping")
        status, headers, body = call(self.layer, "/ping")
        self.assertEqual((status, headers["Content-Length"], body), (200, "0", b""))

    def test_json_answers_keep_their_headers_and_are_200_by_default(self):
        self.http_content.route("/a").respond_json({"a": 1}, headers={"X-Id": "7"})
        self.http_content.route("/b").respond_sequence(Response.json([1, 2]))
        status, headers, body = call(self.layer, "/a")
        self.assertEqual((status, headers["Content-Type"], headers["X-Id"], json.loads(body)),
                         (200, "application/json", "7", {"a": 1}))
        status, headers, body = call(self.layer, "/b")
        self.assertEqual((status, headers["Content-Type"], json.loads(body)), (200, "application/json", [1, 2]))

    def test_a_response_cannot_be_changed_once_made(self):
        # A Response kept in a module and answered by several tests stays the same.
        answer = Response(200, "ok")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            answer.status = 500

    def test_a_negative_delay_is_refused_when_the_answer_is_made(self):
        for delay in (-1, -0.5, float("nan")):
            with self.subTest(delay=delay), self.assertRaises(ConfigurationError) as caught:
                self.http_content.route("/late").respond("late", delay=delay)
            self.assertIn(f"delay={delay!r}: a response waits a number of seconds, 0 or more", str(caught.exception))
        self.assertEqual(Response(200, "now", delay=0).delay, 0)

    def test_json_that_no_parser_takes_is_refused(self):
        # {"p": inf} went out as {"p": Infinity}; an object failed with a bare TypeError.
        for data, reason in [({"p": float("inf")}, "Out of range float values are not JSON compliant"),
                             ([float("nan")], "Out of range float values are not JSON compliant"),
                             (object(), "is not JSON serializable")]:
            with self.subTest(data=data), self.assertRaises(ConfigurationError) as caught:
                self.http_content.route("/a").respond_json(data)
            self.assertTrue(str(caught.exception).startswith(f"data={data!r} is no JSON value ("), caught.exception)
            self.assertIn(reason, str(caught.exception))

    def test_a_delay_no_clock_reaches_is_refused(self):
        # inf raised OverflowError inside the server; "2" a bare TypeError.
        for delay, hint in [
            (float("inf"), "infinity never comes: for a very long wait give a large number, such as 3600"
                           " (the end of the test cuts it short)."),
            ("2", "write the number 2.0, not the text '2'."),
            (None, "leave delay out to answer at once."),
        ]:
            with self.subTest(delay=delay), self.assertRaises(ConfigurationError) as caught:
                self.http_content.route("/late").respond("late", delay=delay)
            self.assertEqual(str(caught.exception), f"delay={delay!r}: a response waits a number of seconds,"
                                                    f" 0 or more, before it is sent; {hint}")

    def test_the_requests_of_the_test_in_order(self):
        self.http_content.route("/a").respond("a")
        call(self.layer, "/a?x=1")
        call(self.layer, "/b", data=b"body")
        self.assertEqual([request.summary() for request in self.http_content.requests],
                         ["GET /a?x=1", "POST /b (4 bytes)"])

    def test_regular_expression_path(self):
        self.http_content.route(re.compile(r"/orders/\d+")).respond("an order")
        self.assertEqual(call(self.layer, "/orders/42")[2], b"an order")
        self.assertEqual(call(self.layer, "/orders/abc")[0], 404)

    def test_query_and_headers(self):
        self.http_content.route("/search", query={"q": "tea"}, headers={"Accept": "application/json"}) \
            .respond_json({"results": ["green", "black"]})
        status, headers, body = call(self.layer, "/search?q=tea&page=1", headers={"Accept": "application/json"})
        self.assertEqual((status, headers["Content-Type"], json.loads(body)),
                         (200, "application/json", {"results": ["green", "black"]}))
        self.assertEqual(call(self.layer, "/search?q=coffee", headers={"Accept": "application/json"})[0], 404)
        self.assertEqual(call(self.layer, "/search?q=tea")[0], 404)

    def test_first_declared_route_wins(self):
        self.http_content.route(re.compile("/.*")).respond("catch-all")
        self.http_content.route("/specific").respond("specific")
        self.assertEqual(call(self.layer, "/specific")[2], b"catch-all")

    def test_sequence_then_the_last_answer_repeats(self):
        self.http_content.route("/flaky").respond_sequence(Response(503, "busy"), Response(200, "ok"))
        self.assertEqual([call(self.layer, "/flaky")[:3:2] for _ in range(3)],
                         [(503, b"busy"), (200, b"ok"), (200, b"ok")])

    def test_answer_function(self):
        self.http_content.route("/echo").respond_with(
            lambda request: Response(200, request.body.upper(), [("X-Method", request.method)])
        )
        status, headers, body = call(self.layer, "/echo", data=b"shout")
        self.assertEqual((body, headers["X-Method"]), (b"SHOUT", "POST"))

    def test_answers_that_are_no_response_are_refused_when_declared(self):
        # respond_sequence("ok") and respond_with("ok") were taken, and each
        # request then got a 500 and the test a TypeError from the server.
        route = self.http_content.route("/answer").respond("first")
        for call_, message in (
            (lambda: route.respond_sequence("ok"), "respond_sequence(): 'ok' is no answer; an answer is a"
             " content.Response, such as Response(200, 'ok'), or a function of the request returning one"),
            (lambda: route.respond_sequence(Response(503), {"status": 200}), "{'status': 200} is no answer"),
            (lambda: route.respond_with("ok"), "respond_with('ok'): give a function of the request"),
            (lambda: route.respond_with(Response(200, "ok")), "for a fixed answer, write respond_sequence(Response"),
        ):
            with self.assertRaises(ConfigurationError) as caught:
                call_()
            self.assertIn(message, str(caught.exception))
        self.assertEqual(call(self.layer, "/answer")[2], b"first")  # the answer before stays

    def test_handler_for_anything_else(self):
        self.http_content.route("/known").respond("known")
        self.http_content.handler = lambda request: Response(200, f"handled {request.path}") \
            if request.path.startswith("/dyn") else None
        self.assertEqual(call(self.layer, "/known")[2], b"known")
        self.assertEqual(call(self.layer, "/dynamic")[2], b"handled /dynamic")
        self.assertEqual(call(self.layer, "/other")[0], 404)

    def test_any_method(self):
        self.http_content.route("/dav", "PROPFIND").respond("props", status=207)
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("PROPFIND", "/dav")
        response = connection.getresponse()
        self.assertEqual((response.status, response.read()), (207, b"props"))

    def test_a_method_no_request_has_is_refused_when_declared(self):
        # route("/x", ["GET", "POST"]) and route("/x", 405) raised an
        # AttributeError ('list' object has no attribute 'upper');
        # route("/x", "GET /x") was taken, and matched no request.
        for method, message in (
            (["GET", "POST"], "method=['GET', 'POST']: a route matches one method, such as 'POST', or any"
             " without method=; declare a route for each method"),
            (405, "method=405: a route matches one method"),
            ("GET /orders", "method='GET /orders': a method is one word"),
        ):
            with self.subTest(method=method):
                with self.assertRaises(ConfigurationError) as caught:
                    self.http_content.expect("/orders", method)  # type: ignore[arg-type]
                self.assertIn(message, str(caught.exception))
        self.assertEqual(self.http_content.expectations, [])
        self.http_content.route("/orders", "post").respond("created", status=201)  # any letter case, as before
        self.assertEqual(call(self.layer, "/orders", data=b"{}")[:3:2], (201, b"created"))

    def test_unknown_options_are_refused_naming_the_ones_to_write(self):
        # A TypeError named Route.__init__() or Response.__init__(), which
        # the test never called, and not what to write instead.
        self.http_content.route("/charges", "POST").hold()
        for call_, message in (
            (lambda: self.http_content.route("/charges", body="x"),
             "route() takes no body=: to match the body, write data= (the exact bytes or text), json=,"
             " json_subset=, form= or match="),
            (lambda: self.http_content.expect("/charges", params={"q": "1"}),
             "expect() takes no params=: write query="),
            (lambda: self.http_content.route("/charges", times=2), "route() takes no times=: an expected"
             " request is declared with expect(path, times=...)"),
            (lambda: self.http_content.route("/x").respond(json={"id": 1}), "respond() takes no json=: write"
             " respond_json(data)"),
            (lambda: self.http_content.route("/x").respond("late", delays=2), "respond() takes no delays=;"
             " it takes body, status, headers, and chunked=, delay=, reset=, truncate="),
            (lambda: self.http_content.route("/x").respond(status_code=201), "respond() takes no status_code=:"
             " write status="),
        ):
            with self.assertRaises(ConfigurationError) as caught:
                call_()
            self.assertIn(message, str(caught.exception))
        replies: list[int] = []
        shop = threading.Thread(target=lambda: replies.append(call(self.layer, "/charges", data=b"{}")[0]))
        shop.start()
        with self.http_content.next_request() as charge:
            with self.assertRaises(ConfigurationError) as caught:
                charge.respond(json={"id": 1})
            self.assertIn("respond() takes no json=: write respond_json(data)", str(caught.exception))
            charge.respond("charged", status=201)
        shop.join(10)
        self.assertEqual(replies, [201])

    def test_switches_that_are_no_bool_are_refused(self):
        # Taken for their truth: reset="no" reset the connection, and
        # raw_path="false" compared paths as sent.
        for call_, message in (
            (lambda: self.http_content.route("/x").respond("a", reset="no"), "reset='no': True or False"),
            (lambda: self.http_content.route("/x").respond("a", chunked="false"), "chunked='false': True or False"),
            (lambda: self.http_content.route("/x", raw_path="false"), "raw_path='false': True or False"),
            (lambda: self.http_content.expect("/x", ordered="yes"), "ordered='yes': True or False"),
        ):
            with self.assertRaises(ConfigurationError) as caught:
                call_()
            self.assertIn(message, str(caught.exception))
        self.assertEqual(self.http_content.expectations, [])
        self.http_content.route("/switched").respond("a", reset=False, chunked=True)
        self.assertEqual(call(self.layer, "/switched")[2], b"a")

    def test_bad_settings(self):
        with self.assertRaises(ConfigurationError):
            self.http_content.route(42)
        with self.assertRaises(ConfigurationError):
            self.http_content.route("/x").respond_sequence()

    def test_sequence_of_bodies_is_refused_when_declared(self):
        # respond_sequence("busy", "ok") reads like respond("busy"), but takes
        # Response objects: refused at once, saying what to write, rather than
        # a server error at the first request about an "answer function".
        with self.assertRaises(ConfigurationError) as caught:
            self.http_content.route("/flaky").respond_sequence("busy", "ok")
        self.assertIn("'busy' is no answer; an answer is a content.Response", str(caught.exception))
        with self.assertRaises(ConfigurationError) as caught:
            self.http_content.route("/echo").respond_with(b"pong")
        self.assertIn("b'pong'", str(caught.exception))


class FaultTests(unittest.TestCase):
    layer = CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_delay_makes_client_time_out(self):
        self.http_content.route("/slow").respond("late", delay=30)
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            call(self.layer, "/slow", timeout=0.2)
        self.assertLess(time.monotonic() - started, 2)  # the client's timeout, not the delay
        self.assertEqual(call(self.layer, "/fast")[0], 404)  # others are still served

    def test_short_delay_then_answer(self):
        self.http_content.route("/slowish").respond("late", delay=0.1)
        started = time.monotonic()
        self.assertEqual(call(self.layer, "/slowish")[2], b"late")
        self.assertGreaterEqual(time.monotonic() - started, 0.1)

    def test_reset(self):
        self.http_content.route("/reset").respond(reset=True)
        with self.assertRaises(ConnectionResetError):
            call(self.layer, "/reset")
        self.assertEqual(call(self.layer, "/after")[0], 404)

    def test_truncated_body(self):
        self.http_content.route("/truncated").respond("0123456789", truncate=4)
        with self.assertRaises(http.client.IncompleteRead) as caught:
            call(self.layer, "/truncated")
        self.assertEqual(caught.exception.partial, b"0123")

    def test_truncated_chunked_body_is_cut_inside_its_chunk(self):
        self.http_content.route("/truncated").respond("0123456789", chunked=True, truncate=4)
        with raw_request_socket(self.layer) as sock:
            sock.sendall(b"GET /truncated HTTP/1.1\r\nHost: x\r\n\r\n")
            received = read_until_closed(sock)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(body, b"a\r\n0123")  # a chunk of the whole ten bytes, four of them sent
        with self.assertRaises(http.client.IncompleteRead):  # the chunk never ends
            call(self.layer, "/truncated")

    def test_chosen_status(self):
        self.http_content.route("/gateway").respond(status=504)
        self.assertEqual(call(self.layer, "/gateway")[0], 504)

    def test_teardown_is_not_held_up_by_a_delay(self):
        layer = content.Layer(name="delay_teardown")
        layer.setUp()
        self.addCleanup(layer.tearDown)  # if the test fails before its own
        layer.testSetUp()  # as the runner does: what the server raises before the stop fails the test
        layer["http_content"].route("/forever").respond(delay=60)
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        layer["http_requests"].wait_for(1)
        started = time.monotonic()
        layer.tearDown()
        self.assertLess(time.monotonic() - started, 0.5)


    def test_a_layer_on_top_with_a_server_of_its_own_does_not_hide_the_content_server(self):
        # plone.testing hands a base layer the resources of the same name
        # that a layer on top publishes: here the wsgi layer's httpd.
        service = content.Layer(name="service_under_an_app")
        app = wsgi.Layer(lambda environ, start_response: [], name="app_over_a_service", bases=(service,))
        service.setUp()
        self.addCleanup(service.tearDown)
        app.setUp()
        self.addCleanup(app.tearDown)
        self.assertIsNot(service["httpd"], service.own_server())
        service.testSetUp()
        service["http_content"].route("/forever").respond(delay=60)
        self.assertNotEqual(service["http_port"], service.own_server().server_port)  # shadowed too
        address = urllib.parse.urlsplit(service["http_content"].url)
        client = socket.create_connection((address.hostname, address.port), timeout=10)
        self.addCleanup(client.close)
        client.sendall(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        service.requests.wait_for(1)  # http_requests is shadowed too
        started = time.monotonic()
        service.check_after_test()  # ends the delay: its test is over
        self.assertLess(time.monotonic() - started, 0.5)  # not the quiet_timeout waited in vain
        answer = read_until_closed(client)  # the delayed answer is cut, at once
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        service.testTearDown()


class ExpectationTests(unittest.TestCase):
    layer = CONTENT

    def setUp(self):
        self.http_content = self.layer["http_content"]

    def test_met_expectation_answers_and_passes(self):
        self.http_content.expect("/charges", "POST", query={"amount": "100"}).respond_json({"id": 1}, 201)
        self.assertEqual(call(self.layer, "/charges?amount=100", data=b"{}")[0], 201)
        self.http_content.check()

    def test_a_doubled_slash_is_pointed_out(self):
        self.http_content.expect("/orders")
        with self.assertRaises(urllib.error.HTTPError):  # 404, the default answer
            urllib.request.urlopen(self.layer["http_url"] + "/orders", timeout=5)
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        self.assertIn("path is //orders, not /orders (a doubled slash: the layer's http_url ends in /)",
                      str(caught.exception))
        self.http_content.reset()  # this test checked on purpose

    def test_unmet_expectation_shows_the_closest_requests(self):
        self.http_content.expect("/charges", "POST", query={"amount": "100"})
        call(self.layer, "/charges?amount=99", data=b"{}")
        call(self.layer, "/refunds", data=b"{}")
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        message = str(caught.exception)
        self.assertIn("expected POST /charges with query amount=100 once, it was requested 0 time(s)", message)
        self.assertIn("Closest requests that arrived:\n    POST /charges?amount=99 (2 bytes): "
                      "query amount is ['99'], not ['100']", message)
        self.assertIn("unexpected request: POST /refunds (2 bytes)", message)
        self.http_content.reset()  # this test checked on purpose

    def test_too_many_requests(self):
        self.http_content.expect("/once")
        call(self.layer, "/once")
        call(self.layer, "/once")
        with self.assertRaisesRegex(ExpectationError, "expected any method /once once, it was requested 2 time"):
            self.http_content.check()
        self.http_content.reset()

    def test_at_least(self):
        self.http_content.expect("/poll", at_least=2).respond("not yet")
        call(self.layer, "/poll")
        with self.assertRaisesRegex(ExpectationError, "at least 2 time"):
            self.http_content.check()
        call(self.layer, "/poll")
        call(self.layer, "/poll")
        self.http_content.check()

    def test_an_expectation_met_at_least_n_times_stops_reporting_missing(self):
        self.http_content.expect("/poll", at_least=2)
        call(self.layer, "/poll")
        self.assertEqual(len(self.http_content.problems()), 1)
        call(self.layer, "/poll")
        self.assertEqual(self.http_content.problems(), [])

    def test_an_expectation_of_many_requests_is_met_by_exactly_that_many(self):
        self.http_content.expect("/page", times=300).respond("page")
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for _ in range(300):
            connection.request("GET", "/page")
            self.assertEqual(connection.getresponse().read(), b"page")
        self.assertEqual(self.http_content.problems(), [])

    def test_each_request_goes_to_the_first_matching_expectation_still_wanting_one(self):
        self.http_content.expect("/x").respond("any")
        self.http_content.expect("/x", "GET").respond("get")
        answers = [call(self.layer, "/x", method=method)[2] for method in ("GET", "GET", "POST", "GET")]
        # Once both are met, an extra request goes to the last that matches it.
        self.assertEqual(answers, [b"any", b"get", b"any", b"get"])
        self.assertEqual(self.http_content.problems(), [
            "expected any method /x once, it was requested 2 time(s).\n"
            "  The requests it counted:\n    GET /x\n    POST /x",
            "expected GET /x once, it was requested 2 time(s).\n"
            "  The requests it counted:\n    GET /x\n    GET /x",
        ])
        self.http_content.reset()

    def test_a_request_goes_to_an_unmet_expectation_before_a_met_at_least_one(self):
        # An at_least expectation always wants more: declared first, it took
        # every request it matched, the final one too, which got its answer
        # ("pending") and left the second expectation unmet, the test failed.
        self.http_content.expect("/status", at_least=1).respond_json({"state": "pending"})
        self.http_content.expect("/status", query={"final": "1"}).respond_json({"state": "done"})
        answers = [requests.get(self.http_content.url_for(path), timeout=10).json()["state"]
                   for path in ("/status", "/status", "/status?final=1")]
        self.assertEqual(answers, ["pending", "pending", "done"])
        self.assertEqual(self.http_content.problems(), [])

    def test_ordered_expectations_met_in_order_pass(self):
        self.http_content.expect("/login", ordered=True, at_least=1)
        self.http_content.expect("/token", ordered=True)
        self.http_content.expect("/data", ordered=True)
        self.http_content.expect("/health")  # not ordered: any time
        for path in ("/health", "/login", "/login", "/token", "/data"):
            call(self.layer, path)
        self.http_content.check()

    def test_an_ordered_expectation_of_no_requests_does_not_hold_up_later_ones(self):
        self.http_content.expect("/legacy", times=0, ordered=True)
        self.http_content.expect("/data", ordered=True)
        call(self.layer, "/data")
        self.http_content.check()

    def test_order(self):
        self.http_content.expect("/login", ordered=True)
        self.http_content.expect("/data", ordered=True)
        call(self.layer, "/data")
        call(self.layer, "/login")
        with self.assertRaisesRegex(ExpectationError, "out of order: GET /data arrived before any method /login"):
            self.http_content.check()
        self.http_content.reset()

    def test_an_expectation_with_headers_is_described_with_them(self):
        self.http_content.expect("/search", headers={"Accept": "application/json"})
        call(self.layer, "/search", headers={"Accept": "text/html"})
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        self.assertIn("expected any method /search with headers Accept: application/json once,"
                      " it was requested 0 time(s).\n  Closest requests that arrived:\n"
                      "    GET /search: header Accept is 'text/html', not 'application/json'", str(caught.exception))
        self.http_content.reset()

    def test_a_missing_header_and_one_sent_as_utf8_are_said_so(self):
        # The report said "header Authorization is None", and showed a value
        # httpx sent as UTF-8 as 'ZoÃ«' beside 'Zoë', with no word why.
        self.http_content.expect("/me", headers={"Authorization": "Bearer sk", "X-Name": "Zoë"})
        httpx.get(self.http_content.url_for("/me"), headers={"X-Name": "Zoë".encode()}, timeout=10)
        with self.assertRaises(ExpectationError) as caught:
            self.http_content.check()
        self.assertIn("    GET /me: header Authorization is missing, not 'Bearer sk'; header X-Name is 'ZoÃ«', not"
                      " 'Zoë' (sent as UTF-8; header values are read as ISO-8859-1)",
                      str(caught.exception))
        self.http_content.reset()

    def test_an_expectation_met_too_often_shows_the_requests_it_counted(self):
        self.http_content.expect("/charges", "POST").respond("charged")
        for path, method in (("/health", "GET"), ("/charges", "POST"), ("/charges", "POST"), ("/status", "GET")):
            call(self.layer, path, method=method)
        problems = self.http_content.problems()
        self.assertEqual(problems[0], "expected POST /charges once, it was requested 2 time(s).\n"
                                      "  The requests it counted:\n    POST /charges\n    POST /charges")
        self.http_content.reset()

    def test_how_often_an_expectation_wanted_its_requests(self):
        self.http_content.expect("/never", times=0)
        self.http_content.expect("/twice", times=2)
        call(self.layer, "/never")
        call(self.layer, "/twice")
        self.assertEqual([problem.split(".\n")[0] for problem in self.http_content.problems()], [
            "expected any method /never 0 times, it was requested 1 time(s)",
            "expected any method /twice 2 times, it was requested 1 time(s)",
        ])
        self.http_content.reset()

    def test_an_unmet_expectation_says_when_no_requests_arrived_at_all(self):
        self.http_content.expect("/never")
        self.assertEqual(self.http_content.problems(),
                         ["expected any method /never once, it was requested 0 time(s); no requests arrived at all"])
        self.http_content.reset()

    def test_an_unmet_expectation_whose_requests_met_an_earlier_one(self):
        self.http_content.expect("/x")
        self.http_content.expect("/x")
        call(self.layer, "/x")
        self.assertEqual(self.http_content.problems(), [
            "expected any method /x once, it was requested 0 time(s);"
            " the requests it matches came before it or met an earlier expectation",
        ])
        self.http_content.reset()

    def test_an_unmet_expectation_names_the_requests_it_matched_that_went_elsewhere(self):
        # With a request that differed, the report showed it alone as the
        # closest, as if no GET /x had arrived.
        self.http_content.expect("/x")
        self.http_content.expect("/x")
        call(self.layer, "/x")
        call(self.layer, "/y")
        self.assertEqual(self.http_content.problems()[0], (
            "expected any method /x once, it was requested 0 time(s).\n"
            "  Requests it matches that came before it or met an earlier expectation:\n"
            "    GET /x\n"
            "  Closest requests that arrived:\n"
            "    GET /y: path is /y, not /x"
        ))
        self.http_content.reset()

    def test_the_three_closest_requests_are_shown_fewest_differences_first(self):
        self.http_content.expect("/charges", "POST", query={"amount": "100"})
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for method, target in (("GET", "/other"), ("POST", "/charges?amount=1"),
                               ("GET", "/charges?amount=100"), ("POST", "/refunds?amount=100")):
            connection.request(method, target)
            connection.getresponse().read()
        [problem, *unexpected] = self.http_content.problems()
        self.assertEqual(problem, "expected POST /charges with query amount=100 once, it was requested 0 time(s).\n"
                                  "  Closest requests that arrived:\n"
                                  "    POST /charges?amount=1: query amount is ['1'], not ['100']\n"
                                  "    GET /charges?amount=100: method is GET, not POST\n"
                                  "    POST /refunds?amount=100: path is /refunds, not /charges")
        self.assertEqual(len(unexpected), 4)
        self.http_content.reset()

    def test_requests_a_route_answers_are_not_unexpected(self):
        self.http_content.expect("/main")
        self.http_content.route("/static.css").respond("css")
        call(self.layer, "/static.css")
        call(self.layer, "/main")
        self.http_content.check()


class SwitchedOffServerErrorsTests(unittest.TestCase):

    def test_expectations_are_checked_even_without_server_error_reports(self):
        layer = content.Layer(name="no_error_reports", report_server_errors=False)
        layer.setUp()
        self.addCleanup(layer.tearDown)
        class Inner(unittest.TestCase):
            def test_it(inner):
                layer.testSetUp()
                layer["http_content"].expect("/never-called")
                layer.testTearDown()

        result = unittest.TestResult()
        Inner("test_it").run(result)
        outcome = [text for _, text in result.failures]
        self.assertEqual(len(outcome), 1, result.errors)
        self.assertIn("expected any method /never-called once", outcome[0])


class UnderZopeTestrunnerTests(unittest.TestCase):

    def test_failed_expectation_fails_its_test_and_the_run_goes_on(self):
        completed = run_testrunner("expectations", "-vv")
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 1, output)
        self.assertIn("Ran 3 tests with 1 failures, 0 errors", output)
        self.assertIn("Failure in test test_1_expected_charge_never_made", output)
        self.assertIn("ExpectationError: <serverlayer.content.Layer expectations_pkg.sample_expectations.PAYMENTS>:"
                      " The requests of this test did not meet its expectations:", output)
        self.assertIn("POST /charges?amount=99 (2 bytes): query amount is ['99'], not ['100']", output)
        self.assertEqual(output.count("Failure in test"), 1)
        self.assertEqual(completed.stderr, "")

    def test_a_server_error_does_not_hide_the_unmet_expectations(self):
        # The server error (a match= function raising) was raised alone:
        # the unmet expectation and its line saying what the function
        # raised, which the docs promise, were never shown.
        completed = run_testrunner("raising_match")
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 1, output)
        self.assertIn("Ran 1 tests with 1 failures, 0 errors", output)
        self.assertRegex(output, r"ServerSideError: <serverlayer\.content\.Layer raising_match_pkg\."
                                 r"sample_raising_match\.ORDERS>: the server at 127\.0\.0\.1:\d+ raised an exception")
        self.assertIn("\n\nAnd <serverlayer.content.Layer raising_match_pkg.sample_raising_match.ORDERS>:"
                      " The requests of this test did not meet its expectations:\n"
                      "- expected POST /orders accepted by order_seven once, it was requested 0 time(s).", output)
        self.assertIn("    POST /orders (4 bytes): order_seven(request) raised JSONDecodeError", output)

