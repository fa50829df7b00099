"""Serving that real clients can rely on (the thread-pool server behind the
custom, static and content layers, and every HTTP layer over TLS).

- an idle server holds one thread, and the workers a test's load started
  end with the test, with the connections they served still open;
- any number of keep-alive connections are served, from threads and from
  another process, while idle, silent and half-sent ones wait;
- transfers that pause mid-way complete on every HTTP layer, over TLS too;
- ``tearDown`` stays fast and complete with all of these connected.

``PAUSE`` seconds is longer than any timeout the servers used to have;
``LongPauseTests`` (zope.testrunner level 3) pauses 30 s.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import unittest
from collections.abc import Callable
from typing import Any
from unittest import mock

from serverlayer import content, custom, static, wsgi
from serverlayer.tests.helpers import open_descriptors, run_example_modules, set_up_by_hand, thread_names
from serverlayer.tests.test_hardening import (
    CLIENT_TIMEOUT,
    TEAR_DOWN_BOUND,
    EchoHandler,
    Leaks,
    connect,
    read_response,
    read_until_closed,
    run_threads,
)

#: Seconds a client pauses mid-transfer: past the 1 s the thread-pool
#: server used to allow.
PAUSE = 2.5
#: The size of the file downloads fetch.
FILE_SIZE = 4 * 1024 * 1024
FILE_BODY = bytes(range(256)) * (FILE_SIZE // 256)


def file_app(environ, start_response):
    """The wsgi layer's counterpart of the static file and POST echo."""
    if environ["REQUEST_METHOD"] == "POST":
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    else:
        body = FILE_BODY
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


class EchoAndFile(EchoHandler):
    """EchoHandler, with ``/file`` answering FILE_BODY."""

    def do_GET(self):
        if self.path != "/file":
            return super().do_GET()
        self.send_response(200)
        self.send_header("Content-Length", str(FILE_SIZE))
        self.end_headers()
        self.wfile.write(FILE_BODY)


class StaticAndEcho(static.StaticFileHandler):
    """Serves ``/file`` from the directory and echoes everything else, as EchoHandler."""

    do_POST = EchoHandler.do_POST

    def do_GET(self):
        if self.path == "/file":
            return super().do_GET()
        return EchoHandler.do_GET(self)


class FileLayer(static.Layer):
    """A static layer whose directory holds ``file``, echoing POSTs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.request_handler = StaticAndEcho

    def testSetUp(self):
        super().testSetUp()  # which empties the directory
        with open(os.path.join(self["documentroot"], "file"), "wb") as file:
            file.write(FILE_BODY)


class EchoContent(content.Layer):
    """A content layer that echoes POST bodies and answers GETs with FILE_BODY."""

    def testSetUp(self):
        super().testSetUp()  # which resets the content
        self.content.handler = lambda request: content.Response(
            200, request.body if request.method == "POST" else FILE_BODY
        )


def every_http_layer(name: str, *, tls: bool = False) -> list:
    return [
        custom.Layer(EchoAndFile, name=f"{name}_custom", tls=tls),
        FileLayer(name=f"{name}_static", tls=tls),
        EchoContent(name=f"{name}_content", tls=tls),
        wsgi.Layer(file_app, name=f"{name}_wsgi", tls=tls),
    ]


def server_threads(layer) -> list[str]:
    prefix = f"serverlayer {layer.__module__}.{layer.__name__}"
    return sorted(thread.name for thread in threading.enumerate() if thread.name.startswith(prefix))


def upload_with_a_pause(layer, pause: float) -> bytes:
    """POST half a body, say nothing for ``pause`` seconds, send the rest; the answer's body."""
    body = b"u" * 300_000
    with connect(layer) as sock:
        sock.settimeout(pause + CLIENT_TIMEOUT)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body[:100_000])
        time.sleep(pause)
        sock.sendall(body[100_000:])
        with sock.makefile("rb") as replies:
            status, _, answer = read_response(replies)
    assert status == 200, status
    return answer


def request_head_with_a_pause(layer, pause: float) -> int:
    """Half a request head, a pause, the rest; the status."""
    with connect(layer) as sock:
        sock.settimeout(pause + CLIENT_TIMEOUT)
        sock.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\n")
        time.sleep(pause)
        sock.sendall(b"X-After: the pause\r\n\r\n")
        with sock.makefile("rb") as replies:
            status, _, body = read_response(replies)
    assert body == FILE_BODY, len(body)
    return status


