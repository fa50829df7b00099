"""The custom layer: a BaseHTTPRequestHandler subclass on a thread pool."""

from __future__ import annotations

import email.utils
import functools
import gc
import http.client
import http.server
import io
import os
import select
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
import time
import unittest
import urllib.request
import warnings
from contextlib import redirect_stderr
from typing import Any
from unittest import mock

import requests

from serverlayer import ConfigurationError, ServerSideError, custom
from serverlayer.tests.helpers import (
    AcceptorChecks,
    Watched,
    assert_the_test_end_cuts_the_write,
    get_closing,
    reader_that_stops,
    set_up_by_hand,
    thread_names,
    until,
    wait_until_a_write_stalls,
)
from serverlayer.tests.test_hardening import read_until_closed


class Greeter(custom.RequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


GREETER_LAYER = custom.Layer(Greeter, name="GREETER_LAYER")


class PathEcho(custom.RequestHandler):
    """Answers a GET with its path, on a keep-alive connection."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ServingTests(unittest.TestCase):
    layer = GREETER_LAYER

    def test_serves_the_handler(self):
        with urllib.request.urlopen(self.layer["http_url"] + "world", timeout=5) as response:
            self.assertEqual(response.read(), b"hello /world")
            self.assertEqual(response.headers["Content-Type"], "text/plain")

    def test_publishes_the_handler_class(self):
        self.assertIs(self.layer["request_handler"], Greeter)

    def test_keep_alive_handler_serves_many_requests_on_one_connection(self):
        connection = http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.connect()
        local_port = connection.sock.getsockname()[1]
        for number in range(10):
            connection.request("GET", f"/{number}")
            self.assertEqual(connection.getresponse().read(), f"hello /{number}".encode())
        self.assertEqual(connection.sock.getsockname()[1], local_port)


class Counting(custom.RequestHandler):
    """Counts its requests in a class attribute, as gocept.httpserverlayer
    users' handlers do, for the test to read through the layer."""

    protocol_version = "HTTP/1.1"
    seen = 0

    def do_GET(self):
        type(self).seen += 1
        type(self).last_class = type(self)
        self.send_response(204)
        self.end_headers()


class HandlerClassTests(unittest.TestCase):

    def test_the_handler_is_an_instance_of_the_users_own_class(self):
        layer = set_up_by_hand(self, custom.Layer(Counting, name="counting"))
        self.addCleanup(setattr, Counting, "seen", 0)
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for _ in range(3):  # over one connection, and on another
            connection.request("GET", "/")
            connection.getresponse().read()
        with urllib.request.urlopen(layer["http_url"], timeout=5):
            pass
        self.assertIs(layer["request_handler"], Counting)
        self.assertEqual(layer["request_handler"].seen, 4)
        self.assertIs(layer["request_handler"].last_class, Counting)


class HandlerValidationTests(unittest.TestCase):

    def test_handler_must_be_a_request_handler_class(self):
        for wrong in (object, "Greeter", 42, http.client.HTTPConnection):
            with self.subTest(handler=wrong), self.assertRaises(ConfigurationError) as caught:
                custom.Layer(wrong, name=f"wrong_{wrong!r}")
            self.assertIn("BaseHTTPRequestHandler", str(caught.exception))

    def test_missing_handler_fails_setup(self):
        layer = custom.Layer(name="no_handler")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("no request handler", str(caught.exception))

    def test_threads_must_be_a_whole_number(self):
        for wrong in (-1, 1.5, "2", True):
            with self.subTest(threads=wrong), self.assertRaises(ConfigurationError) as caught:
                custom.Layer(Greeter, name="wrong_threads", threads=wrong)
            self.assertIn("threads=", str(caught.exception))
            self.assertIn("whole number of at least 0", str(caught.exception))


class DateTests(unittest.TestCase):

    def test_the_date_of_a_response_is_formatted_once_a_second(self):
        # http.server formats it anew for each response (email.utils).
        handler = object.__new__(custom.RequestHandler)
        this_thread = threading.get_ident()
        formatted = []
        formatdate = email.utils.formatdate

        def counted(*args, **kwargs):
            if threading.get_ident() == this_thread:
                formatted.append(args)
            return formatdate(*args, **kwargs)

        clock = mock.Mock(wraps=time)
        with mock.patch.object(custom, "_date_now", (-1, "")), mock.patch.object(custom, "time", clock), \
                mock.patch("email.utils.formatdate", counted):
            dates = []
            for now in (1_700_000_000.25, 1_700_000_000.9, 1_700_000_001.0):
                clock.time = mock.Mock(return_value=now)
                dates.append(handler.date_time_string())
            self.assertEqual(len(formatted), 2)
            # A file's date (static's Last-Modified) as http.server gives it.
            self.assertEqual(handler.date_time_string(1_000_000_000), "Sun, 09 Sep 2001 01:46:40 GMT")
        self.assertEqual(
            dates, ["Tue, 14 Nov 2023 22:13:20 GMT", "Tue, 14 Nov 2023 22:13:20 GMT", "Tue, 14 Nov 2023 22:13:21 GMT"]
        )

    def test_a_response_s_date_is_now(self):
        class Dated(custom.RequestHandler):
            def do_GET(self):
                self.send_response(204)
                self.end_headers()

        layer = set_up_by_hand(self, custom.Layer(Dated, name="dated"))
        before = time.time()
        with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
            date = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
        self.assertLessEqual(int(before), date)
        self.assertLessEqual(date, time.time())


class PoolTests(unittest.TestCase):

    def serve(self, handler, **kwargs):
        return set_up_by_hand(self, custom.Layer(handler, name=f"pool_{self._testMethodName}", **kwargs))

    def test_connections_are_served_at_the_same_time(self):
        arrived = threading.Barrier(4, timeout=5)

        class Together(custom.RequestHandler):
            def do_GET(self):
                arrived.wait()
                self.send_response(204)
                self.end_headers()

        layer = self.serve(Together)
        statuses = []

        def fetch():
            with urllib.request.urlopen(layer["http_url"], timeout=5) as response:
                statuses.append(response.status)

        clients = [threading.Thread(target=fetch) for _ in range(4)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(10)
        self.assertEqual(statuses, [204] * 4)

    def test_a_handler_that_reads_unbuffered_serves_keep_alive_and_pipelined_requests(self):
        class Unbuffered(PathEcho):
            rbufsize = 0  # StreamRequestHandler's: rfile is the socket's raw SocketIO

        layer = self.serve(Unbuffered)
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        for path in ("/1", "/2"):
            connection.request("GET", path)
            self.assertEqual(connection.getresponse().read(), path.encode())
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers = read_until_closed(sock)
        self.assertEqual(answers.count(b"HTTP/1.1 200 OK"), 2)
        self.assertTrue(answers.endswith(b"/b"), answers)

    def test_an_unbuffered_handler_records_a_large_body_whole_and_answers_what_follows(self):
        class Unbuffered(custom.RequestHandler):
            rbufsize = 0  # one read of the socket gives what the kernel has
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET  # leaves the body unread

        layer = self.serve(Unbuffered)
        body = bytes(range(256)) * 1600  # 400 kB: more than one read gets
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            sock.sendall(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (len(body), body)
            )
            answers = read_until_closed(sock)
        self.assertEqual(answers.count(b"HTTP/1.1 204 No Content"), 2, answers)
        self.assertEqual([(r.method, r.path, len(r.body)) for r in layer["http_requests"]],
                         [("POST", "/upload", len(body)), ("GET", "/after", 0)])
        self.assertEqual(layer["http_requests"][0].body, body)

    def test_a_handler_reading_through_a_file_of_its_own_answers_pipelined_requests(self):
        class Reader:
            """A handler's own file around the one http.server made: no peek."""

            def __init__(self, wrapped):
                self.wrapped = wrapped

            def readline(self, *args):
                return self.wrapped.readline(*args)

            def read(self, *args):
                return self.wrapped.read(*args)

            def close(self):
                self.wrapped.close()

        class Wrapping(PathEcho):
            def setup(self):
                super().setup()
                self.rfile = Reader(self.rfile)

        layer = self.serve(Wrapping)
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as sock:
            sock.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers = read_until_closed(sock)
        self.assertEqual(answers.count(b"HTTP/1.1 200 OK"), 3, answers)
        self.assertTrue(answers.endswith(b"/3"), answers)
        # Between requests its worker waits on the connection, not in the
        # file: the test's end parks an idle keep-alive connection at once.
        idle = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(idle.close)
        idle.request("GET", "/idle")
        self.assertEqual(idle.getresponse().read(), b"/idle")
        ending = time.monotonic()
        layer.testTearDown()
        self.assertLess(time.monotonic() - ending, 0.5)
        layer.testSetUp()
        idle.request("GET", "/next-test")
        self.assertEqual(idle.getresponse().read(), b"/next-test")

    def test_the_stop_joins_a_worker_the_test_end_left_serving(self):
        finish = threading.Event()

        class Slow(Greeter):
            def do_GET(self):
                finish.wait(10)
                time.sleep(0.2)  # still serving when the stop begins
                super().do_GET()

        layer = custom.Layer(Slow, name="pool_left_serving", report_server_errors=False)
        layer.setUp()
        self.addCleanup(finish.set)
        layer.testSetUp()
        layer.quiet_timeout = 0.2
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/slow")
        deadline = time.monotonic() + 5
        while not layer.requests and time.monotonic() < deadline:  # until the worker has it
            time.sleep(0.005)
        layer.testTearDown()  # gives up on the worker after quiet_timeout
        workers = [thread for thread in threading.enumerate() if thread.name.endswith(" worker 1")
                   and "pool_left_serving" in thread.name]
        self.assertEqual(len(workers), 1)
        finish.set()
        layer.tearDown()
        self.assertFalse(workers[0].is_alive(), "tearDown returned before the worker ended")

    def test_an_idle_connection_holds_no_thread_and_stays_open(self):
        layer = self.serve(Greeter, threads=1)
        idle = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(idle.close)
        idle.request("GET", "/first")
        self.assertEqual(idle.getresponse().read(), b"hello /first")
        first_connection = idle.sock.getsockname()
        # The only worker is free for other connections while this one idles ...
        with urllib.request.urlopen(layer["http_url"] + "second", timeout=5) as response:
            self.assertEqual(response.read(), b"hello /second")
        # ... and the idle connection is still there for its next request.
        idle.request("GET", "/third")
        self.assertEqual(idle.getresponse().read(), b"hello /third")
        self.assertEqual(idle.sock.getsockname(), first_connection)  # not a new connection
        self.assertEqual(len(layer.requests), 3)

    def test_a_silent_client_does_not_hold_the_thread(self):
        layer = self.serve(Greeter, threads=1)
        silent = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(silent.close)
        with urllib.request.urlopen(layer["http_url"] + "after-silence", timeout=5) as response:
            self.assertEqual(response.read(), b"hello /after-silence")

    def test_a_busy_keep_alive_connection_keeps_its_thread(self):
        class ThreadNaming(custom.RequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                body = threading.current_thread().name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        layer = self.serve(ThreadNaming, threads=1)
        busy = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(busy.close)
        busy_threads, other_threads, waits = set(), set(), []
        for _ in range(20):  # requests in quick succession: never idle for long ...
            busy.request("GET", "/busy")
            busy_threads.add(busy.getresponse().read())
            # ... and between two of them another client is answered at once.
            started = time.monotonic()
            with urllib.request.urlopen(layer["http_url"] + "other", timeout=5) as response:
                other_threads.add(response.read())
            waits.append(time.monotonic() - started)
        self.assertEqual(len(busy_threads), 1, busy_threads)
        self.assertNotIn(busy_threads.pop(), other_threads)
        # About 1 ms each on an idle machine; an idle grace period of the
        # busy connection's worker (0.25 s once) would show here.
        self.assertLess(max(waits), 0.2, waits)


class ThreadNaming(custom.RequestHandler):
    """Answers with the name of the thread that serves the request; on
    ``/self``, with what its own server answered to ``/inner`` too."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        served_by = threading.current_thread().name
        if self.path == "/self":
            url = f"http://{self.server.server_address[0]}:{self.server.server_port}/inner"
            with urllib.request.urlopen(url, timeout=5) as response:
                served_by += " | " + response.read().decode()
        body = served_by.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)




@unittest.skipUnless(hasattr(select, "EPOLLEXCLUSIVE"), "the acceptor needs epoll's EPOLLEXCLUSIVE (Linux)")
class AcceptorTests(AcceptorChecks, unittest.TestCase):
    """Once a test's first connection came, a thread of its own (the
    acceptor) accepts new connections and serves the request each brought,
    without handing it from the loop to a worker. A connection that comes
    while it is busy goes to the loop (so that one may also come just as
    it finishes: the tests try a few)."""

    def serve(self, **kwargs):
        layer = set_up_by_hand(self, custom.Layer(ThreadNaming, name=f"acceptor_{self._testMethodName}", **kwargs))
        self.assertTrue(get_closing(layer, "/first").endswith(" worker 1"))  # the loop accepted it
        return layer

    LOOP_TURN_METHOD = "_watch_returned"  # once a turn that the wake-up starts

    def wake_loop(self, server):
        server._wake_loop()

    def test_no_acceptor_starts_between_tests(self):
        # A client still connecting after the test's tear-down (a browser
        # left open) started one that zope.testrunner then found left
        # behind by that test; the loop serves such a connection itself.
        layer = self.serve()
        layer.testTearDown()  # the test's end
        self.assertIn(" worker ", get_closing(layer, "/between"))
        self.assertIsNone(layer["httpd"]._acceptor)
        self.assertEqual([thread for thread in threading.enumerate() if thread.name.endswith(" acceptor")], [])
        layer.testSetUp()  # the next test's start
        self.assertIn(" worker ", get_closing(layer, "/next"))  # the loop's, which starts the acceptor
        self.assertIsNotNone(layer["httpd"]._acceptor)

    def test_a_failure_of_a_server_thread_is_a_server_error(self):
        # Not only a traceback on stderr, which a passing test run hides.
        layer = self.serve()
        server = layer["httpd"]
        acceptor = server._acceptor  # started as the loop accepted the first connection
        self.assertIsNotNone(acceptor)
        with mock.patch.object(server, "_accept_and_serve", side_effect=RuntimeError("a fault of ours")):
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5):
                acceptor.thread.join(5)
        [error] = layer.server_errors.take()
        self.assertIn(f"serverlayer {layer.__module__}.{layer.__name__} acceptor failed", error)
        self.assertIn("RuntimeError: a fault of ours", error)

    def test_the_acceptor_ends_with_the_test(self):
        layer = self.serve()

        def acceptors():
            return [thread for thread in threading.enumerate() if thread.name.endswith(f"{layer.__name__} acceptor")]

        self.assertEqual(len(acceptors()), 1)
        layer.testTearDown()
        layer.testSetUp()
        self.assertEqual(acceptors(), [])
        self.assertIn(" worker ", get_closing(layer, "/next-test"))  # the loop accepted it
        self.assertEqual(len(acceptors()), 1)

    def test_a_connection_made_as_the_test_ends_starts_no_acceptor(self):
        layer = set_up_by_hand(self, custom.Layer(ThreadNaming, name="acceptor_as_the_test_ends"))
        server = layer["httpd"]
        server.end_waits(1.0)  # what the end of the test does first
        self.addCleanup(server.allow_waits)
        self.assertIn(" worker ", get_closing(layer, "/late"))  # the loop accepted it
        self.assertEqual(
            [thread for thread in threading.enumerate() if thread.name.endswith("acceptor_as_the_test_ends acceptor")],
            [],
        )

    def test_a_kept_connection_idle_for_the_handler_s_timeout_is_closed(self):
        class ShortTimeoutNaming(ThreadNaming):
            timeout = 0.2  # StreamRequestHandler's

        layer = set_up_by_hand(self, custom.Layer(ShortTimeoutNaming, name="acceptor_kept_timeout"))
        self.assertTrue(get_closing(layer, "/first"))  # starts the acceptor
        for _ in range(self.ATTEMPTS):
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as client:
                client.sendall(b"GET /kept HTTP/1.1\r\nHost: x\r\n\r\n")
                started = time.monotonic()
                answer = read_until_closed(client)  # the answer, then the server's end
                if answer.endswith(b" acceptor"):
                    self.assertGreaterEqual(time.monotonic() - started, 0.15)
                    return
        self.fail("the acceptor answered none of the connections")

    def test_the_acceptor_waits_for_a_kept_connection_s_next_request_beside_new_connections(self):
        # Not on the kept connection alone, which left new connections to
        # the loop and a worker: a client opening a connection per request
        # without Connection: close (requests.get) paid a hand-over each.
        layer = self.serve()
        served_by = []
        for _ in range(self.ATTEMPTS):
            kept = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
            self.addCleanup(kept.close)
            kept.request("GET", "/kept")
            if not kept.getresponse().read().decode().endswith(" acceptor"):
                continue
            served_by.append(get_closing(layer, "/new"))
            # The kept connection goes on, answered by the loop's worker if
            # the new one took the acceptor.
            kept.request("GET", "/kept-again")
            self.assertTrue(kept.getresponse().read())
            if served_by[-1].endswith(" acceptor"):
                return
        self.fail(f"the acceptor answered none of the new connections: {served_by}")

    def test_answering_takes_no_lock_the_workers_wait_on(self):
        # Every worker takes the workers' lock twice a request (its wait for
        # the next one). The acceptor took it too, as it began and ended
        # each answer, and held it across the system calls that (un)register
        # the loop: with eight client threads in the server's process, a
        # worker blocked on it about four times a request (strace).
        layer = self.serve()
        server = layer["httpd"]
        takers: list[str] = []
        lock = Watched(server._workers_lock, lambda thread: takers.append(thread.name))
        kept = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(kept.close)
        for _ in range(self.ATTEMPTS):
            kept.close()
            kept.request("GET", "/kept")
            if kept.getresponse().read().endswith(b" acceptor"):
                break
        else:
            self.fail("the acceptor answered none of the connections")
        with mock.patch.object(server, "_workers_lock", lock):
            answered_by = []
            for _ in range(10):
                kept.request("GET", "/kept")
                answered_by.append(kept.getresponse().read().decode())
        self.assertTrue(all(name.endswith(" acceptor") for name in answered_by), answered_by)
        self.assertEqual([name for name in takers if name.endswith(" acceptor")], [])

    def test_the_acceptor_runs_only_once_it_is_the_server_s_acceptor(self):
        # Started before the server took it for its acceptor, it could
        # answer a connection unseen: what it said about answering did not
        # count, the loop did not accept meanwhile, and a handler waiting
        # for a second connection waited for ever.
        layer = set_up_by_hand(self, custom.Layer(ThreadNaming, name="acceptor_runs_once_taken"))
        server = layer["httpd"]
        seen = []
        run = custom._Acceptor._run

        def noted_run(acceptor):
            seen.append(server._acceptor is acceptor)
            return run(acceptor)

        with mock.patch.object(custom._Acceptor, "_run", noted_run):
            self.assertIn(" worker ", get_closing(layer, "/first"))  # the loop's, which starts the acceptor
            self.assertTrue(until(lambda: seen))
        self.assertEqual(seen, [True])

    def test_a_connection_the_loop_finds_taken_after_the_test_ended_starts_no_acceptor(self):
        # The kernel also wakes the loop for a connection that comes while
        # the acceptor serves; the acceptor may take it and the test end
        # before the loop, waiting for the interpreter lock, looks. Finding
        # nothing to accept, the loop started an acceptor after the test's
        # end, which the test runner named as a thread the test left behind.
        layer = set_up_by_hand(self, custom.Layer(ThreadNaming, name="acceptor_after_the_end"))
        server = layer["httpd"]
        kept = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(kept.close)
        kept.request("GET", "/kept")
        self.assertTrue(kept.getresponse().read())
        layer.testTearDown()  # ends the acceptor the loop's accept started
        self.addCleanup(layer.testSetUp)  # set_up_by_hand tears the test down again
        accept = server._accept

        def taken_meanwhile(selector, listening):
            listening.accept()[0].close()  # by the acceptor, before the loop's turn came
            return accept(selector, listening)

        with mock.patch.object(server, "_accept", taken_meanwhile):
            with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as taken:
                self.assertEqual(taken.recv(1), b"")
        kept.request("GET", "/kept-again")  # answered at the loop's next turn
        self.assertTrue(kept.getresponse().read())
        names = [thread.name for thread in threading.enumerate()]
        self.assertEqual([name for name in names if name.endswith(".acceptor_after_the_end acceptor")], [])


class ShortTimeout(Greeter):
    protocol_version = "HTTP/1.1"
    timeout = 0.2  # StreamRequestHandler's: the socket's timeout


class HandlerTimeoutTests(unittest.TestCase):
    """A handler's ``timeout`` ends a connection idle that long, as it does
    under ``http.server``: there the read of the next request times out."""

    def serve(self, handler, **kwargs):
        return set_up_by_hand(self, custom.Layer(handler, name=f"timeout_{self._testMethodName}", **kwargs))

    def keep_alive_request(self, layer):
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        return client

    def read_answer(self, client) -> None:
        """Read the answer to ``keep_alive_request``, leaving the connection open."""
        answer = b""
        while not answer.endswith(b"hello /first"):
            answer += client.recv(4096) or self.fail(f"closed after {answer!r}")

    def test_a_keep_alive_connection_idle_for_the_handlers_timeout_is_closed(self):
        layer = self.serve(ShortTimeout, threads=1)
        # Before the request: the server's idle time begins once it has
        # answered, which may come before this thread runs again.
        started = time.monotonic()
        client = self.keep_alive_request(layer)
        answer = read_until_closed(client)
        self.assertTrue(answer.endswith(b"hello /first"), answer)
        self.assertGreaterEqual(time.monotonic() - started, ShortTimeout.timeout)

    def test_a_connection_idle_across_the_end_of_a_test_is_closed_after_the_timeout(self):
        layer = self.serve(ShortTimeout, threads=1)
        client = self.keep_alive_request(layer)
        self.read_answer(client)
        layer.testTearDown()  # parks the connection with the loop
        layer.testSetUp()
        self.assertEqual(read_until_closed(client), b"")

    def test_a_client_that_never_sends_a_request_is_closed_after_the_timeout(self):
        layer = self.serve(ShortTimeout, threads=1)
        silent = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(silent.close)
        self.assertEqual(read_until_closed(silent), b"")

    def test_requests_within_the_timeout_keep_the_connection(self):
        layer = self.serve(ShortTimeout, threads=1)
        client = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=5)
        self.addCleanup(client.close)
        addresses = set()
        for number in range(3):
            client.request("GET", f"/{number}")
            self.assertEqual(client.getresponse().read(), f"hello /{number}".encode())
            addresses.add(client.sock.getsockname())
        self.assertEqual(len(addresses), 1)  # one connection

    def test_an_answer_that_ends_with_the_connection_is_not_held_by_the_timeout(self):
        class UntilClosed(custom.RequestHandler):
            timeout = 30  # the socket's: reads of it may wait that long
            def do_GET(self):
                self.send_response(200)
                self.end_headers()  # no Content-Length: the end of the connection ends the body
                self.wfile.write(b"whole")

        layer = self.serve(UntilClosed, threads=1)
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(read_until_closed(client).endswith(b"\r\n\r\nwhole"))  # at once, not after 30 s

    def test_a_connection_the_server_ended_closes_after_the_timeout_if_its_client_never_does(self):
        class Ending(ShortTimeout):
            protocol_version = "HTTP/1.0"  # ends the connection after its answer

        layer = self.serve(Ending, threads=1)
        client = self.keep_alive_request(layer)  # a request that does not say it is the last
        self.assertTrue(read_until_closed(client).endswith(b"hello /first"))
        server = layer["httpd"]
        deadline = time.monotonic() + 5
        while server._connections and time.monotonic() < deadline:  # the client keeps its socket
            time.sleep(0.01)
        self.assertEqual(server._connections, {})

    def test_connections_their_clients_closed_before_the_timeout_leave_the_server_serving(self):
        class Ending(ShortTimeout):
            protocol_version = "HTTP/1.0"

        layer = self.serve(Ending, threads=1)
        for _ in range(3):  # each lingers, with the timeout as its deadline, until its client closes
            client = self.keep_alive_request(layer)
            self.assertTrue(read_until_closed(client).endswith(b"hello /first"))
            client.close()
        time.sleep(Ending.timeout * 3)  # past their deadlines, which find them closed
        with urllib.request.urlopen(layer["http_url"] + "after", timeout=5) as response:
            self.assertEqual(response.read(), b"hello /after")

    def test_without_a_timeout_an_idle_connection_stays_open(self):
        layer = self.serve(Greeter, threads=1)
        client = self.keep_alive_request(layer)
        self.read_answer(client)
        client.settimeout(0.5)
        with self.assertRaises(TimeoutError):  # nothing more: still open
            client.recv(4096)


class EndingTests(unittest.TestCase):
    """A connection the server ends after an answer."""

    def test_the_answer_reaches_a_client_that_sent_more_than_was_read(self):
        answering, more_sent = threading.Event(), threading.Event()
        body = os.urandom(8 * 1024 * 1024)

        class Large(custom.RequestHandler):  # HTTP/1.0: ends the connection after its answer
            def do_GET(self):
                answering.set()
                more_sent.wait(5)  # so that what the client sent next is there, unread
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        layer = set_up_by_hand(self, custom.Layer(Large, name="ending_client_sent_more"))
        client = socket.socket()
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # much of the answer waits on the server
        client.settimeout(5)
        client.connect((layer["http_host"], layer["http_port"]))
        client.sendall(b"GET /large HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answering.wait(5))
        client.sendall(b"GET /more HTTP/1.1\r\nHost: x\r\n\r\n")  # never read by the handler
        more_sent.set()
        received = read_until_closed(client)
        self.assertEqual(received[-len(body):], body)  # socketserver's close reset the connection some MB short
        client.close()
        server = layer["httpd"]
        deadline = time.monotonic() + 5
        while server._connections and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(server._connections, {})  # closed at the client's end

    def test_a_client_that_said_its_request_was_its_last_is_closed_at_once(self):
        layer = set_up_by_hand(self, custom.Layer(Greeter, name="ending_last_request"))
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(read_until_closed(client).endswith(b"hello /last"))
        self.assertEqual(layer["httpd"]._connections, {})  # not waiting for the client's end


class ExpectContinueTests(unittest.TestCase):
    """A client that waits for ``100 Continue`` before it sends its body."""

    def check_continue_reaches_a_buffering_handler_client(self, protocol):
        class Rejecting(custom.RequestHandler):
            protocol_version = protocol
            wbufsize = -1  # a buffered wfile: http.server's 100 Continue waits in it

            def do_POST(self):
                self.send_response(413)
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.close_connection = True

        layer = set_up_by_hand(self, custom.Layer(Rejecting, name=f"expect_continue_{protocol[-1]}"))
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        # Under gocept.httpserverlayer the handler answered at once; here
        # the body is read before it runs, so the client must be told to send it.
        self.assertEqual(client.recv(25), protocol.encode() + b" 100 Continue\r\n\r\n")
        client.sendall(b"0123456789")
        self.assertIn(b" 413 ", read_until_closed(client))

    def test_an_http_1_1_handler_with_a_buffered_wfile_sends_100_continue(self):
        self.check_continue_reaches_a_buffering_handler_client("HTTP/1.1")

    def test_an_http_1_0_handler_with_a_buffered_wfile_sends_100_continue(self):
        self.check_continue_reaches_a_buffering_handler_client("HTTP/1.0")


class WakeUpTests(unittest.TestCase):

    def test_stopping_does_not_wait_for_the_loop_to_read_its_wake_ups(self):
        # Each connection a worker gives back wakes the loop with a byte;
        # many given back at a test's end while the loop is busy can fill
        # the socket pair, and a blocking send then waited for a loop that,
        # once stopping, never reads again.
        layer = set_up_by_hand(self, custom.Layer(Greeter, name="full_wake_ups"))
        server = layer["httpd"]
        held, released = threading.Event(), threading.Event()

        def busy(selector):  # the loop, woken, is held up before it reads
            held.set()
            released.wait(10)

        def drain():  # so that, should the test fail, tearDown is not held up too
            while True:
                try:
                    server._wake_reader.recv(65536, socket.MSG_DONTWAIT)
                except OSError:
                    return

        server._watch_returned = busy
        self.addCleanup(drain)
        self.addCleanup(released.set)
        server._wake_loop()
        self.assertTrue(held.wait(5))
        while True:  # fill the socket pair
            try:
                server._wake_writer.send(b"\0" * 1024, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        stopping = threading.Thread(target=server.request_stop, daemon=True)
        stopping.start()
        stopping.join(5)
        self.assertFalse(stopping.is_alive(), "request_stop waited for the loop to read")


class DisconnectTests(unittest.TestCase):

    def test_a_client_resetting_its_connection_between_requests_is_no_error(self):
        # The reset surfaces in http.server reading the next request line,
        # through a file the handler's finish() has closed by the time the
        # error is looked at: it was taken for a handler's own error.
        class Answer(custom.RequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        layer = set_up_by_hand(self, custom.Layer(Answer, name="reset_between_requests"))
        for _ in range(50):
            client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
            client.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            client.recv(10)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset, as a browser's closed tab sends
        layer.check_after_test()  # no error to report

    def test_a_client_hanging_up_on_a_handler_with_a_buffered_wfile_is_no_error(self):
        # finish() closes the buffered wfile, whose flush raises; by the time
        # the error is looked at, the close took the connection off the file.
        answered = threading.Event()

        class BufferedAnswer(custom.RequestHandler):
            wbufsize = -1

            def do_GET(self):
                answered.wait(5)  # the client is gone by now
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"hello")

        layer = set_up_by_hand(self, custom.Layer(BufferedAnswer, name="hangs_up_buffered"))
        client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        answered.set()
        layer.check_after_test()  # no error to report

    def test_client_hanging_up_early_is_no_error_and_prints_nothing(self):
        finished = threading.Event()

        class BigAnswer(custom.RequestHandler):
            def do_GET(self):
                try:
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(200):
                        self.wfile.write(b"x" * 65536)
                finally:
                    finished.set()

        layer = custom.Layer(BigAnswer, name="hangs_up")
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            set_up_by_hand(self, layer)
            client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5)
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            self.assertTrue(client.recv(10))
            # Close with a reset, the rudest way a client can leave.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            self.assertTrue(finished.wait(5))
            layer.check_server_errors()
            layer.tearDown()  # and what stopping prints, if anything
        self.assertEqual(stderr.getvalue(), "")

    def assert_a_failing_backend_call_fails_the_test(self, call_backend, expected):
        """A handler whose own call to another service fails with a
        ConnectionError or TimeoutError raised: its client is still there,
        and gets no answer. That is the handler's error, not a client gone."""

        class Proxy(custom.RequestHandler):
            def do_GET(self):
                call_backend()
                self.send_response(200)
                self.end_headers()

        layer = custom.Layer(Proxy, name="proxy")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        with self.assertRaises(http.client.RemoteDisconnected):
            urllib.request.urlopen(layer["http_url"], timeout=5)
        with self.assertRaises(ServerSideError) as caught:
            layer.check_server_errors()
        self.assertIn("Proxy raised while serving GET /", str(caught.exception))
        self.assertIn(expected, str(caught.exception))

    def test_a_backend_that_refuses_is_the_handlers_error(self):
        # Bound, not listening: refused, and held. A port closed again
        # before the call may be taken meanwhile: another server's, or the
        # calling socket's own (connected to itself, it was not refused).
        refusing = socket.socket()
        self.addCleanup(refusing.close)
        refusing.bind(("127.0.0.1", 0))
        port = refusing.getsockname()[1]

        def call_backend():
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

        self.assert_a_failing_backend_call_fails_the_test(call_backend, "ConnectionRefusedError")

    def test_a_backend_that_hangs_up_is_the_handlers_error(self):
        backend = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(backend.close)

        def hang_up():
            connection, _ = backend.accept()
            connection.recv(65536)
            connection.close()

        def call_backend():
            thread = threading.Thread(target=hang_up)
            thread.start()
            try:
                connection = http.client.HTTPConnection(*backend.getsockname(), timeout=5)
                connection.request("GET", "/")
                connection.getresponse()  # RemoteDisconnected, a ConnectionResetError
            finally:
                connection.close()
                thread.join(5)

        self.assert_a_failing_backend_call_fails_the_test(call_backend, "RemoteDisconnected")

    def test_a_backend_that_times_out_is_the_handlers_error(self):
        """http.server takes every TimeoutError of a do_ method for its
        client's connection timing out, and only logs it."""
        backend = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(backend.close)

        def call_backend():
            with socket.create_connection(backend.getsockname(), timeout=0.05) as connection:
                connection.makefile("rb").read(1)  # the backend never answers: TimeoutError

        self.assert_a_failing_backend_call_fails_the_test(call_backend, "TimeoutError")

    def test_a_client_that_stalls_past_the_handlers_timeout_is_no_error(self):
        class Patient(custom.RequestHandler):
            timeout = 0.05

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.end_headers()

        layer = custom.Layer(Patient, name="patient")
        layer.setUp()
        self.addCleanup(layer.tearDown)
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as client:
            client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")  # and no more
            self.assertEqual(client.recv(100), b"")  # the handler's timeout closed it
        layer.check_server_errors()


def tls_by_hand(handler: type[custom.RequestHandler], context: Any) -> type[custom.RequestHandler]:
    """``handler`` serving HTTPS made by hand, as many suites do: its
    ``setup()`` wraps the socket in TLS."""

    class HandMade(handler):  # type: ignore[valid-type, misc]
        def setup(self):
            self.request = self.connection = context.wrap_socket(self.request, server_side=True)
            super().setup()

    return HandMade


class OwnHandleTests(unittest.TestCase):
    """A handler with a handle() of its own keeps its thread for its
    connection; a client keeping the connection across tests holds up no
    test's end, and an error is the test's whose request raised it."""

    #: Workers started with the server: with none, the connection's worker
    #: is one the test started, which the test's end does not wait for.
    threads = 1

    def test_a_connection_kept_across_tests(self):
        class Quiet(Greeter):
            def handle(self):  # a common wrapper: swallow the client's resets
                try:
                    super().handle()
                except ConnectionResetError:
                    pass

            def do_GET(self):
                super().do_GET()
                if self.path == "/raise-after":
                    raise ValueError("raised after answering")

        layer = set_up_by_hand(self, custom.Layer(Quiet, name=f"own_handle_kept_{self.threads}", threads=self.threads))
        before = thread_names()

        def end_of_test() -> float:
            started = time.monotonic()
            try:
                layer.check_after_test()
            finally:
                layer.testTearDown()
                layer.testSetUp()
            return time.monotonic() - started

        with requests.Session() as session:  # as a module-level one
            self.assertEqual(session.get(layer["http_url"], timeout=5).text, "hello /")
            self.assertLess(end_of_test(), 0.5)  # not quiet_timeout: the handler waits, it does not serve
            self.assertEqual(session.get(layer["http_url"] + "raise-after", timeout=5).text, "hello /raise-after")
            with self.assertRaises(ServerSideError) as raised:
                end_of_test()
            self.assertIn("made by this test", str(raised.exception))
            self.assertIn("ValueError: raised after answering", str(raised.exception))
            self.assertEqual(session.get(layer["http_url"], timeout=5).text, "hello /")
            self.assertLess(end_of_test(), 0.5)
            if self.threads:
                self.assertEqual(thread_names(), before)  # the steady worker serves it: no thread left behind


class OwnHandleTimeoutTests(unittest.TestCase):

    def test_an_idle_connection_closes_after_the_handlers_timeout_once(self):
        class Quiet(Greeter):
            timeout = 0.3

            def handle(self):
                super().handle()

        layer = set_up_by_hand(self, custom.Layer(Quiet, name="own_handle_timeout"))
        with socket.create_connection((layer["http_host"], layer["http_port"]), timeout=5) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            started = time.monotonic()
            received = read_until_closed(client)  # the answer, then nothing: idle until the server closes
            waited = time.monotonic() - started
        self.assertIn(b"hello /", received)
        self.assertGreaterEqual(waited, 0.25)
        self.assertLess(waited, 0.55)  # the handler's timeout, not twice it


class OwnHandleNoSteadyWorkerTests(OwnHandleTests):
    threads = 0


class WrappedInSetupTests(unittest.TestCase):
    """HTTPS made by hand: a handler whose setup() wraps its socket in TLS."""

    def test_keep_alive_pipelining_and_parking_work_on_the_wrapped_socket(self):
        import ssl
        import tempfile

        import trustme

        authority = trustme.CA()
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1").configure_cert(server_context)
        client_context = ssl.create_default_context()
        authority.configure_trust(client_context)

        layer = set_up_by_hand(self, custom.Layer(tls_by_hand(Greeter, server_context), name="wrapped_in_setup"))
        url = f"https://127.0.0.1:{layer['http_port']}/"
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as bundle, requests.Session() as session:
            bundle.write(authority.cert_pem.bytes().decode())
            bundle.flush()
            for number in range(6):
                response = session.get(url + str(number), verify=bundle.name, timeout=5)
                self.assertEqual(response.text, f"hello /{number}")
                if number == 2:  # the end of a test parks the connection; the loop watches it
                    layer.check_after_test()
                    layer.testTearDown()
                    layer.testSetUp()
        with socket.create_connection(("127.0.0.1", layer["http_port"]), timeout=5) as raw:
            with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as client:
                # Pipelined in one record: the second waits decrypted in the
                # server's TLS object, where poll() cannot see it.
                client.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                received = read_until_closed(client)
        self.assertIn(b"hello /a", received)
        self.assertIn(b"hello /b", received)
        layer.check_server_errors()


class WrappedConnectionTests(unittest.TestCase):
    """What a handler's setup() puts in ``self.connection``: TLS made by
    hand (adopted), or an object of its own that is no socket (left alone)."""

    def setUp(self):
        import ssl

        import trustme

        authority = trustme.CA()
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1").configure_cert(self.server_context)
        self.client_context = ssl.create_default_context()
        authority.configure_trust(self.client_context)

    def end_of_test(self, layer: custom.Layer) -> float:
        started = time.monotonic()
        layer.check_after_test()
        layer.testTearDown()
        layer.testSetUp()
        return time.monotonic() - started

    def test_a_stream_to_a_reader_that_stops_is_cut_on_a_hand_made_tls_connection(self):
        class Big(custom.RequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                size = 10 if self.path == "/small" else 200 * 65536
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                for start in range(0, size, 65536):
                    self.wfile.write(b"x" * min(65536, size - start))

        layer = set_up_by_hand(self, custom.Layer(tls_by_hand(Big, self.server_context), name="hand_made_tls_cut"))
        before = thread_names()
        for parked in (False, True):  # served first, and resumed after a test's end
            with self.subTest(parked=parked):
                raw = socket.create_connection(("127.0.0.1", layer["http_port"]), timeout=10)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client = self.client_context.wrap_socket(raw, server_hostname="127.0.0.1")
                self.addCleanup(client.close)
                if parked:
                    client.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
                    received = b""
                    while not received.endswith(b"x" * 10):
                        received += client.recv(4096)
                    self.end_of_test(layer)
                client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                client.recv(100)  # then reads no more
                wait_until_a_write_stalls(self, layer)
                self.assertLess(self.end_of_test(layer), 0.5)  # cut, not the 1 s wait for quiet
                self.assertEqual(thread_names(), before)
                self.assertEqual(layer.server_errors.take(), [])  # a cut write is no error

    def test_a_handler_of_its_own_on_a_hand_made_tls_connection_stops_at_once(self):
        class OwnLoop(Greeter):
            def handle(self):
                try:
                    super().handle()
                except ConnectionResetError:
                    pass

        layer = custom.Layer(tls_by_hand(OwnLoop, self.server_context), name="hand_made_tls_own_handle")
        layer.setUp()
        raw = socket.create_connection(("127.0.0.1", layer["http_port"]), timeout=10)
        with self.client_context.wrap_socket(raw, server_hostname="127.0.0.1") as client:
            try:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertTrue(client.recv(100).startswith(b"HTTP/1.1 200 OK"))
            finally:
                started = time.monotonic()
                layer.tearDown()  # the client still connected: its worker waits on the wrapper
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual([name for name in thread_names() if "hand_made_tls_own_handle" in name], [])

    def test_a_handshake_stalled_in_setup_does_not_hold_up_the_stop(self):
        layer = custom.Layer(tls_by_hand(Greeter, self.server_context), name="hand_made_tls_stalled")
        layer.setUp()
        with socket.create_connection(("127.0.0.1", layer["http_port"]), timeout=10) as client:
            client.sendall(b"\x16\x03\x01\x02\x00")  # a TLS record's header, then nothing
            deadline = time.monotonic() + 5
            while not [name for name in thread_names() if "hand_made_tls_stalled worker" in name]:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.001)
            time.sleep(0.05)  # into the handshake's read
            started = time.monotonic()
            layer.tearDown()  # the client still there, silent
            self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual([name for name in thread_names() if "hand_made_tls_stalled" in name], [])

    def test_a_client_leaving_during_a_hand_made_handshake_is_no_error(self):
        # The handler's setup() fails in the SSLSocket it wraps the
        # connection in, before it holds that: still the client's doing.
        layer = set_up_by_hand(self, custom.Layer(tls_by_hand(Greeter, self.server_context), name="hand_made_tls_left"))
        with socket.create_connection(("127.0.0.1", layer["http_port"]), timeout=10) as client:
            client.sendall(b"\x16\x03\x01\x02\x00")  # a TLS record's header, then the end
            client.shutdown(socket.SHUT_WR)
            while client.recv(100):  # a TLS alert, perhaps: the handshake failed
                pass
        layer.check_after_test()  # no error to report
        layer.testTearDown()
        layer.testSetUp()

    def test_a_connection_that_is_no_socket_is_left_to_the_handler(self):
        class Counting:  # counts what the handler sends, passing the rest through
            def __init__(self, sock):
                self.sock, self.sent = sock, 0

            def sendall(self, data, *args):
                self.sent += len(data)
                return self.sock.sendall(data, *args)

            def __getattr__(self, name):
                return getattr(self.sock, name)

        class Counted(Greeter):
            def setup(self):
                super().setup()
                self.connection = Counting(self.request)
                self.wfile = socketserver._SocketWriter(self.connection)

        layer = set_up_by_hand(self, custom.Layer(Counted, name="connection_no_socket"))
        with requests.Session() as session:
            self.assertEqual(session.get(layer["http_url"], timeout=5).text, "hello /")
            self.end_of_test(layer)  # parked: the serving loop watches the socket itself
            self.assertEqual(session.get(layer["http_url"] + "again", timeout=5).text, "hello /again")
        self.assertIsNone(layer._running.failure)


class FinishRaisesTests(unittest.TestCase):

    def test_a_finish_that_raises_as_the_server_stops_fails_the_tear_down_and_all_closes(self):
        class Finicky(Greeter):
            def finish(self):
                super().finish()
                raise RuntimeError("raised in finish")

        layer = custom.Layer(Finicky, name="finish_raises_at_stop")
        layer.setUp()
        layer.testSetUp()
        httpd = layer["httpd"]
        sessions = [requests.Session(), requests.Session()]
        for session in sessions:
            self.addCleanup(session.close)
            self.assertEqual(session.get(layer["http_url"], timeout=5).text, "hello /")
        layer.check_after_test()
        layer.testTearDown()  # the connections wait, parked, for the stop to close them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with self.assertRaises(ServerSideError) as raised:
                layer.tearDown()
            gc.collect()
        self.assertIn("finish() raised as the server stopped", str(raised.exception))
        self.assertEqual(str(raised.exception).count("RuntimeError: raised in finish"), 2)  # both connections
        self.assertEqual([str(warning.message) for warning in caught], [])
        self.assertEqual(httpd._connections, {})
        self.assertTrue(httpd._wake_reader._closed and httpd._recall_writer._closed)

    def test_a_finish_that_raises_when_a_kept_connection_closes_fails_the_test_and_the_server_serves_on(self):
        # The connection closes in the serving loop's thread, between requests.
        class Finicky(Greeter):
            protocol_version = "HTTP/1.1"

            def finish(self):
                super().finish()
                if getattr(self, "path", "") == "/boom":
                    raise RuntimeError("raised in finish")

        layer = set_up_by_hand(self, custom.Layer(Finicky, name="finish_raises"))
        with requests.Session() as session:  # kept across tests, as a module-level one is
            self.assertEqual(session.get(layer["http_url"] + "boom", timeout=5).status_code, 200)
            layer.check_after_test()  # the end of the test parks the connection for the loop
            layer.testTearDown()
            layer.testSetUp()
        deadline = time.monotonic() + 5
        while not layer.server_errors._errors and time.monotonic() < deadline:
            time.sleep(0.001)
        with self.assertRaises(ServerSideError) as raised:
            layer.check_server_errors()
        self.assertIn("RuntimeError: raised in finish", str(raised.exception))
        for _ in range(3):  # the server serves on
            self.assertEqual(requests.get(layer["http_url"], timeout=5).status_code, 200)
        self.assertIsNone(layer._running.failure)  # the serving loop lives


class StalledReaderTests(unittest.TestCase):
    """A client that stops reading what a handler of the user's own sends
    (a page left open with a stream half loaded) holds up neither the end
    of its test nor a thread: the write is cut when the test ends."""

    def stream_to_a_reader_that_stops(self, handler: type[custom.RequestHandler], **options: Any) -> None:
        layer = custom.Layer(handler, name=f"stalled_reader_{handler.__name__}_{len(options)}", **options)
        set_up_by_hand(self, layer)
        before = thread_names()
        reader_that_stops(self, layer, "/stream")
        wait_until_a_write_stalls(self, layer)
        assert_the_test_end_cuts_the_write(self, layer, before)

    def test_a_handler_streaming_in_many_writes(self):
        class Stream(custom.RequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(200 * 65536))
                self.end_headers()
                for _ in range(200):
                    self.wfile.write(b"x" * 65536)

        self.stream_to_a_reader_that_stops(Stream)
        self.stream_to_a_reader_that_stops(Stream, tls=True)

    def test_a_handler_that_catches_the_cut_does_not_keep_the_connection(self):
        caught = []

        class Careless(custom.RequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(200 * 65536))
                self.end_headers()
                try:
                    for _ in range(200):
                        self.wfile.write(b"x" * 65536)
                except OSError as error:  # and goes on as if the answer were whole
                    caught.append(error)

        self.stream_to_a_reader_that_stops(Careless)
        self.assertEqual([type(error) for error in caught], [BrokenPipeError])

    def test_a_handler_with_a_handle_of_its_own(self):
        class OwnLoop(custom.RequestHandler):
            def handle(self):
                self.raw_requestline = self.rfile.readline()
                self.parse_request()
                self.wfile.write(b"HTTP/1.0 200 OK\r\n\r\n")
                for _ in range(200):
                    self.wfile.write(b"x" * 65536)

        self.stream_to_a_reader_that_stops(OwnLoop)


class PlainGreeter(http.server.BaseHTTPRequestHandler):
    """A handler as http.server's documentation writes them: its
    ``log_message`` is the standard library's, which writes to stderr."""

    do_GET = Greeter.do_GET


class PartialHandlerTests(unittest.TestCase):

    def test_a_partial_of_a_handler_subclass_is_served_and_type_checks(self) -> None:
        # custom.rst shows partial(SimpleHTTPRequestHandler, directory=...).
        # functools.partial is invariant, so a parameter typed
        # partial[BaseHTTPRequestHandler] refused it under a user's mypy
        # (`mypy src` checks this annotated body).
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        with open(os.path.join(directory.name, "page.txt"), "w") as file:
            file.write("served")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory.name)
        layer = set_up_by_hand(self, custom.Layer(handler, name="partial_handler_typed"))
        with urllib.request.urlopen(layer["http_url"] + "page.txt", timeout=5) as response:
            self.assertEqual(response.read(), b"served")


class QuietnessTests(unittest.TestCase):
    """Requests are logged to stderr only under ``$SERVERLAYER_VERBOSE``,
    whatever the handler: ours, a plain ``BaseHTTPRequestHandler`` subclass,
    or ``SimpleHTTPRequestHandler`` through ``functools.partial``."""

    def handlers(self):
        directory = tempfile.mkdtemp(prefix="serverlayer-quiet-")
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "logged"), "w") as file:
            file.write("a file")
        return {
            "ours": Greeter,
            "plain": PlainGreeter,
            "partial": functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory),
        }

    def exercise(self, handler):
        layer = custom.Layer(handler, name=f"quiet_{self._testMethodName}")
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            set_up_by_hand(self, layer)
            urllib.request.urlopen(layer["http_url"] + "logged", timeout=5).close()
            layer.check_server_errors()
            layer.tearDown()  # and what stopping prints, if anything
        return stderr.getvalue()

    def test_requests_are_not_logged_by_default(self):
        with mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            os.environ.pop("GOCEPT_HTTP_VERBOSE_LOGGING", None)
            for kind, handler in self.handlers().items():
                with self.subTest(kind):
                    self.assertEqual(self.exercise(handler), "")

    def test_verbose_variable_logs_requests(self):
        with mock.patch.dict(os.environ, {"SERVERLAYER_VERBOSE": "1"}):
            for kind, handler in self.handlers().items():
                with self.subTest(kind):
                    self.assertIn('"GET /logged HTTP/1.1" 200', self.exercise(handler))

    def test_a_handler_logging_its_own_way_keeps_it(self):
        logged = []

        class OwnLog(Greeter):
            def log_message(self, format, *args):
                logged.append(format % args)

        with mock.patch.dict(os.environ):
            os.environ.pop("SERVERLAYER_VERBOSE", None)
            self.assertEqual(self.exercise(OwnLog), "")
        self.assertEqual(len(logged), 1)
        self.assertIn('"GET /logged HTTP/1.1" 200', logged[0])


