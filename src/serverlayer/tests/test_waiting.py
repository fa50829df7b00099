"""Waiting for what a server does: the waiter wakes when it happens, not
when its timeout runs out (which would pass too, only late)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
import unittest
import urllib.request
from typing import Any
from unittest import mock

from serverlayer import custom
from serverlayer.arrivals import Arrivals
from serverlayer.errors import ResourceError, ServerSideError
from serverlayer.server import Activity

#: Longer than any wait below takes when the waiter is woken; a waiter that
#: is not woken returns only at its timeout.
TIMEOUT = 60.0


class ArrivalsWaitTests(unittest.TestCase):

    def test_wait_for_wakes_when_the_item_arrives(self):
        arrivals: Arrivals[str] = Arrivals()
        arrivals.append("unrelated")
        appender = threading.Thread(target=arrivals.append, args=("wanted",))
        self.addCleanup(appender.join, 10)

        def wanted(item: str) -> bool:
            # First asked while the waiter holds the lock: the appender can
            # append only once the waiter waits.
            if not appender.is_alive() and appender.ident is None:
                appender.start()
            return item == "wanted"

        started = time.monotonic()
        self.assertEqual(arrivals.wait_for(match=wanted, timeout=TIMEOUT), ["wanted"])
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)


class ActivityWaitTests(unittest.TestCase):

    def test_wait_quiet_wakes_when_the_last_request_finishes(self):
        activity = Activity()
        busy = threading.Event()

        def request() -> None:
            activity.start()
            busy.set()
            deadline = time.monotonic() + 10
            while not activity._waiting and time.monotonic() < deadline:  # until the test waits
                time.sleep(0.001)
            activity.finish()

        worker = threading.Thread(target=request)
        worker.start()
        self.addCleanup(worker.join, 10)
        self.assertTrue(busy.wait(10))
        started = time.monotonic()
        self.assertTrue(activity.wait_quiet(TIMEOUT))
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)

    def test_wait_quiet_waits_for_every_request(self):
        activity = Activity()
        activity.start()  # this thread's request, never finished
        self.assertFalse(activity.wait_quiet(0.01))
        activity.finish()
        self.assertTrue(activity.wait_quiet(0.01))

    def test_a_request_given_up_on_is_not_waited_for_again(self):
        activity = Activity()
        activity.start()  # this thread's request, left running
        self.assertFalse(activity.wait_quiet(0.01))
        self.assertIsNone(activity.left_running())  # a wait alone gives up on nothing: a mid-test check
        self.assertFalse(activity.wait_quiet(0.01))
        activity.give_up("tests.test_one")  # its test has ended
        self.assertEqual(activity.left_running(), "tests.test_one")
        activity.give_up("tests.test_two")  # the one that left it running stays named
        self.assertEqual(activity.left_running(), "tests.test_one")
        started = time.monotonic()
        self.assertTrue(activity.wait_quiet(TIMEOUT))  # at once
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)
        activity.finish()
        self.assertIsNone(activity.left_running())
        activity.start()  # the thread's next request is waited for
        self.assertFalse(activity.wait_quiet(0.01))
        activity.finish()


def stuck(started: threading.Event, release: threading.Event, message: str) -> tuple[type[Any], Any]:
    """A request handler and a WSGI application that say they started, wait
    for ``release``, then raise ``message``: a request left running."""

    class Stuck(custom.RequestHandler):
        def do_GET(self):
            started.set()
            release.wait(TIMEOUT)
            raise RuntimeError(message)

    def wsgi_app(environ, start_response):
        started.set()
        release.wait(TIMEOUT)
        raise RuntimeError(message)

    return Stuck, wsgi_app


class LeftRunningTests(unittest.TestCase):
    """A request that a test left running (a client that stopped reading, a
    handler waiting for ever) holds up its own test's end, not every later
    one's; what it raises later fails the test during which it comes, and
    says where it came from. On every HTTP layer, plain and behind TLS."""

    def layers(self, started: threading.Event, release: threading.Event) -> dict[str, Any]:
        from serverlayer import asgi, wsgi

        Stuck, wsgi_app = stuck(started, release, "raised after its test ended")

        async def asgi_app(scope, receive, send):
            if scope["type"] != "http":
                raise RuntimeError("no lifespan here")
            started.set()
            while not release.is_set():  # the loop's thread must not block
                await asyncio.sleep(0.001)
            raise RuntimeError("raised after its test ended")

        return {
            "custom": custom.Layer(Stuck, name="left_running_custom"),
            "custom, TLS": custom.Layer(Stuck, name="left_running_custom_tls", tls=True),
            "wsgi": wsgi.Layer(wsgi_app, name="left_running_wsgi"),
            "wsgi, TLS": wsgi.Layer(wsgi_app, name="left_running_wsgi_tls", tls=True),
            "asgi": asgi.Layer(asgi_app, name="left_running_asgi"),
            "asgi, TLS": asgi.Layer(asgi_app, name="left_running_asgi_tls", tls=True),
        }

    def run_left_running(self, release_between_tests: bool) -> None:
        started, release = threading.Event(), threading.Event()
        for kind, layer in self.layers(started, release).items():
            with self.subTest(kind):
                started.clear()
                release.clear()
                self.leave_running(layer, started, release, release_between_tests)

    def leave_running(
        self, layer: Any, started: threading.Event, release: threading.Event, release_between_tests: bool
    ) -> None:
        layer.quiet_timeout = 0.3
        layer.setUp()
        self.addCleanup(layer.tearDown)
        self.addCleanup(release.set)
        layer.testSetUp()  # the first test
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=TIMEOUT)
        self.addCleanup(client.close)
        if layer.tls:
            client = layer["ssl_context"].wrap_socket(client, server_hostname=layer["http_host"])
            self.addCleanup(client.close)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(started.wait(TIMEOUT))

        def end_of_test() -> float:
            # Under a test runner the check is the running test's cleanup:
            # here each of these tests ends within one test.
            started = time.monotonic()
            layer.check_after_test()
            layer.testTearDown()
            return time.monotonic() - started

        layer.check_server_errors()  # a check mid-test waits for it in vain ...
        self.assertGreaterEqual(end_of_test(), 0.3)  # ... and its own test's end waits for it still
        for _ in range(3):  # the next tests' ends do not
            layer.testSetUp()
            self.assertLess(end_of_test(), 0.25)
        if not release_between_tests:
            layer.testSetUp()
        release.set()  # it raises now
        deadline = time.monotonic() + TIMEOUT
        while not layer.server_errors._errors and time.monotonic() < deadline:
            time.sleep(0.001)
        if release_between_tests:
            layer.testSetUp()  # the next test begins after the error came
        with self.assertRaises(ServerSideError) as failed:
            layer.check_after_test()
        error = str(failed.exception)
        self.assertIn(f"raised by a request that an earlier test, {self.id()}, left running", error)
        self.assertIn("RuntimeError: raised after its test ended", error)
        self.assertIn("while handling requests during this test:", error)  # not "made by this test"
        layer.testTearDown()

    def test_later_tests_do_not_wait_for_it_and_its_error_says_where_it_came_from(self):
        self.run_left_running(release_between_tests=False)

    def test_an_error_that_comes_between_two_tests_fails_the_next(self):
        self.run_left_running(release_between_tests=True)

    def test_an_error_that_comes_after_the_last_test_fails_the_tear_down(self):
        started, release = threading.Event(), threading.Event()
        for kind, layer in self.layers(started, release).items():
            with self.subTest(kind):
                started.clear()
                release.clear()
                layer.quiet_timeout = 0.1
                layer.setUp()
                try:
                    layer.testSetUp()  # the layer's last test
                    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=TIMEOUT) as client:
                        wrapped = client
                        if layer.tls:
                            wrapped = layer["ssl_context"].wrap_socket(client, server_hostname=layer["http_host"])
                        wrapped.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                        self.assertTrue(started.wait(TIMEOUT))
                        layer.check_after_test()  # gives up on it
                        layer.testTearDown()
                        release.set()  # it raises now, with no test left to fail
                        deadline = time.monotonic() + TIMEOUT
                        while not layer.server_errors._errors and time.monotonic() < deadline:
                            time.sleep(0.001)
                        wrapped.close()
                finally:
                    release.set()
                    with self.assertRaises(ServerSideError) as failed:
                        layer.tearDown()
                error = str(failed.exception)
                self.assertIn("after the layer's last test ended", error)
                self.assertIn(f"raised by a request that an earlier test, {self.id()}, left running", error)
                self.assertIn("RuntimeError: raised after its test ended", error)
                self.assertNotIn("http_port", layer)  # torn down all the same
                with self.assertRaises(ResourceError) as gone:  # a test zope.pytestlayer runs next
                    layer["http_url"]
                self.assertIn("was torn down, so it has no 'http_url' resource any more. Its tearDown raised"
                              " the server error reported there", str(gone.exception))
                layer.tearDown()  # nothing more to say
                with self.subTest(kind, report_server_errors=False):
                    layer.report_server_errors = False
                    layer.server_errors.record("raised while nobody listens")
                    layer.setUp()
                    layer.server_errors.record("raised after the last test")
                    layer.tearDown()  # ignored, as the layer was told


class RaisedWhileStoppingTests(unittest.TestCase):
    """A request the layer's last test left running that raises while
    ``tearDown`` waits for it (within ``stop_timeout``) fails the tear-down,
    on every layer whose requests run on threads. Under pytest, whose plain
    test functions get their layer set up and torn down around each of
    them, that is every such test's end; the custom and content layers
    dropped the error (and the wsgi layer reported it)."""

    def layers(self, started: threading.Event, release: threading.Event) -> dict[str, Any]:
        from serverlayer import content, wsgi

        Stuck, wsgi_app = stuck(started, release, "raised while its server stopped")

        return {
            "custom": custom.Layer(Stuck, name="stopping_custom"),
            "custom, TLS": custom.Layer(Stuck, name="stopping_custom_tls", tls=True),
            "content": content.Layer(name="stopping_content"),
            "wsgi": wsgi.Layer(wsgi_app, name="stopping_wsgi"),
        }

    def test_an_error_raised_while_tear_down_waits_for_its_request_fails_the_tear_down(self):
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def stuck_answer(request):
            started.set()
            release.wait(TIMEOUT)
            raise RuntimeError("raised while its server stopped")

        for kind, layer in self.layers(started, release).items():
            with self.subTest(kind):
                started.clear()
                release.clear()
                layer.quiet_timeout = 0.1
                layer.setUp()
                server = layer["httpd"]
                request_stop = type(server).request_stop

                def stop_then_release(self: Any, request_stop: Any = request_stop, server: Any = server) -> None:
                    request_stop(self)
                    if self is server:
                        release.set()  # the request raises now, while tearDown waits for it

                # On the class: a test may not replace the server's own methods on it.
                stopping = mock.patch.object(type(server), "request_stop", stop_then_release)
                stopping.start()
                self.addCleanup(stopping.stop)
                try:
                    layer.testSetUp()  # the layer's last test
                    if kind == "content":
                        layer["http_content"].route("/").respond_with(stuck_answer)
                    with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=TIMEOUT) as client:
                        wrapped = client
                        if layer.tls:
                            wrapped = layer["ssl_context"].wrap_socket(client, server_hostname=layer["http_host"])
                        wrapped.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                        self.assertTrue(started.wait(TIMEOUT))
                        layer.check_after_test()  # gives up on it
                        layer.testTearDown()
                        with self.assertRaises(ServerSideError) as failed:
                            layer.tearDown()
                        wrapped.close()
                finally:
                    release.set()
                    layer.tearDown()  # nothing more to say, or what the set-up left
                error = str(failed.exception)
                self.assertIn("after the layer's last test ended", error)
                self.assertIn("RuntimeError: raised while its server stopped", error)

    def test_a_request_tear_down_left_behind_that_raises_later_prints_nothing(self):
        # Under pytest a plain function's layer is torn down after it and
        # set up again for the next: a request the first left running past
        # both timeouts raises during the second. The error fails the test
        # during which it comes (errors.rst); the wsgi layer printed it to
        # stderr instead (logging's last resort, its server's logger having
        # no handler left), and the test passed.
        started, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def stuck_answer(request):
            started.set()
            release.wait(TIMEOUT)
            raise RuntimeError("raised while its server stopped")

        for kind, layer in self.layers(started, release).items():
            with self.subTest(kind):
                started.clear()
                release.clear()
                layer.quiet_timeout = layer.stop_timeout = 0.05
                before = set(threading.enumerate())
                layer.setUp()
                self.addCleanup(layer.tearDown)
                layer.testSetUp()  # the first test
                if kind == "content":
                    layer["http_content"].route("/").respond_with(stuck_answer)
                with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=TIMEOUT) as client:
                    wrapped = client
                    if layer.tls:
                        wrapped = layer["ssl_context"].wrap_socket(client, server_hostname=layer["http_host"])
                    wrapped.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    self.assertTrue(started.wait(TIMEOUT))
                    layer.check_after_test()  # gives up on it
                    layer.testTearDown()
                    layer.tearDown()  # gives up on it too, its thread left behind
                    workers = set(threading.enumerate()) - before
                    self.assertTrue(workers)  # the request's
                    wrapped.close()
                layer.setUp()
                layer.testSetUp()  # the next test
                printed = io.StringIO()
                with contextlib.redirect_stderr(printed):
                    release.set()
                    for worker in workers:
                        worker.join(TIMEOUT)
                self.assertEqual(printed.getvalue(), "")
                self.assertEqual([worker for worker in workers if worker.is_alive()], [])
                with self.assertRaises(ServerSideError) as failed:
                    layer.check_after_test()
                layer.testTearDown()
                error = str(failed.exception)
                self.assertIn("raised by a request that an earlier test", error)
                self.assertIn("RuntimeError: raised while its server stopped", error)


class AsgiGiveUpTests(unittest.TestCase):
    """The end of a test hands its giving up to the event loop's thread."""

    def test_a_request_woken_before_the_give_up_runs_is_still_named_left_running(self):
        # The loop may already have the request's wake-up queued when the
        # test's end gives up on it: here, a callback that holds the loop
        # wakes the request, and the give-up is queued behind that wake-up.
        from serverlayer import asgi
        from serverlayer.tests.helpers import set_up_by_hand

        woken = asyncio.Event()
        started = threading.Event()

        async def app(scope, receive, send):
            if scope["type"] != "http":
                raise RuntimeError("no lifespan here")
            started.set()
            await woken.wait()
            raise RuntimeError("raised after its test ended")

        layer = set_up_by_hand(self, asgi.Layer(app, name="asgi_give_up_overtaken"))
        server = layer["httpd"]
        layer.testSetUp()
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=TIMEOUT) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(started.wait(TIMEOUT))
            holding, unhold = threading.Event(), threading.Event()

            def hold_the_loop() -> None:
                woken.set()  # the request's wake-up is queued now
                holding.set()
                unhold.wait(TIMEOUT)

            server.loop.call_soon_threadsafe(hold_the_loop)
            self.assertTrue(holding.wait(TIMEOUT))
            server.give_up(test=self.id())  # what the end of the test does
            layer.testTearDown()
            unhold.set()
            deadline = time.monotonic() + TIMEOUT
            while not layer.server_errors._errors and time.monotonic() < deadline:
                time.sleep(0.001)
        layer.testSetUp()  # the next test, during which the error came
        with self.assertRaises(ServerSideError) as failed:
            layer.check_after_test()
        layer.testTearDown()
        self.assertIn(f"raised by a request that an earlier test, {self.id()}, left running", str(failed.exception))