def download_with_a_pause(layer, pause: float) -> int:
    """GET the file over a small receive window, stop reading for ``pause``
    seconds a megabyte in, then read the rest; the bytes received."""
    with connect(layer, rcvbuf=65536) as sock:
        sock.settimeout(pause + CLIENT_TIMEOUT)
        sock.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = bytearray()
        while len(received) < 1024 * 1024:
            piece = sock.recv(65536)
            assert piece, f"the connection ended after {len(received)} bytes"
            received += piece
        time.sleep(pause)
        received += read_until_closed(sock)
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert body == FILE_BODY, (head, len(body))
    return len(body)


def download_at(layer, bytes_per_second: int) -> int:
    """GET the file reading at most ``bytes_per_second``; the bytes received."""
    with connect(layer, rcvbuf=65536) as sock:
        sock.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = bytearray()
        started = time.monotonic()
        while chunk := sock.recv(16384):
            received += chunk
            ahead = len(received) / bytes_per_second - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    body = bytes(received).partition(b"\r\n\r\n")[2]
    assert body == FILE_BODY, len(body)
    return len(body)


class ThreadTests(unittest.TestCase):
    """The threads a thread-pool server holds."""

    def serve(self, layer):
        return set_up_by_hand(self, layer)

    def test_an_idle_server_holds_one_thread(self):
        for layer in every_http_layer("idle")[:3]:
            with self.subTest(layer=layer):
                self.serve(layer)
                self.assertEqual(server_threads(layer), [f"serverlayer {layer.__module__}.{layer.__name__}"])

    def test_an_idle_server_keeps_little_memory(self):
        # The budget is 50 idle servers within 1.5 times the RSS of
        # the one-thread peers (bench_peers.py --only memory); the Python
        # objects a server keeps are its deterministic part. Measured per
        # server: 16 KiB on Python 3.11 to 3.13, 17.4 on 3.10; 21 to 23
        # before idle servers stopped keeping Conditions and Events that
        # only a wait needs. Measured in a fresh interpreter: on 3.10, tests
        # that keep state of their own on a server (httpd.requests = [])
        # stop its class's instances sharing their attribute names, and
        # each server after them took 2 to 3 KiB more.
        script = textwrap.dedent("""
            import gc, tracemalloc
            from serverlayer.tests.test_serving import EchoContent, FileLayer
            for make in (FileLayer, EchoContent):
                warm = make(name="warm_" + make.__name__)
                warm.setUp()
                warm.tearDown()
                gc.collect()
                tracemalloc.start()
                before = tracemalloc.get_traced_memory()[0]
                layers = [make(name=f"memory_{make.__name__}_{number}") for number in range(10)]
                for layer in layers:
                    layer.setUp()
                gc.collect()
                per_server = (tracemalloc.get_traced_memory()[0] - before) / 10
                tracemalloc.stop()
                for layer in layers:
                    layer.tearDown()
                print(make.__name__, per_server / 1024)
        """)
        # This process's path: under buildout's bin/test the interpreter alone finds no serverlayer.
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        measured = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True,
                                  timeout=60, check=True, env=environment)
        self.assertEqual(measured.stderr, "")
        for line in measured.stdout.splitlines():
            name, kib = line.split()
            with self.subTest(layer=name):
                self.assertLess(float(kib), 19.0)
        self.assertEqual(len(measured.stdout.splitlines()), 2, measured.stdout)

    def test_threads_workers_stay_between_tests(self):
        layer = self.serve(custom.Layer(EchoHandler, name="steady", threads=3))
        self.assertEqual(len(server_threads(layer)), 4)
        layer.testTearDown()
        self.assertEqual(len(server_threads(layer)), 4)

    def test_workers_a_burst_started_end_with_the_test_and_the_connections_stay(self):
        arrived = threading.Barrier(17, timeout=CLIENT_TIMEOUT)

        class Meeting(EchoHandler):
            def do_GET(self):
                if self.path.startswith("/meet"):
                    arrived.wait()  # 16 requests in handlers at once: 16 workers
                super().do_GET()

        layer = self.serve(custom.Layer(Meeting, name="burst"))
        layer.quiet_timeout = 30.0  # how long the test's end may wait for the workers to let go
        connections = [http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=CLIENT_TIMEOUT)
                       for _ in range(16)]
        for connection in connections:
            self.addCleanup(connection.close)

        def meet(connection, number):
            connection.request("GET", f"/meet-{number}")
            assert connection.getresponse().read().startswith(f"/meet-{number} for port".encode())

        clients = [threading.Thread(target=meet, args=(connection, number))
                   for number, connection in enumerate(connections)]
        for client in clients:
            client.start()
        arrived.wait()
        for client in clients:
            client.join(CLIENT_TIMEOUT)
        self.assertGreaterEqual(len(server_threads(layer)), 17)  # the loop and 16 workers
        ending = time.monotonic()
        layer.testTearDown()  # what the test runner calls when a test ends
        # Each waiting worker, recalled, says so as it lets go: the end does
        # not sit out its timeout.
        self.assertLess(time.monotonic() - ending, 10.0)
        self.assertEqual(len(server_threads(layer)), 1, server_threads(layer))
        for number, connection in enumerate(connections):  # the same connections, served anew
            port = connection.sock.getsockname()[1]
            connection.request("GET", f"/again-{number}")
            self.assertEqual(connection.getresponse().read(), f"/again-{number} for port {port}".encode())
        layer.testTearDown()
        self.assertEqual(len(server_threads(layer)), 1, server_threads(layer))

    def test_a_worker_between_its_answer_and_its_next_wait_ends_with_the_test(self):
        """The test can end after a worker answered and before it waits for
        the connection's next request: it must park the connection and end
        instead of waiting (a zope.testrunner run found it left behind)."""
        answered, go_on = threading.Event(), threading.Event()

        class HeldBeforeWaiting(custom.HandlerServer):
            def await_request(self, connection, deadline=None):
                answered.set()
                go_on.wait(CLIENT_TIMEOUT)
                return super().await_request(connection, deadline)

        class Layer(custom.Layer):
            quiet_timeout = 0.1  # the worker is held on purpose; the test waits for it below

            def make_server(self, sockets):
                return HeldBeforeWaiting(
                    sockets, self.request_handler, handler_arguments={}, requests=self.requests,
                    errors=self.server_errors, threads=self.threads, thread_name=f"serverlayer {self.__name__}",
                )

        layer = self.serve(Layer(EchoHandler, name="held_worker"))
        connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=CLIENT_TIMEOUT)
        self.addCleanup(connection.close)
        connection.request("GET", "/first")
        self.assertTrue(connection.getresponse().read().startswith(b"/first"))
        self.assertTrue(answered.wait(CLIENT_TIMEOUT))
        [worker] = [thread for thread in threading.enumerate() if thread.name.endswith("held_worker worker 1")]
        layer.testTearDown()  # the test ends while the worker is held
        go_on.set()
        worker.join(CLIENT_TIMEOUT)
        self.assertFalse(worker.is_alive(), "the worker waits for the next request after its test ended")
        connection.request("GET", "/second")  # the parked connection is served by a new worker
        self.assertTrue(connection.getresponse().read().startswith(b"/second"))

    def test_a_client_closing_a_parked_connection_starts_no_worker(self):
        """Clients close their connections as tests end; the loop closes the
        server's side itself, so no worker starts after the test ended."""
        layer = self.serve(custom.Layer(EchoHandler, name="closed_by_client"))
        connections = []
        for number in range(4):
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=CLIENT_TIMEOUT)
            connection.request("GET", f"/{number}")
            connection.getresponse().read()
            connections.append(connection)
        layer.testTearDown()  # the workers end, the connections wait in the loop
        self.assertEqual(len(server_threads(layer)), 1)
        descriptors = open_descriptors()
        for connection in connections:
            connection.close()
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while open_descriptors() > descriptors - 2 * len(connections) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the server closed its side of each
        self.assertEqual(open_descriptors(), descriptors - 2 * len(connections))
        self.assertEqual(server_threads(layer), [f"serverlayer {layer.__module__}.{layer.__name__}"])

    def test_a_suite_whose_connections_outlive_its_tests_runs_clean(self):
        """Keep-alive connections kept at module level across tests, and a
        burst of parallel requests in one test: no thread left behind, no
        ResourceWarning, under -W error."""
        result = run_example_modules({"test_keep_alive.py": textwrap.dedent('''
            import http.client
            import threading
            import unittest

            import requests

            from serverlayer import content

            SERVICE = content.Layer(name="SERVICE")
            KEPT = []  # connections that outlive the tests
            SESSION = requests.Session()  # its pool keeps connections across tests too


            def get(connection, path):
                connection.request("GET", path)
                return connection.getresponse().read()


            class Tests(unittest.TestCase):
                layer = SERVICE

                def setUp(self):
                    self.layer["http_content"].serve_content("ok")

                def test_0_session(self):
                    self.assertEqual(SESSION.get(self.layer["http_url"]).text, "ok")

                def test_1_opens_connections(self):
                    self.assertEqual(SESSION.get(self.layer["http_url"]).text, "ok")
                    for _ in range(8):
                        KEPT.append(http.client.HTTPConnection(self.layer["http_host"], self.layer["http_port"]))
                    self.assertEqual([get(connection, "/") for connection in KEPT], [b"ok"] * 8)

                def test_2_uses_them_in_parallel(self):
                    answers = []
                    threads = [threading.Thread(target=lambda c=c: answers.append(get(c, "/")))
                               for c in KEPT]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join(10)
                    self.assertEqual(answers, [b"ok"] * 8)

                def test_3_uses_them_again(self):
                    self.assertEqual(SESSION.get(self.layer["http_url"]).text, "ok")
                    self.assertEqual([get(connection, "/") for connection in KEPT], [b"ok"] * 8)
                    for connection in KEPT:
                        connection.close()
                    SESSION.close()
            ''')})
        output = result.stdout + result.stderr
        self.assertIn("Ran 4 tests with 0 failures, 0 errors", output)
        self.assertNotIn("left new threads behind", output)
        self.assertNotIn("Warning", output)
        self.assertEqual(result.returncode, 0, output)