class LongWaitTests(unittest.TestCase):
    """A wait longer than one poll() takes (a test stalling a stream for
    days) goes in slices: poll() raised OverflowError past 24.8 days."""

    def socket_pair(self) -> tuple[socket.socket, socket.socket]:
        server_side, client_side = socket.socketpair()
        self.addCleanup(client_side.close)
        self.addCleanup(server_side.close)
        return server_side, client_side

    def test_a_wait_longer_than_poll_allows_returns_what_turns_readable(self):
        server_side, client_side = self.socket_pair()
        sender = threading.Timer(0.1, client_side.sendall, [b"x"])
        sender.start()
        self.addCleanup(sender.join)
        started = time.monotonic()
        self.assertEqual(list(custom._ready_to_read((server_side.fileno(),), 1e8)), [server_side.fileno()])
        self.assertLess(time.monotonic() - started, 5)

    def test_a_long_wait_lasts_its_whole_time_in_slices(self):
        server_side, _ = self.socket_pair()
        with mock.patch.object(custom, "LONGEST_WAIT", 0.02):
            started = time.monotonic()
            cpu = time.process_time()
            self.assertFalse(custom._ready_to_read((server_side.fileno(),), 0.15))
            self.assertGreaterEqual(time.monotonic() - started, 0.15)
            self.assertLess(time.process_time() - cpu, 0.1)  # slices, not a spin


