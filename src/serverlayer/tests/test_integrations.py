"""Where users run their tests: pytest (zope.pytestlayer, pytest-xdist),
``zope-testrunner -j``, and the ``python -m serverlayer.smtp`` mail sink."""

from __future__ import annotations

import os
import queue
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

from serverlayer.tests.helpers import SAMPLES, run_testrunner

#: A bound on how long the tests wait for the mail sink to answer or print.
#: It starts a Python process: 0.3 s idle, over 5 s on a machine with every
#: core busy.
CLIENT_TIMEOUT = 30.0

CHECKOUT = Path(__file__).resolve().parents[3]
PYTEST_WARNINGS = [
    "-W", "error",
    "-W", "ignore:The hookimpl pytest_pycollect_makeitem uses old-style:pytest.PytestRemovedIn10Warning",
]


def run_pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *PYTEST_WARNINGS, *args],
        capture_output=True, text=True, timeout=180, cwd=cwd, env=environment,
    )


class PytestTests(unittest.TestCase):

    def test_server_errors_fail_the_test_that_caused_them(self):
        completed = run_pytest("-q", "sample_pytest_errors.py", cwd=SAMPLES / "pytest_errors")
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 1, output)
        self.assertIn("1 failed, 3 passed, 1 error", output)
        self.assertIn("FAILED sample_pytest_errors.py::CaseTests::test_a_case_that_makes_the_server_raise", output)
        self.assertIn("ERROR sample_pytest_errors.py::test_c_function_that_makes_the_server_raise", output)
        self.assertIn("ZeroDivisionError: boom under pytest", output)
        # In the failure, not again as a captured log (pytest 9.1 and later
        # capture every registered logger that does not propagate).
        self.assertNotIn("Captured log", output)

    def test_an_error_a_plain_function_left_running_names_that_function(self):
        # A plain function has no TestCase to name: the error said only
        # "an earlier test", which under pytest may be any test of the run.
        completed = run_pytest("-q", "sample_pytest_left_running.py", cwd=SAMPLES / "pytest_errors")
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 1, output)
        self.assertIn("ERROR sample_pytest_left_running.py::test_b_during_which_it_raises", output)
        self.assertIn("(raised by a request that an earlier test, ", output)  # its node id, from pytest's rootdir
        self.assertIn("sample_pytest_left_running.py::test_a_leaves_a_request_running, left running", output)
        self.assertIn("RuntimeError: raised after its test ended", output)

    def test_examples_pass_under_pytest_xdist(self):
        completed = run_pytest("-q", "-n", "2", "examples/pytest_examples", cwd=CHECKOUT)
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 0, output)
        self.assertIn("10 passed", output)


class ParallelZopeTestrunnerTests(unittest.TestCase):

    def test_layers_in_four_subprocesses_each_on_their_own_ports(self):
        with tempfile.TemporaryDirectory() as record:
            completed = run_testrunner("parallel", "-j", "4", env={"SERVERLAYER_PARALLEL_RECORD": record})
            notes = {name: Path(record, name).read_text().split() for name in os.listdir(record)}
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 0, output)
        self.assertIn("Total: 5 tests, 0 failures, 0 errors", output)
        self.assertEqual(len(notes), 5)
        processes = {name.split("-")[0] for name in notes}
        self.assertGreater(len(processes), 1, "zope.testrunner should have run the layers in subprocesses")
        # The servers of one stack listen at once, each on a port of its own.
        # Across processes, a port a torn-down layer let go of may be handed
        # out again; a server that found its port taken would have failed
        # its setUp, and the run (above).
        for noted in notes.values():
            self.assertEqual(len(noted), len(set(noted)), f"two servers of one stack shared a port: {notes}")
        self.assertEqual(sum(len(noted) for noted in notes.values()), 6, notes)  # MAIL_AND_HTTP has two