#: A client process: ``clients`` threads, each on its own keep-alive
#: connection, each making ``requests`` GETs; prints what each received.
CLIENT_PROCESS = """
import http.client, json, sys, threading
host, port, clients, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
answered = [0] * clients
errors = []
start = threading.Barrier(clients, timeout=30)
def client(number):
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.connect()
        start.wait()
        for request in range(requests):
            path = f"/p{number}-{request}"
            connection.request("GET", path)
            if connection.getresponse().read().startswith(path.encode()):
                answered[number] += 1
    except Exception as error:
        errors.append(repr(error))
    finally:
        connection.close()
threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(60)
print(json.dumps({"answered": answered, "errors": errors}))
"""


class StalledHeadTearDownTests(unittest.TestCase):
    """``tearDown`` right after a client sent half a request head: the
    worker reading the rest waits without a timeout, so only the server
    closing the connection frees it."""

    def test_tear_down_with_a_client_stalled_mid_header(self):
        for layer in every_http_layer("stalled_head"):
            with self.subTest(layer=layer):
                leaks = Leaks(self)
                layer.setUp()
                try:
                    with connect(layer) as sock:
                        sock.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\nX-Half: of a he")
                        if not isinstance(layer, wsgi.Layer):  # waitress reads heads in its loop
                            # The layer's first connection goes from the loop to a worker.
                            def reading(layer=layer):
                                return [name for name in server_threads(layer) if " worker " in name]
                            deadline = time.monotonic() + CLIENT_TIMEOUT
                            while not reading() and time.monotonic() < deadline:
                                time.sleep(0.001)  # until a worker reads the head
                            self.assertEqual(len(reading()), 1, server_threads(layer))
                        started = time.monotonic()
                        layer.tearDown()
                        took = time.monotonic() - started
                        self.assertEqual(server_threads(layer), [])
                        read_until_closed(sock)  # closed: no TimeoutError
                finally:
                    layer.tearDown()
                # A few ms on an idle machine; without the connection's
                # shutdown, the worker would hold tearDown for stop_timeout.
                self.assertLess(took, 0.5)
                leaks.check()