class HasBufferedDataTests(unittest.TestCase):
    """Whether a next request is there, asked between requests of a
    keep-alive connection: at once, and without switching the socket to
    non-blocking and back (two more system calls per request, each letting
    other threads take the interpreter lock)."""

    def connection_and_file(self, buffering: int = -1) -> tuple[socket.socket, socket.socket, Any]:
        """The server's side of a connection, the client's, and the file a
        handler reads the server's side through (closed when the test ends)."""
        server_side, client_side = socket.socketpair()
        self.addCleanup(client_side.close)
        self.addCleanup(server_side.close)
        rfile = server_side.makefile("rb", buffering=buffering)
        self.addCleanup(rfile.close)
        return server_side, client_side, rfile

    def test_finds_what_the_file_holds_or_the_socket_has_without_waiting(self):
        server_side, client_side, rfile = self.connection_and_file()
        switches = []
        settimeout = socket.socket.settimeout

        def counted(sock: socket.socket, value: float | None) -> None:
            switches.append(value)
            settimeout(sock, value)

        with mock.patch.object(socket.socket, "settimeout", counted):
            self.assertFalse(custom.has_buffered_data(server_side, rfile))  # nothing yet: no wait
            client_side.sendall(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
            self.assertTrue(custom.has_buffered_data(server_side, rfile))  # in the socket
            self.assertEqual(rfile.readline(), b"GET /1 HTTP/1.1\r\n")
            self.assertEqual(rfile.readline(), b"\r\n")
            self.assertTrue(custom.has_buffered_data(server_side, rfile))  # in the file's buffer only
            self.assertEqual(rfile.read(19), b"GET /2 HTTP/1.1\r\n\r\n")
            self.assertFalse(custom.has_buffered_data(server_side, rfile))
        self.assertEqual(switches, [])
        self.assertIsNone(server_side.gettimeout())  # still blocking, as the handler made it
        self.assertIs(rfile.raw._sock, server_side)

    def test_file_holds_data_looks_only_at_the_file(self):
        # The wait for the next request polls the socket; looking there
        # first would be one more system call per request.
        server_side, client_side, rfile = self.connection_and_file()
        client_side.sendall(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
        self.assertFalse(custom.file_holds_data(server_side, rfile))  # only in the socket
        self.assertEqual(rfile.readline(), b"GET /1 HTTP/1.1\r\n")
        self.assertEqual(rfile.readline(), b"\r\n")
        self.assertTrue(custom.file_holds_data(server_side, rfile))  # read along with /1
        self.assertEqual(rfile.read(19), b"GET /2 HTTP/1.1\r\n\r\n")
        self.assertFalse(custom.file_holds_data(server_side, rfile))
        self.assertIs(rfile.raw._sock, server_side)
        client_side.sendall(b"more")
        self.assertEqual(rfile.read(4), b"more")  # the file reads the socket as before

    def test_an_unbuffered_file_holds_nothing_and_the_socket_is_peeked_at(self):
        # A handler's rbufsize = 0 makes its rfile the SocketIO itself, which has no peek.
        server_side, client_side, rfile = self.connection_and_file(buffering=0)
        self.assertFalse(custom.file_holds_data(server_side, rfile))
        self.assertFalse(custom.has_buffered_data(server_side, rfile))
        client_side.sendall(b"GET")
        self.assertFalse(custom.file_holds_data(server_side, rfile))  # the wait for the request sees it
        self.assertTrue(custom.has_buffered_data(server_side, rfile))
        self.assertEqual(rfile.read(3), b"GET")