class AsgiWaitQuietTests(unittest.TestCase):
    """The asgi layer waits for its requests' tasks, which uvicorn keeps."""

    def setUp(self):
        from serverlayer import asgi
        from serverlayer.tests.helpers import set_up_by_hand

        gate = self.gate = asyncio.Event()

        async def app(scope, receive, send):
            if scope["type"] != "http":
                raise RuntimeError("no lifespan here")
            await gate.wait()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

        self.layer = set_up_by_hand(self, asgi.Layer(app, name="asgi_wait_quiet"))
        self.server = self.layer["httpd"]
        self.answers: list[bytes] = []

        def request() -> None:
            with urllib.request.urlopen(self.layer["http_url"], timeout=TIMEOUT) as response:
                self.answers.append(response.read())

        self.client = threading.Thread(target=request)
        self.client.start()
        self.addCleanup(self.client.join, TIMEOUT)
        self.addCleanup(self.open_gate)
        deadline = time.monotonic() + 10
        while not self.server.state.tasks and time.monotonic() < deadline:  # until the request runs
            time.sleep(0.001)
        self.assertTrue(self.server.state.tasks)

    def open_gate(self) -> None:
        self.server.loop.call_soon_threadsafe(self.gate.set)

    def test_wait_quiet_waits_while_a_request_runs(self):
        self.assertFalse(self.server.wait_quiet(0.05))
        self.open_gate()
        self.assertTrue(self.server.wait_quiet(TIMEOUT))
        self.client.join(TIMEOUT)
        self.assertEqual(self.answers, [b"ok"])

    def test_wait_quiet_wakes_when_the_last_request_ends(self):
        opener = threading.Timer(0.05, self.open_gate)  # once the test waits, most likely
        opener.start()
        self.addCleanup(opener.cancel)
        started = time.monotonic()
        self.assertTrue(self.server.wait_quiet(TIMEOUT))
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)
        self.assertFalse(self.server.state.tasks)