class LateHandOn:
    """Patches of ``HandlerServer`` under which its loop hands a worker
    what came only once the end of the test has retired the workers: the
    race of a request that came as the test ended, made certain."""

    def __init__(self, retired_again: Callable[[], None] = lambda: None) -> None:
        self.test_ending, self.retired, self.dispatched = threading.Event(), threading.Event(), threading.Event()
        #: Called when the end of the test retires workers a second time.
        self.retired_again = retired_again

    def clear(self) -> None:
        for event in (self.test_ending, self.retired, self.dispatched):
            event.clear()

    def patched(self, **more: Any) -> Any:
        dispatch, recall, test_ended = (
            custom.HandlerServer._dispatch, custom.HandlerServer._recall, custom.HandlerServer.test_ended
        )

        def late_dispatch(server, item):
            if threading.current_thread() is not server.serving_thread:
                dispatch(server, item)
                return
            self.retired.wait(CLIENT_TIMEOUT)
            dispatch(server, item)
            self.dispatched.set()

        def recall_and_note(server, deadline):
            recall(server, deadline)
            if not self.test_ending.is_set():  # end_waits', not the end of the test retiring workers
                return
            if self.retired.is_set():
                self.retired_again()
            self.retired.set()

        def ending(server, timeout):
            self.test_ending.set()
            test_ended(server, timeout)

        return mock.patch.multiple(
            custom.HandlerServer, _dispatch=late_dispatch, _recall=recall_and_note, test_ended=ending, **more
        )


