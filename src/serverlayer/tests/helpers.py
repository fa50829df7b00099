"""What several test modules need: counting threads and file descriptors,
raw HTTP over a socket, and running zope.testrunner on a sample suite."""

from __future__ import annotations

import contextlib
import gc
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import unittest
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast
from unittest import mock

import plone.testing

AnyLayer = TypeVar("AnyLayer", bound=plone.testing.Layer)

SAMPLES = Path(__file__).parent / "samples"

#: The environment variables that move a layer's host or published host.
HOST_VARIABLES = (
    "SERVERLAYER_HTTP_HOST", "GOCEPT_HTTP_APP_HOST", "SERVERLAYER_HTTP_PUBLIC_HOST",
    "SERVERLAYER_SMTP_HOST", "SERVERLAYER_SMTP_PUBLIC_HOST",
)


def reserved_port(test: unittest.TestCase, address: str = "127.0.0.1") -> int:
    """A port free at ``address`` that nobody else gets until ``test`` is
    over, for a layer given it as a fixed port. A socket bound there and
    not listening holds it (a probe closed again left a moment in which a
    client's connect or another process's port 0 could take it); bound with
    SO_REUSEADDR, as the layer's own socket is, it lets the layer listen."""
    holder = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    test.addCleanup(holder.close)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind((address, 0))
    return cast(int, holder.getsockname()[1])


def without_host_variables(test: unittest.TestCase) -> None:
    """Unset ``HOST_VARIABLES`` for the rest of ``test``: the machine's own
    settings must not move the layers a test sets up."""
    patcher = mock.patch.dict(os.environ)
    patcher.start()
    test.addCleanup(patcher.stop)
    for name in HOST_VARIABLES:
        os.environ.pop(name, None)


def set_up_by_hand(test: unittest.TestCase, layer: AnyLayer) -> AnyLayer:
    """Run ``layer`` for the rest of ``test`` as zope.testrunner would:
    ``setUp`` and ``testSetUp`` now; ``testTearDown`` and ``tearDown`` when
    the test ends.

    A layer set up without ``testSetUp`` drops what its server raised;
    here such an error fails ``test``, as it would fail a test of the
    layer. Set up the bases first, as the runner does.
    """
    layer.setUp()
    test.addCleanup(layer.tearDown)
    layer.testSetUp()  # also makes the test check the server's errors at its end
    test.addCleanup(layer.testTearDown)
    return layer


#: The socket timeout doctests run with: their examples call clients the
#: way a reader would, without a timeout, and an answer that never came
#: would hang the run instead of failing the example.
DOCTEST_SOCKET_TIMEOUT = 30.0


class ResourceProvider(plone.testing.Layer):
    """A base layer that publishes one resource from setUp to tearDown,
    as a layer of the user's own publishes ``wsgi_app`` or ``asgi_app``."""

    def __init__(self, key: str, value: Any, *, name: str) -> None:
        super().__init__(name=name)
        self.key, self.value = key, value

    def setUp(self) -> None:
        self[self.key] = self.value

    def tearDown(self) -> None:
        del self[self.key]


def bounded_socket_waits(test: Any) -> None:
    """A doctest suite's ``setUp``: every socket made during the doctest
    (clients' and servers' alike) gives up after ``DOCTEST_SOCKET_TIMEOUT``."""
    test.globs["_socket_timeout_before"] = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOCTEST_SOCKET_TIMEOUT)


def unbounded_socket_waits(test: Any) -> None:
    """The matching ``tearDown``: the default timeout as it was."""
    socket.setdefaulttimeout(test.globs.pop("_socket_timeout_before", None))


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_names() -> list[str]:
    return sorted(thread.name for thread in threading.enumerate())


def reader_that_stops(test: unittest.TestCase, layer: Any, path: str) -> socket.socket:
    """A client that asks ``layer`` for ``path``, reads the head and a
    little, then reads no more (a page left open with its media or stream
    half loaded); a small receive buffer fills at once."""
    client = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
    test.addCleanup(client.close)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if getattr(layer, "tls", False):
        client = layer["ssl_context"].wrap_socket(client, server_hostname=layer["http_host"])
        test.addCleanup(client.close)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    client.recv(4096)
    return client