class IdleWaitTests(unittest.TestCase):
    """A handler waiting idle (an open WebSocket between messages) is busy
    again by the time the test's end has recalled it: else the end-of-test
    check could run while it still reads what its client sent last."""

    def test_a_recalled_idle_wait_is_busy_when_end_waits_returns(self):
        from serverlayer import content
        from serverlayer.tests.helpers import set_up_by_hand

        layer = set_up_by_hand(self, content.Layer(name="idle_wait"))
        server = layer["httpd"]
        mine, theirs = socket.socketpair()
        self.addCleanup(mine.close)
        self.addCleanup(theirs.close)
        waiting, checked, results = threading.Event(), threading.Event(), []

        def handler() -> None:
            server._activity.start()  # serving a request, as a worker does
            waiting.set()
            results.append(server.wait_readable(mine, TIMEOUT, idle=True))
            checked.wait(TIMEOUT)  # reads what its client sent last, say
            server._activity.finish()

        thread = threading.Thread(target=handler)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.assertTrue(waiting.wait(TIMEOUT))
        deadline = time.monotonic() + TIMEOUT
        while not server._activity.wait_quiet(0) and time.monotonic() < deadline:
            time.sleep(0.001)  # until it waits, idle
        server.end_waits(TIMEOUT)
        self.assertFalse(server._activity.wait_quiet(0))  # busy again the moment the recall is over
        checked.set()
        thread.join(TIMEOUT)
        self.assertEqual(results, [None])  # recalled
        self.assertTrue(server._activity.wait_quiet(TIMEOUT))
        server.allow_waits()