class HalfSentRequestTests(unittest.TestCase):
    """The end of a test while a client has sent part of a request and
    stopped (its test failed midway, say): the worker that would wait for
    the rest without a timeout ends the connection instead, rather than
    hold up the end of the test or be left behind."""

    HALVES = {
        "half a request line": b"GET /file HT",
        "a head without its blank line": b"GET /file HTTP/1.1\r\nHost: x\r\n",
        "part of a body": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly 19 of 100 byt",
        "part of a chunked body": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        "no body after 100 Continue": (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        ),
    }

    def test_the_end_of_the_test_ends_a_request_left_half_sent(self):
        for tls in (False, True):
            for layer in every_http_layer(f"half_sent_{'tls' if tls else 'plain'}", tls=tls):
                layer.quiet_timeout = 0.1
                set_up_by_hand(self, layer)
                for what, data in self.HALVES.items():
                    with self.subTest(layer=layer, what=what):
                        self.end_the_test_with(layer, data)

    def test_a_request_left_half_sent_is_cut_without_the_wait_for_quiet(self):
        # The worker waiting for the rest finds the test over: the end of
        # the test waits neither quiet_timeout (1 s) nor for its join.
        # Not the wsgi layer, whose loop reads requests (waitress's).
        for tls in (False, True):
            for layer in every_http_layer(f"half_sent_at_once_{'tls' if tls else 'plain'}", tls=tls)[:3]:
                self.assertEqual(layer.quiet_timeout, 1.0)
                set_up_by_hand(self, layer)
                for what, data in self.HALVES.items():
                    with self.subTest(layer=layer, what=what):
                        self.assertLess(self.end_the_test_with(layer, data), 0.5)

    def test_a_body_the_client_closes_before_its_end_is_no_request(self):
        for layer in every_http_layer("short_body")[:3]:
            with self.subTest(layer=layer):
                set_up_by_hand(self, layer)
                with connect(layer) as sock:
                    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly 18 of 100 by")
                    sock.shutdown(socket.SHUT_WR)  # as nc -N does: the client sent all it will
                    answer = read_until_closed(sock)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
                self.assertIn(b"after 17 of the 100 bytes that Content-Length announced", answer)
                self.assertEqual(list(layer["http_requests"]), [])

    def test_a_request_the_loop_had_not_handed_on_as_the_test_ended_leaves_no_worker_behind(self):
        # Its bytes had come, but the loop had not yet handed them to a
        # worker (it waited for the interpreter lock, say) when the end of
        # the test retired the workers: the worker started for them then
        # outlived the test. Here the loop hands them on only after that.
        late = LateHandOn()
        for layer in every_http_layer("not_handed_on")[:3]:
            with self.subTest(layer=layer):
                set_up_by_hand(self, layer)
                late.clear()
                before = thread_names()
                with late.patched(), connect(layer) as sock:
                    sock.sendall(self.HALVES["a head without its blank line"])
                    layer.check_after_test()
                    layer.testTearDown()
                    self.assertTrue(late.dispatched.wait(CLIENT_TIMEOUT))  # by the end of the test, or after it
                    self.assertEqual(sorted(set(thread_names()) - set(before)), [])
                    self.assertEqual(list(layer["http_requests"]), [])  # half a request is none
                    layer.testSetUp()  # for the cleanup's testTearDown

    def test_a_whole_request_the_loop_hands_on_as_the_test_ends_is_served_not_cut(self):
        # As above, but all of the request came: the worker reads it while
        # the end of the test retires it, without the wait for quiet that
        # makes a request found unread a half one (_cut_reads).
        reading, proceed = threading.Event(), threading.Event()
        late = LateHandOn(retired_again=proceed.set)

        class SlowToRead(EchoHandler):
            def parse_request(self):
                reading.set()  # every byte of the request has arrived: its head is read
                proceed.wait(CLIENT_TIMEOUT)
                return super().parse_request()

        cut_reads, caught_up = custom.HandlerServer._cut_reads, custom.HandlerServer._loop_caught_up

        def cut_reads_then_proceed(server):
            cut_reads(server)
            if reading.is_set():
                proceed.set()

        def caught_up_once_read(server, deadline):
            caught_up(server, deadline)
            self.assertTrue(reading.wait(CLIENT_TIMEOUT))

        layer = set_up_by_hand(self, custom.Layer(SlowToRead, name="whole_not_handed_on"))
        patches = late.patched(_cut_reads=cut_reads_then_proceed, _loop_caught_up=caught_up_once_read)
        with patches, connect(layer) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            layer.check_after_test()
            layer.testTearDown()
            # Served by the end of the test, by a worker that ended with it.
            self.assertEqual([request.path for request in layer["http_requests"]], ["/echo"])
            self.assertEqual(layer.own_server()._workers, [])
            layer.testSetUp()  # for the cleanup's testTearDown
            with sock.makefile("rb") as answer:
                self.assertEqual(read_response(answer)[::2], (200, b"hello"))

    def end_the_test_with(self, layer, data: bytes) -> float:
        before = thread_names()
        with connect(layer) as sock:
            sock.sendall(data)
            if not isinstance(layer, wsgi.Layer):  # waitress reads requests in its loop
                self.wait_until_a_worker_waits_for_the_rest(layer)
            started = time.monotonic()
            layer.check_after_test()  # a test runner's cleanup
            layer.testTearDown()
            took = time.monotonic() - started
            self.assertEqual(sorted(set(thread_names()) - set(before)), [])
            self.assertEqual(layer.server_errors.take(), [])
            self.assertEqual(list(layer["http_requests"]), [])  # half a request is none
            layer.testSetUp()  # for the cleanup's testTearDown
            if not isinstance(layer, wsgi.Layer):  # waitress keeps the connection for the client to finish
                self.assertNotIn(b"HTTP/1.1 200", read_until_closed(sock))  # closed: no TimeoutError
        # The wait for quiet; without the cut, the 1 s join too, in vain.
        self.assertLess(took, layer.quiet_timeout + 0.5)
        return took

    def test_a_request_all_sent_is_served_though_the_test_ends_while_it_is_read(self):
        reading, proceed = threading.Event(), threading.Event()

        class SlowToRead(EchoHandler):
            def parse_request(self):
                reading.set()  # every byte of the request has arrived: its head is read
                proceed.wait(CLIENT_TIMEOUT)
                return super().parse_request()

        layer = set_up_by_hand(self, custom.Layer(SlowToRead, name="slow_to_read"))
        with connect(layer) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            self.assertTrue(reading.wait(CLIENT_TIMEOUT))
            # The test ends while the worker reads what came; it goes on
            # meanwhile, well within the wait for quiet.
            threading.Timer(0.05, proceed.set).start()
            layer.check_after_test()
            layer.testTearDown()
            layer.testSetUp()  # for the cleanup's testTearDown
            with sock.makefile("rb") as answer:
                self.assertEqual(read_response(answer)[::2], (200, b"hello"))

    def wait_until_a_worker_waits_for_the_rest(self, layer) -> None:
        """Until a worker has read what came of the request (a request whose
        bytes are all there when the test ends is served, not cut)."""
        httpd = layer.own_server()
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while time.monotonic() < deadline:
            with httpd._connections_lock:
                conversations = list(httpd._connections.values())
            if any(each.reading_request and not custom._socket_has_data(each.connection) for each in conversations):
                return
            time.sleep(0.001)
        self.fail("no worker read the request")