#: Runs the Python command line of its arguments with SIGINT's default action.
SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
    " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class MailSinkTests(unittest.TestCase):

    def start_sink(self, *args: str) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
        """The sink, and the lines it prints as they come (None at the end).

        Its output goes to a pipe, as in ``python -m serverlayer.smtp | tee
        mail.log``: without PYTHONUNBUFFERED (set here, perhaps), only what
        the sink flushes arrives while it runs.
        """
        environment = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
        # With SIGINT's default action: a suite started in the background
        # by a shell (``&``) inherits SIGINT ignored, and so would the sink.
        sink = subprocess.Popen(
            [sys.executable, "-c", SIGINT_DEFAULT, "-X", "faulthandler", "-W", "error", "-m", "serverlayer.smtp",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**environment, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert sink.stdout is not None
            for line in sink.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, name="mail sink output")
        reader.start()
        self.addCleanup(_stop, sink, reader)
        return sink, lines

    def next_line(self, lines: queue.Queue[str | None]) -> str:
        try:
            line = lines.get(timeout=CLIENT_TIMEOUT)
        except queue.Empty:
            self.fail(f"the sink printed no whole line in {CLIENT_TIMEOUT} s: does it flush its output?")
        if line is None:
            self.fail("the sink's output ended")
        return line.rstrip("\n")

    def printed_message(self, lines: queue.Queue[str | None]) -> list[str]:
        message = []
        while not (line := self.next_line(lines)).startswith("------------ END MESSAGE"):
            message.append(line)
        return message

    def test_prints_every_message_as_it_arrives_and_stops_on_ctrl_c(self):
        maildir = tempfile.mkdtemp(prefix="serverlayer-sink-")
        self.addCleanup(_remove_tree, maildir)
        sink, lines = self.start_sink("--port", "0", "--maildir", maildir)
        first_line = self.next_line(lines)
        self.assertTrue(first_line.startswith("Listening for mail on 127.0.0.1:"), first_line)
        port = int(first_line.split(":")[1].split(";")[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
            client.sendmail("ann@example.com", ["bob@example.com", "cy@example.com"],
                            "Subject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHallo\r\n".encode())
        message = self.printed_message(lines)
        self.assertEqual(message[:4], [
            "---------- MESSAGE FOLLOWS ----------",
            "X-Envelope-From: ann@example.com",
            "X-Envelope-To: bob@example.com, cy@example.com",
            "Subject: Grüße",
        ])
        self.assertIn("Hallo", message)
        for subject in ("second", "third"):  # each printed before the next is sent
            with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
                client.sendmail("ann@example.com", ["bob@example.com"], f"Subject: {subject}\r\n\r\n{subject}\r\n")
            self.assertIn(f"Subject: {subject}", self.printed_message(lines))
        sink.send_signal(signal.SIGINT)
        try:
            sink.wait(10)  # 0.12 s idle, 2.5 s with 24 busy processes
        except subprocess.TimeoutExpired:
            sink.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is
            try:
                sink.wait(10)  # its stacks are a few kB: far less than the pipe holds
            except subprocess.TimeoutExpired:
                sink.kill()
                sink.wait(10)
            assert sink.stderr is not None
            self.fail(f"the sink did not stop on SIGINT; it said {sink.stderr.read()[-5000:]!r}")
        assert sink.stderr is not None
        self.assertEqual((sink.returncode, sink.stderr.read()), (0, ""))
        self.assertIsNone(lines.get(timeout=CLIENT_TIMEOUT))  # nothing more was printed
        self.assertEqual(len(os.listdir(os.path.join(maildir, "new"))), 3)

    def test_a_server_error_is_the_clients_and_ctrl_c_still_ends_it_cleanly(self):
        maildir = tempfile.mkdtemp(prefix="serverlayer-sink-")
        sink, lines = self.start_sink("--port", "0", "--maildir", maildir)
        port = int(self.next_line(lines).split(":")[1].split(";")[0])
        _remove_tree(maildir)  # storing the next message fails
        with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
            with self.assertRaises(smtplib.SMTPDataError):  # the client is told
                client.sendmail("ann@example.com", ["bob@example.com"], "Subject: lost\r\n\r\nhi\r\n")
        sink.send_signal(signal.SIGINT)
        self.assertEqual(sink.wait(20), 0)
        assert sink.stderr is not None
        self.assertEqual(sink.stderr.read(), "")

    def test_busy_port_is_a_clear_error(self):
        with socket.socket() as occupier:
            occupier.bind(("127.0.0.1", 0))
            occupier.listen()
            sink, _ = self.start_sink("--port", str(occupier.getsockname()[1]))
            self.assertEqual(sink.wait(20), 2)
        assert sink.stderr is not None
        error = sink.stderr.read()
        self.assertIn("python -m serverlayer.smtp: ", error)
        self.assertIn("already in use (another mail sink?). Choose another with --port, or --port 0", error)
        self.assertNotIn("__main__", error)  # no layer names from the Python API

    def test_settings_the_layer_refuses_are_clear_errors_too(self):
        # --port 70000 ended in a traceback (the layer refused it as it was
        # made, outside the try); other refusals named the layer as the
        # Python API does, "<__main__.Layer __main__.serverlayer_smtp_main>".
        with tempfile.NamedTemporaryFile() as not_a_directory:
            for args, expected in [
                (("--port", "70000"), "port 70000 (port=) is not a port number"),
                (("--port", "0", "--maildir", not_a_directory.name),
                 f"maildir={not_a_directory.name!r} cannot hold mail"),
            ]:
                with self.subTest(args=args):
                    sink, _ = self.start_sink(*args)
                    self.assertEqual(sink.wait(20), 2)
                    assert sink.stderr is not None
                    error = sink.stderr.read()
                    self.assertTrue(error.startswith(f"python -m serverlayer.smtp: {expected}"), error)
                    self.assertNotIn("Traceback", error)
                    self.assertNotIn("__main__", error)

    def test_a_reader_that_stops_ends_the_sink_quietly(self):
        # python -m serverlayer.smtp | head -1
        read_end, write_end = os.pipe()
        sink = subprocess.Popen(
            [sys.executable, "-c", SIGINT_DEFAULT, "-W", "error", "-m", "serverlayer.smtp", "--port", "0"],
            stdout=write_end, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        os.close(write_end)
        self.addCleanup(_stop, sink, None)
        with os.fdopen(read_end) as output:
            first_line = output.readline()  # then head closes its end
        port = int(first_line.split(":")[1].split(";")[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
            client.sendmail("ann@example.com", ["bob@example.com"], "Subject: big\r\n\r\n" + "x\r\n" * 100_000)
        self.assertEqual(sink.wait(20), 0)
        assert sink.stderr is not None
        self.assertEqual(sink.stderr.read(), "")

    def test_help_names_the_defaults(self):
        completed = subprocess.run(
            [sys.executable, "-m", "serverlayer.smtp", "--help"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self.assertEqual((completed.returncode, completed.stderr), (0, ""))
        usage = " ".join(completed.stdout.split())  # however argparse wrapped it
        self.assertIn("address to listen on (default: 127.0.0.1)", usage)
        self.assertIn("port to listen on, 0 for any free one (default: 1025)", usage)


def _stop(process: subprocess.Popen[str], reader: threading.Thread | None) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)
    if reader is not None:
        reader.join(10)  # its pipe ended with the process
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class MissingExtraTests(unittest.TestCase):
    """A module whose extra is not installed says which extra to install."""

    def test_each_optional_module_names_its_extra(self):
        import importlib
        from unittest import mock

        for module, blocked, extra in [
            ("serverlayer.asgi", "uvicorn", "asgi"),
            ("serverlayer.zopeappwsgi", "zope.app.wsgi", "zopeappwsgi"),
            ("serverlayer.plonetestingzope", "ZPublisher", "zope"),
        ]:
            loaded = [name for name in sys.modules if name == blocked or name.startswith(blocked + ".")]
            with self.subTest(module), mock.patch.dict(sys.modules, dict.fromkeys([blocked, *loaded])):
                sys.modules.pop(module, None)
                with self.assertRaises(ModuleNotFoundError) as missing:  # as Python's own, for except clauses
                    importlib.import_module(module)
                self.assertIn(f"pip install 'serverlayer[{extra}]'", str(missing.exception))