def wait_until_a_write_stalls(test: unittest.TestCase, layer: Any) -> None:
    """Wait until a worker of ``layer`` (custom, static, content) is stuck
    sending to a client that stopped reading: the socket takes no more."""
    from serverlayer import custom

    httpd = layer["httpd"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with httpd._writing_lock:
            if any(not custom._takes_more(connection) for connection in httpd._writing):
                return
        time.sleep(0.01)
    test.fail("the worker never filled the connection")


def assert_the_test_end_cuts_the_write(test: unittest.TestCase, layer: Any, before: list[str]) -> None:
    """End the running test of ``layer`` as a test runner would, with a
    worker stuck writing to a client that stopped reading: the write is cut
    at once (not the wait for quiet in vain), no thread is left, no error."""
    started = time.monotonic()
    layer.check_after_test()  # a test runner's cleanup: it cuts the write, then waits for quiet
    layer.testTearDown()
    test.assertLess(time.monotonic() - started, 0.5)  # not the 1 s wait for quiet, nor a thread left
    test.assertEqual(sorted(set(thread_names()) - set(before)), [])
    test.assertEqual(layer.server_errors.take(), [])  # a cut write is no error
    layer.testSetUp()  # for the cleanup's testTearDown


def raw_request(host: str, port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` as it is and read until the server closes."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def run_example_modules(
    files: dict[str, str], *python_options: str
) -> subprocess.CompletedProcess[str]:
    """Write ``files`` into a fresh ``tests`` package and run zope.testrunner on
    it in a new process, as a user would run a project of theirs."""
    import tempfile
    from pathlib import Path

    environment = {key: value for key, value in os.environ.items() if key != "SERVERLAYER_VERBOSE"}
    environment["PYTHONPATH"] = os.pathsep.join(sys.path)
    with tempfile.TemporaryDirectory() as directory:
        package = Path(directory, "examples_under_test", "tests")
        package.mkdir(parents=True)
        (package.parent / "__init__.py").write_text("")
        (package / "__init__.py").write_text("")
        for name, text in files.items():
            (package / name).write_text(text)
        return subprocess.run(
            [sys.executable, "-W", "error", *python_options, "-m", "zope.testrunner", "--path", directory],
            capture_output=True, text=True, timeout=120, env=environment,
        )


def assert_example_modules_pass(test: unittest.TestCase, modules: dict[str, str]) -> None:
    """Every test of the example ``modules`` passes under zope.testrunner,
    quietly and without leaving a thread behind."""
    expected_tests = sum(code.count("\n    def test_") for code in modules.values())
    completed = run_example_modules(modules)
    output = completed.stdout + completed.stderr
    test.assertEqual(completed.returncode, 0, output)
    test.assertIn(f"Total: {expected_tests} tests, 0 failures, 0 errors", output)
    test.assertEqual(completed.stderr, "")
    test.assertNotIn("left new threads behind", output)


def has_doctests(path: Path) -> bool:
    """Whether the text file at ``path`` has ``>>>`` examples: a doctest
    suite of a file without any counts as a skipped test on Python 3.13."""
    import doctest

    return bool(doctest.DocTestParser().get_examples(path.read_text(encoding="utf-8")))


def run_testrunner(sample: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run zope.testrunner in a fresh process on ``samples/<sample>``."""
    # The child must import what this process imports, however it was set up
    # (a virtualenv, tox, buildout's egg paths).
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    environment.pop("SERVERLAYER_VERBOSE", None)
    return subprocess.run(
        [
            sys.executable, "-W", "error", "-m", "zope.testrunner",
            "--path", str(SAMPLES / sample), "--tests-pattern", "^sample_",
            *args,
        ],
        capture_output=True, text=True, timeout=120, env=environment,
    )


def stop_asked_again_as_the_serving_ends(test: unittest.TestCase, layer: Any) -> None:
    """Tear ``layer`` down with a second stop request that reaches its
    asyncio loop after the first one ended the serving (two threads asking
    at once, say), and fail ``test`` unless the loop and every socket are
    still closed, and nothing is left for the garbage collector."""
    server = layer._running.server

    def ask_again_next_round() -> None:
        server.request_stop()

    def ask_twice() -> None:
        server.request_stop()  # runs in the next round, and ends the serving
        server.loop.call_soon(ask_again_next_round)  # in that round: queues a stop for the round after

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        server.loop.call_soon_threadsafe(ask_twice)
        layer.tearDown()
        gc.collect()
    test.assertEqual([str(warning.message) for warning in caught], [])
    test.assertTrue(server.loop.is_closed())


def stop_in_the_round_that_accepts(test: unittest.TestCase, layer: Any, address: tuple[str, int]) -> None:
    """Tear ``layer`` down so that its asyncio loop stops in the round in
    which it accepts three clients, and fail ``test`` unless each client is
    cut off at once and nothing is left for the garbage collector.

    asyncio hands an accepted connection to a task (and a protocol's
    ``connection_made`` to a callback) that runs in a later round: one the
    stopping loop has no more of. The loop is held while the clients
    connect, so the system completes their connections in the meantime.
    """
    server = layer._running.server
    paused, resume = threading.Event(), threading.Event()
    clients: list[socket.socket] = []

    def pause() -> None:
        paused.set()
        resume.wait(5)

    try:
        server.loop.call_soon_threadsafe(pause)
        test.assertTrue(paused.wait(5))
        for _ in range(3):
            clients.append(socket.create_connection(address, timeout=5))
        server.request_stop()
    finally:
        resume.set()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            layer.tearDown()
            gc.collect()  # what was left for the collector warns now
    test.assertEqual([str(warning.message) for warning in caught], [])
    for client in clients:
        with client:
            try:
                test.assertEqual(client.recv(1), b"")
            except ConnectionResetError:
                pass  # not accepted by a server that was stopping: reset as its socket closed


def failures_in_threads(target: Any, count: int, timeout: float = 60) -> list[BaseException]:
    """Run ``target(number)`` for ``number`` in ``range(count)``, each on a
    thread of its own, at once; what they raised, to be reported in the
    test's thread."""
    failures: list[BaseException] = []

    def run(number: int) -> None:
        try:
            target(number)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return failures


def until(condition: Any, seconds: float = 10) -> Any:
    """``condition()`` once true, or its last (false) value after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return result


def client_connections(server: Any) -> int:
    """How many client connections a custom, static, content or wsgi layer's server has open."""
    if hasattr(server, "_connections"):
        return len(server._connections)
    # The wsgi acceptor's pending connection is not in the loop's map.
    pending = getattr(server, "pending", None) is not None
    return sum(1 for each in list(server._map.values()) if hasattr(each, "requests")) + pending


def read_to_end(sock: socket.socket) -> bytes:
    received = b""
    while data := sock.recv(65536):
        received += data
    return received


def get_closing(layer: Any, path: str) -> str:
    """GET ``path`` from an HTTP layer on a connection of its own, closed after the answer."""
    connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        return connection.getresponse().read().decode()
    finally:
        connection.close()


class AcceptorChecks:
    """Checks of a layer's acceptor, mixed into a ``TestCase`` whose
    ``serve()`` sets up a layer answering with the name of the thread that
    serves the request, and on ``/self`` with what its own server answered
    to ``/inner`` too (``name | inner name``). A connection that comes
    while the acceptor is busy goes to the loop, so one may also come just
    as it finishes: the checks try a few."""

    ATTEMPTS = 20

    def serve(self) -> Any:
        raise NotImplementedError

    #: The server's method that its loop calls once a turn (for ``loop_turn``).
    LOOP_TURN_METHOD = ""

    def wake_loop(self, server: Any) -> None:
        raise NotImplementedError

    def loop_turn(self, server: Any) -> None:
        """Have the server's loop take a whole turn, and wait for it."""
        test = cast(unittest.TestCase, self)
        turns: list[None] = []
        method = getattr(type(server), self.LOOP_TURN_METHOD)

        def counted_turn(this: Any, *args: Any) -> Any:
            if this is server:
                turns.append(None)
            return method(this, *args)

        # On the class: the custom layer's server refuses a method of its own set on it.
        with mock.patch.object(type(server), self.LOOP_TURN_METHOD, counted_turn):
            for _ in range(2):  # the second begins once the first is whole
                seen = len(turns)
                self.wake_loop(server)
                test.assertTrue(until(lambda seen=seen: len(turns) > seen))

    @contextlib.contextmanager
    def acceptor_held_up(self, server: Any) -> Iterator[threading.Event]:
        """The acceptor held up before it waits again (neither waiting nor
        answering a request) until the event yielded is set: as with a
        client in the server's process, which the acceptor waits for the
        interpreter lock to let it run."""
        test = cast(unittest.TestCase, self)

        def acceptor() -> Any:
            return getattr(server, "acceptor", None) or getattr(server, "_acceptor", None)

        test.assertTrue(until(lambda: acceptor() is not None))
        held_up, go_on = threading.Event(), threading.Event()
        test.addCleanup(go_on.set)
        idle_left = type(server).pending_idle_left

        def held_up_first(this: Any) -> float | None:
            if this is server:
                held_up.set()
                go_on.wait(10)
            return idle_left(this)  # type: ignore[no-any-return]

        # On the class: the custom layer's server refuses a method of its own set on it.
        with mock.patch.object(type(server), "pending_idle_left", held_up_first):
            (getattr(server, "wake_acceptor", None) or acceptor().wake)()
            test.assertTrue(held_up.wait(10))
            yield go_on

    def test_the_loop_leaves_new_connections_to_the_acceptor_while_it_answers_no_request(self) -> None:
        # The kernel wakes the loop for a connection whenever the acceptor
        # does not wait for one, and the loop took it.
        test = cast(unittest.TestCase, self)
        layer = self.serve()
        server = layer["httpd"]
        test.assertTrue(until(lambda: client_connections(server) == 0))
        with self.acceptor_held_up(server) as go_on:
            connection = http.client.HTTPConnection(layer["http_host"], layer["http_port"], timeout=10)
            test.addCleanup(connection.close)
            connection.request("GET", "/")
            # A whole turn of the loop after the connection came, which
            # would have accepted it where the loop watches for them.
            self.loop_turn(server)
            test.assertEqual(client_connections(server), 0)
            go_on.set()
            test.assertTrue(connection.getresponse().read().decode().endswith(" acceptor"))

    def test_the_acceptor_accepts_once_per_connection(self) -> None:
        # Not again at once after each, which fails (no connection yet): a
        # system call and an exception per request.
        test = cast(unittest.TestCase, self)
        layer = self.serve()
        listening = set(layer["httpd"].sockets)
        failed = []
        accept = socket.socket.accept

        def counted_accept(this: socket.socket) -> Any:
            try:
                return accept(this)
            except BlockingIOError:
                if this in listening:
                    failed.append(threading.current_thread().name.rsplit(" ", 1)[-1])
                raise

        with mock.patch.object(socket.socket, "accept", counted_accept):
            served_by = [get_closing(layer, f"/{number}") for number in range(self.ATTEMPTS)]
        test.assertTrue(any(name.endswith(" acceptor") for name in served_by), served_by)
        # The acceptor's own failed accepts: 0 or 1 in 20 seen, 8 to 20
        # when it accepted again at once after each connection. The loop's
        # are a race with the client: a connection that comes as the
        # acceptor finishes an answer, the kernel offers to the loop as
        # well (it accepts while the acceptor answers), and whichever looks
        # second finds nothing; with the client in this process, the loop
        # lost it 8 times in 20 on one machine (the acceptor, holding the
        # interpreter lock as it finishes, rarely does).
        test.assertLessEqual(failed.count("acceptor"), self.ATTEMPTS // 6, failed)

    def test_the_acceptor_answers_a_new_connection_s_request(self) -> None:
        test = cast(unittest.TestCase, self)
        layer = self.serve()
        served_by = [get_closing(layer, f"/{number}") for number in range(self.ATTEMPTS)]
        test.assertTrue(any(name.endswith(" acceptor") for name in served_by), served_by)

    def test_a_request_the_acceptor_runs_is_answered_by_its_own_server(self) -> None:
        # While the acceptor serves, the kernel wakes the loop for a new
        # connection; here the request's own, which would otherwise wait for ever.
        test = cast(unittest.TestCase, self)
        layer = self.serve()
        served_by = []
        for _ in range(self.ATTEMPTS):
            outer, inner = get_closing(layer, "/self").split(" | ")
            served_by.append(outer)
            if outer.endswith(" acceptor"):
                test.assertIn(" worker ", inner)
                return
        test.fail(f"the acceptor answered none of {served_by}")


    def wait_pending(self, layer: Any) -> socket.socket | None:
        """A connection, sending nothing, that the acceptor waits on; None if
        the loop took it every time (the acceptor was busy)."""
        server = layer["httpd"]
        for _ in range(self.ATTEMPTS):
            sock = socket.create_connection((layer["http_host"], layer["http_port"]), timeout=10)
            if until(lambda: server.pending is not None, 2):
                return sock
            sock.close()
            until(lambda: client_connections(server) == 0, 2)
        return None

    def test_a_request_sent_after_its_connection_is_answered_by_the_acceptor(self) -> None:
        # A client in the test's own process connects, then waits for the
        # interpreter lock (which the acceptor may hold) to send its request.
        test = cast(unittest.TestCase, self)
        layer = self.serve()
        sock = self.wait_pending(layer)
        test.assertIsNotNone(sock, "the acceptor waited on none of the connections")
        assert sock is not None
        with sock:
            sock.sendall(b"GET /late HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            answer = read_to_end(sock)
        test.assertTrue(answer.endswith(b" acceptor"), answer)

    def test_a_connection_the_acceptor_waits_on_goes_to_the_loop_when_another_comes(self) -> None:
        test = cast(unittest.TestCase, self)
        layer = self.serve()
        server = layer["httpd"]
        sock = self.wait_pending(layer)
        assert sock is not None
        with sock:
            get_closing(layer, "/next")
            test.assertIsNone(server.pending)
            sock.sendall(b"GET /first HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            answer = read_to_end(sock)
        test.assertIn(b" worker ", answer)  # read by the loop, answered by a worker

    def test_a_connection_the_acceptor_waits_on_closes_at_its_client_s_end_and_at_the_stop(self) -> None:
        test = cast(unittest.TestCase, self)
        layer = self.serve()
        server = layer["httpd"]
        sock = self.wait_pending(layer)
        assert sock is not None
        sock.close()
        test.assertTrue(until(lambda: server.pending is None and client_connections(server) == 0))
        sock = self.wait_pending(layer)
        assert sock is not None
        with sock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            layer.testTearDown()
            layer.tearDown()
            gc.collect()
            try:
                test.assertEqual(sock.recv(1), b"")
            except ConnectionResetError:
                pass
        test.assertEqual([str(warning.message) for warning in caught], [])
        layer.setUp()  # for the test's own tear-down
        layer.testSetUp()


class Watched:
    """A lock that calls ``asking`` with each thread that asks for it,
    before that thread waits for it: a test sees who takes a lock, or that
    a thread waits for one."""

    def __init__(self, lock: Any, asking: Callable[[threading.Thread], object]) -> None:
        self.lock, self.asking = lock, asking

    def __enter__(self) -> Any:
        self.asking(threading.current_thread())
        return self.lock.__enter__()

    def __exit__(self, *exc_info: Any) -> Any:
        return self.lock.__exit__(*exc_info)

    def __getattr__(self, name: str) -> Any:  # acquire, release: for a Condition made on it
        return getattr(self.lock, name)