class PathContent(content.Layer):
    """A content layer answering each request with its path."""

    def testSetUp(self):
        super().testSetUp()  # which resets the content
        self.content.handler = lambda request: content.Response(200, request.path + " for port")


async def path_asgi_app(scope, receive, send):
    """The asgi layer's counterpart of ``file_app`` for many connections: answers its path."""
    if scope["type"] != "http":
        raise RuntimeError("no lifespan here")
    body = scope["path"].encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def path_app(environ, start_response):
    body = environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def close_all(connections: list[socket.socket]) -> None:
    for sock in connections:
        sock.close()


class ConnectionsAtOnceTests(unittest.TestCase):
    """As many connections at once as a test may open: aiohttp and httpx
    keep up to 100 each by default, and a burst of clients can open
    more at once than a listen backlog of 128 holds."""

    CONNECTIONS = 300

    def layers(self):
        from serverlayer import asgi

        yield wsgi.Layer(path_app, name="wsgi_at_once")
        yield asgi.Layer(path_asgi_app, name="asgi_at_once")
        yield PathContent(name="content_at_once")

    def test_every_connection_is_served_while_all_stay_open(self):
        # waitress accepted at most 100 connections (its own sockets
        # included) and left the others waiting until one closed.
        for layer in self.layers():
            with self.subTest(layer=layer):
                set_up_by_hand(self, layer)
                connections: list[socket.socket] = []
                self.addCleanup(close_all, connections)
                for number in range(self.CONNECTIONS):
                    sock = connect(layer)
                    connections.append(sock)
                    sock.sendall(f"GET /at-once-{number} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answered = []
                for number, sock in enumerate(connections):
                    with sock.makefile("rb") as replies:
                        answered.append(read_response(replies)[2].startswith(f"/at-once-{number}".encode()))
                self.assertEqual(answered, [True] * self.CONNECTIONS)

    @unittest.skipUnless(sys.platform.startswith("linux"), "reads the backlog with Linux's ss")
    def test_the_listen_backlog_holds_a_burst_of_connections(self):
        # With 128, connections beyond it that arrived while the server was
        # busy waited a second for the kernel to try again.
        with open("/proc/sys/net/core/somaxconn") as file:
            expected = min(1024, int(file.read()))
        from serverlayer import smtp

        layers = [*self.layers(), wsgi.Layer(path_app, name="https_backlog", tls=True), smtp.Layer(name="smtp_backlog")]
        for layer in layers:
            with self.subTest(layer=layer):
                set_up_by_hand(self, layer)
                port = layer.get("http_port") or layer["smtp_port"]
                listing = subprocess.run(
                    ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=30
                ).stdout
                backlogs = [int(line.split()[2]) for line in listing.splitlines()]  # LISTEN, Recv-Q, Send-Q
                self.assertTrue(backlogs, listing)
                self.assertEqual(set(backlogs), {expected}, listing)


class ManyConnectionsTests(unittest.TestCase):
    """More keep-alive connections than any pool, with idle, silent and
    half-sent ones among them, on the thread-pool server's layers."""

    def hold_up(self, layer, connections: list) -> tuple[list[socket.socket], list[tuple[socket.socket, bytes]]]:
        """64 idle keep-alive connections (one request each), 16 silent ones,
        16 with half a request head and 16 with half a body. The idle ones,
        and the half-sent ones with what completes their requests."""
        idle = []
        for number in range(64):
            sock = connect(layer)
            connections.append(sock)
            sock.sendall(f"GET /idle-{number} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            idle.append(sock)
        for sock in idle:
            with sock.makefile("rb") as replies:
                self.assertEqual(read_response(replies)[0], 200)
        for _ in range(16):
            connections.append(connect(layer))
        half_sent = []
        for data, rest in ((b"GET /half-a-head HTTP/1.1\r\nHost: x\r\n", b"\r\n"),
                           (b"POST /half-a-body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf", b"-body!")):
            for _ in range(16):
                sock = connect(layer)
                connections.append(sock)
                sock.sendall(data)
                half_sent.append((sock, rest))
        return idle, half_sent

    def clients_from_another_process(self, layer, clients: int, requests: int) -> dict:
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        run = subprocess.run(
            [sys.executable, "-c", CLIENT_PROCESS, layer["http_host"], str(layer["http_port"]),
             str(clients), str(requests)],
            capture_output=True, text=True, timeout=90, env=environment,
        )
        self.assertEqual(run.returncode, 0, run.stderr)
        return json.loads(run.stdout)

    def check(self, layer):
        leaks = Leaks(self)
        layer.setUp()
        connections: list[socket.socket] = []
        try:
            layer.testSetUp()
            idle, half_sent = self.hold_up(layer, connections)
            result = self.clients_from_another_process(layer, clients=64, requests=10)
            self.assertEqual(result, {"answered": [10] * 64, "errors": []})
            answers = []

            def in_thread(number):
                with connect(layer) as sock, sock.makefile("rb") as replies:
                    for request in range(5):
                        sock.sendall(f"GET /t{number}-{request} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                        answers.append(read_response(replies)[2].startswith(f"/t{number}-{request}".encode()))

            run_threads(self, [functools.partial(in_thread, number) for number in range(64)], bound=30)
            self.assertEqual(answers, [True] * 320)
            for number, sock in enumerate(idle):  # the idle ones were kept, and are served
                sock.sendall(f"GET /later-{number} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                with sock.makefile("rb") as replies:
                    self.assertTrue(read_response(replies)[2].startswith(f"/later-{number} for port".encode()))
            for sock, rest in half_sent:  # the half-sent requests, completed, are answered
                sock.sendall(rest)
                with sock.makefile("rb") as replies:
                    self.assertEqual(read_response(replies)[0], 200)
            layer.check_server_errors()
            layer.testTearDown()
            self.assertEqual(len(server_threads(layer)), 1, server_threads(layer))
            started = time.monotonic()
            layer.tearDown()
            took = time.monotonic() - started
            self.assertLess(took, TEAR_DOWN_BOUND, f"tearDown took {took:.3f}s with 160 clients connected")
        finally:
            layer.tearDown()
            for sock in connections:
                sock.close()
        leaks.check()

    def test_custom(self):
        self.check(custom.Layer(EchoAndFile, name="many_custom"))

    def test_static(self):
        self.check(FileLayer(name="many_static"))

    def test_content(self):
        self.check(PathContent(name="many_content"))


class PauseTests(unittest.TestCase):
    """Uploads, request heads and downloads that pause mid-way, and a slow
    reader, complete on every HTTP layer, with and without TLS. All of them
    run at once, so the test takes about one pause."""

    pause = PAUSE
    #: Bytes per second of the slow reader: the file takes about 2 s.
    reading_rate = 2 * 1024 * 1024

    def test_transfers_that_pause_complete(self):
        layers = every_http_layer("pausing") + every_http_layer("pausing_tls", tls=True)
        for layer in layers:
            set_up_by_hand(self, layer)
        outcomes: dict[tuple[str, str], object] = {}

        def attempt(layer, what, function):
            try:
                outcomes[layer.__name__, what] = function(layer)
            except Exception as error:
                outcomes[layer.__name__, what] = repr(error)

        work = []
        def upload(served):
            return len(upload_with_a_pause(served, self.pause))

        for layer in layers:
            work += [
                functools.partial(attempt, layer, "upload", upload),
                functools.partial(attempt, layer, "head", lambda served: request_head_with_a_pause(served, self.pause)),
                functools.partial(attempt, layer, "download", lambda served: download_with_a_pause(served, self.pause)),
                functools.partial(attempt, layer, "slow reader", lambda served: download_at(served, self.reading_rate)),
            ]
        started = time.monotonic()
        run_threads(self, work, bound=self.pause + 60)
        expected = {"upload": 300_000, "head": 200, "download": FILE_SIZE, "slow reader": FILE_SIZE}
        self.assertEqual(outcomes, {(layer.__name__, what): value
                                    for layer in layers for what, value in expected.items()})
        self.assertLess(time.monotonic() - started, self.pause + 30)
        for layer in layers:
            layer.check_server_errors()


class LongPauseTests(PauseTests):
    """The same with 30 s pauses and a reader at 1 MB/s."""

    level = 3
    pause = 30.0
    reading_rate = 1024 * 1024
