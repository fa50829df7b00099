"""Step-by-step serving: ``route(...).hold()`` keeps requests waiting until
the test takes them with ``next_request()`` and answers; and every layer
as a context manager outside test layers."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import unittest

import httpx
import requests

from serverlayer import (
    ConfigurationError,
    ExpectationError,
    RequestTimeoutError,
    ServerSideError,
    content,
    wsgi,
)

HOLDING = content.Layer(name="HOLDING")


class Client(threading.Thread):
    """Sends one request in a thread of its own, as the application under test would."""

    def __init__(self, method, url, **kwargs):
        super().__init__(name=f"client {method} {url}")
        self.method, self.url, self.kwargs = method, url, kwargs
        self.response = None
        self.error = None

    def run(self):
        try:
            self.response = requests.request(self.method, self.url, timeout=30, **self.kwargs)
        except Exception as error:  # noqa: BLE001 -- the test looks at it
            self.error = error

    def answer(self, test):
        self.join(30)
        test.assertFalse(self.is_alive(), "the client still waits for its answer")
        test.assertIsNone(self.error)
        return self.response


def send(test, method, url, **kwargs):
    client = Client(method, url, **kwargs)
    client.start()
    test.addCleanup(client.join, 30)
    return client


class NextRequestTests(unittest.TestCase):
    layer = HOLDING

    def setUp(self):
        self.content = self.layer["http_content"]

    def test_the_client_waits_until_the_test_answers(self):
        self.content.route("/charges", "POST").hold()
        self.content.route("/health").respond("up")
        client = send(self, "POST", self.content.url_for("/charges"), json={"amount": 42})
        with self.content.next_request(timeout=10) as request:
            self.assertEqual((request.method, request.path), ("POST", "/charges"))
            self.assertEqual(request.json(), {"amount": 42})
            self.assertEqual(request.headers["Content-Type"], "application/json")
            # Meanwhile the client waits, and the server answers everybody else.
            self.assertEqual(requests.get(self.content.url_for("/health"), timeout=5).text, "up")
            self.assertTrue(client.is_alive())
            self.assertIsNone(client.response)
            request.respond_json({"id": "ch_1"}, status=201)
        response = client.answer(self)
        self.assertEqual((response.status_code, response.json()), (201, {"id": "ch_1"}))

    def test_a_request_that_arrives_before_the_test_asks_is_held_too(self):
        self.content.expect("/early").hold()
        client = send(self, "GET", self.content.url_for("/early"))
        self.layer["http_requests"].wait_for(1)
        with self.content.next_request() as request:
            self.assertEqual(request.path, "/early")
            request.respond("at last", headers={"X-Step": "1"})
        response = client.answer(self)
        self.assertEqual((response.text, response.headers["X-Step"]), ("at last", "1"))

    def test_held_requests_are_taken_oldest_first(self):
        self.content.route("/queue").hold()
        first = send(self, "GET", self.content.url_for("/queue?n=1"))
        self.layer["http_requests"].wait_for(1)
        second = send(self, "GET", self.content.url_for("/queue?n=2"))
        self.layer["http_requests"].wait_for(2)
        for expected in ("1", "2"):
            with self.content.next_request() as request:
                self.assertEqual(request.query_params, {"n": [expected]})
                request.respond(f"answer {expected}")
        self.assertEqual(first.answer(self).text, "answer 1")
        self.assertEqual(second.answer(self).text, "answer 2")

    def test_other_clients_and_a_fault_for_the_held_one(self):
        self.content.route("/slow").hold()
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=30)
        self.addCleanup(connection.close)
        connection.request("GET", "/slow")
        with self.content.next_request() as request:
            request.respond("partial answer", truncate=7)
        response = connection.getresponse()
        with self.assertRaises(http.client.IncompleteRead) as raised:
            response.read()
        self.assertEqual(raised.exception.partial, b"partial")

    def test_httpx_waits_as_well(self):
        self.content.route("/x").hold()
        results = []
        client = threading.Thread(target=lambda: results.append(httpx.get(self.content.url_for("/x"), timeout=30)))
        client.start()
        self.addCleanup(client.join, 30)
        with self.content.next_request() as request:
            request.respond("from httpx's point of view", status=202)
        client.join(30)
        self.assertEqual([(each.status_code, each.text) for each in results], [(202, "from httpx's point of view")])

    def test_no_held_request_within_the_timeout(self):
        self.content.route("/held").hold()
        self.assertEqual(requests.get(self.content.url_for("/other"), timeout=5).status_code, 404)
        started = time.monotonic()
        with self.assertRaises(RequestTimeoutError) as raised, self.content.next_request(timeout=0.2):
            self.fail("no request was held")
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        self.assertEqual(
            str(raised.exception),
            f"{self.layer!r}: No held request arrived within 0.2 s. The requests that did arrive: GET /other.",
        )

    def test_no_request_at_all_within_the_timeout(self):
        self.content.route("/held").hold()
        with self.assertRaises(RequestTimeoutError) as raised, self.content.next_request(timeout=0.05):
            pass
        self.assertIn("The requests that did arrive: none.", str(raised.exception))

    def test_a_timeout_that_is_no_number_of_seconds_is_refused(self):
        # NaN waited for ever (the test hung), infinity raised OverflowError,
        # "1" a TypeError from threading.
        self.content.route("/held").hold()
        for timeout, message in (
            (float("nan"), "timeout=nan: next_request() waits that many seconds for a held request"),
            (float("inf"), "timeout=inf: next_request() waits that many seconds for a held request, 0 or more;"
             " write timeout=None to wait until one comes."),
            ("1", "write the number 1.0, not the text '1'"),
            (-1, "timeout=-1: next_request() waits"),
        ):
            raised: list[BaseException] = []

            def take(timeout=timeout, raised=raised):
                try:
                    with self.content.next_request(timeout=timeout) as request:
                        request.respond("taken")
                except Exception as error:  # noqa: BLE001 -- the test looks at it
                    raised.append(error)

            waiting = threading.Thread(target=take)
            waiting.start()
            waiting.join(2)
            if waiting.is_alive():  # hung: a held request sets it free
                send(self, "GET", self.content.url_for("/held")).answer(self)
                waiting.join(10)
            with self.subTest(timeout=timeout):
                self.assertEqual(len(raised), 1, "next_request() did not raise")
                self.assertIsInstance(raised[0], ConfigurationError)
                self.assertIn(message, str(raised[0]))

    def test_next_request_without_a_holding_route(self):
        self.content.route("/charges").respond("ok")
        with self.assertRaises(ConfigurationError) as raised, self.content.next_request(timeout=0):
            pass
        self.assertIn("no route holds any", str(raised.exception))
        self.assertIn('http_content.route("/charges").hold()', str(raised.exception))

    def test_a_block_left_without_an_answer_answers_500(self):
        self.content.route("/forgotten").hold()
        client = send(self, "GET", self.content.url_for("/forgotten"))
        with self.assertRaises(ConfigurationError) as raised, self.content.next_request():
            pass
        self.assertIn("ended without answering GET /forgotten, so it got a 500", str(raised.exception))
        self.assertIn("request.respond(...)", str(raised.exception))
        response = client.answer(self)
        self.assertEqual(response.status_code, 500)
        self.assertEqual(response.text, "The test did not answer this held request.")

    def test_a_block_that_fails_answers_500_and_the_failure_stands(self):
        self.content.route("/failing").hold()
        client = send(self, "GET", self.content.url_for("/failing"))
        with self.assertRaises(ZeroDivisionError), self.content.next_request():
            1 / 0
        self.assertEqual(client.answer(self).status_code, 500)

    def test_one_answer_per_request(self):
        self.content.route("/once").hold()
        client = send(self, "GET", self.content.url_for("/once"))
        with self.content.next_request() as request:
            request.respond("first")
            with self.assertRaises(ConfigurationError) as raised:
                request.respond("second", status=404)
            self.assertEqual(
                str(raised.exception), "GET /once was answered already, with status 200; a request gets one answer."
            )
            with self.assertRaises(TypeError):
                request.respond_with_response("not a response")
        self.assertEqual(client.answer(self).text, "first")

    def test_a_json_answer_with_headers(self):
        self.content.route("/json").hold()
        client = send(self, "GET", self.content.url_for("/json"))
        with self.content.next_request() as request:
            request.respond_json({"ok": True}, status=202, headers={"X-Answered": "by the test"})
        response = client.answer(self)
        self.assertEqual((response.status_code, response.json()), (202, {"ok": True}))
        self.assertEqual(response.headers["X-Answered"], "by the test")
        self.assertEqual(response.headers["Content-Type"], "application/json")

    def test_a_json_answer_with_a_content_type_of_its_own_sends_that_one(self):
        self.content.route("/problem").hold()
        client = send(self, "GET", self.content.url_for("/problem"))
        with self.content.next_request() as request:
            request.respond_json({"title": "Bad"}, status=400, headers={"content-type": "application/problem+json"})
        response = client.answer(self)
        self.assertEqual((response.status_code, response.json()), (400, {"title": "Bad"}))
        self.assertEqual(response.headers["Content-Type"], "application/problem+json")  # one field, not two joined

    def test_a_1xx_status_is_refused_and_the_client_gets_the_final_answer(self):
        self.content.route("/interim").hold()
        client = send(self, "GET", self.content.url_for("/interim"))
        with self.content.next_request() as request:
            for answer in (lambda: request.respond(status=103), lambda: request.respond_json({}, status=100)):
                with self.subTest(), self.assertRaises(ConfigurationError) as caught:
                    answer()
                self.assertIn("a 1xx status is an interim response", str(caught.exception))
            request.respond("final", status=200)
        response = client.answer(self)
        self.assertEqual((response.status_code, response.text), (200, "final"))

    def test_a_json_answer_is_200_unless_said_otherwise(self):
        self.content.route("/plain-json").hold()
        client = send(self, "GET", self.content.url_for("/plain-json"))
        with self.content.next_request() as request:
            request.respond_json([1, 2])
        response = client.answer(self)
        self.assertEqual((response.status_code, response.json()), (200, [1, 2]))

    def test_a_held_request_reads_like_the_recorded_one(self):
        self.content.route("/same").hold()
        client = send(self, "PUT", self.content.url_for("/same?q=1"), data=b"payload")
        with self.content.next_request() as request:
            [recorded] = self.layer["http_requests"]
            self.assertIs(request.request, recorded)
            self.assertEqual((request.body, request.query), (b"payload", "q=1"))
            self.assertEqual(repr(request), "<held request PUT /same?q=1 (7 bytes)>")
            self.assertFalse(request.answered)
            request.respond_with_response(content.Response(204))
            self.assertTrue(request.answered)
        self.assertEqual(client.answer(self).status_code, 204)


class ContextManagerTests(unittest.TestCase):
    """``with content.Layer() as server:``, as pytest-httpserver's server is used."""

    def test_serves_inside_the_block_only(self):
        with content.Layer() as server:
            server["http_content"].route("/ping").respond("pong")
            self.assertEqual(requests.get(server["http_content"].url_for("/ping"), timeout=5).text, "pong")
            address = (server["http_host"], server["http_port"])
        self.assertNotIn("http_url", server)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5).close()

    def test_unmet_expectations_fail_at_the_end_of_the_block(self):
        server = content.Layer()
        with self.assertRaises(ExpectationError) as raised, server:
            server["http_content"].expect("/must", "POST")
        self.assertIn("expected POST /must once, it was requested 0 time(s)", str(raised.exception))
        self.assertNotIn("http_url", server)  # torn down all the same

    def test_a_failing_block_is_not_masked_and_still_stops_the_server(self):
        server = content.Layer()
        with self.assertRaises(KeyError), server:
            server["http_content"].expect("/must")  # unmet, but the block's own failure is what matters
            server["http_content"].route("/held").hold()
            client = send(self, "GET", server["http_content"].url_for("/held"))
            server["http_requests"].wait_for(1)
            raise KeyError("the block's own failure")
        self.assertNotIn("http_url", server)
        self.assertEqual(client.answer(self).status_code, 503)  # released, not cut off

    def test_a_request_held_and_never_taken_is_answered_and_reported(self):
        server = content.Layer()
        with self.assertRaises(ExpectationError) as raised, server:
            server["http_content"].route("/held").hold()
            client = send(self, "GET", server["http_content"].url_for("/held"))
            server["http_requests"].wait_for(1)
        self.assertIn("held, and never taken with next_request(): GET /held", str(raised.exception))
        response = client.answer(self)
        self.assertEqual(response.status_code, 503)
        self.assertEqual(response.text, "The test ended before it answered this held request.")

    def test_any_layer_and_its_server_errors(self):
        def broken(environ, start_response):
            raise RuntimeError("the application broke")

        server = wsgi.Layer(broken)
        with self.assertRaises(ServerSideError) as raised, server:
            self.assertEqual(requests.get(server["http_url"], timeout=5).status_code, 500)
        self.assertIn("the application broke", str(raised.exception))
        self.assertNotIn("http_url", server)


def run_as_the_runner_does(test, layer):
    """``layer.testSetUp``, ``test``, ``layer.testTearDown``; the layer finds
    the test it checks in this frame's ``test``, as in zope.testrunner's."""
    result = unittest.TestResult()
    layer.testSetUp()
    try:
        test.run(result)  # the layer's end-of-test check runs as the test's cleanup
    finally:
        layer.testTearDown()
    return result


class UnderTheTestRunnerTests(unittest.TestCase):
    """A held request the test never took fails it, and frees its thread."""

    def test_a_test_that_never_takes_its_held_request_fails(self):
        layer = content.Layer(name="NEVER_TAKEN")
        layer.setUp()
        self.addCleanup(layer.tearDown)

        class Inner(unittest.TestCase):
            def test_forgets(inner):
                layer["http_content"].route("/held").hold()
                inner.client = send(self, "GET", layer["http_content"].url_for("/held"))
                layer["http_requests"].wait_for(1)

        inner = Inner("test_forgets")
        result = run_as_the_runner_does(inner, layer)
        [(_, failure)] = result.failures
        self.assertIn("held, and never taken with next_request(): GET /held", failure)
        self.assertEqual(inner.client.answer(self).status_code, 503)
