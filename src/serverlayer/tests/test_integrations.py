"""Where users run their tests: pytest (zope.pytestlayer, pytest-xdist),
``zope-testrunner -j``, and the ``python -m serverlayer.smtp`` mail sink."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from serverlayer.tests.helpers import SAMPLES, run_testrunner

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

    def test_examples_pass_under_pytest_xdist(self):
        completed = run_pytest("-q", "-n", "2", "examples/pytest_examples", cwd=CHECKOUT)
        output = completed.stdout + completed.stderr
        self.assertEqual(completed.returncode, 0, output)
        self.assertIn("7 passed", output)


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
        ports = [port for noted in notes.values() for port in noted]
        self.assertEqual(len(ports), len(set(ports)), f"two servers shared a port: {notes}")


#: Runs the Python command line of its arguments with SIGINT's default action.
SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
    " os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class MailSinkTests(unittest.TestCase):

    def start_sink(self, *args: str) -> subprocess.Popen[str]:
        # With SIGINT's default action: a suite started in the background
        # by a shell (``&``) inherits SIGINT ignored, and so would the sink.
        sink = subprocess.Popen(
            [sys.executable, "-c", SIGINT_DEFAULT, "-X", "faulthandler", "-W", "error", "-m", "serverlayer.smtp",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self.addCleanup(_stop, sink)
        return sink

    def test_prints_every_message_and_stops_on_ctrl_c(self):
        maildir = tempfile.mkdtemp(prefix="serverlayer-sink-")
        self.addCleanup(_remove_tree, maildir)
        sink = self.start_sink("--port", "0", "--maildir", maildir)
        first_line = sink.stdout.readline()
        self.assertTrue(first_line.startswith("Listening for mail on 127.0.0.1:"), first_line)
        port = int(first_line.split(":")[1].split(";")[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.sendmail("ann@example.com", ["bob@example.com", "cy@example.com"],
                            "Subject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHallo\r\n".encode())
        lines = []
        while (line := sink.stdout.readline()) and not line.startswith("------------ END MESSAGE"):
            lines.append(line.rstrip("\n"))
        self.assertEqual(lines[:4], [
            "---------- MESSAGE FOLLOWS ----------",
            "X-Envelope-From: ann@example.com",
            "X-Envelope-To: bob@example.com, cy@example.com",
            "Subject: Grüße",
        ])
        self.assertIn("Hallo", lines)
        sink.send_signal(signal.SIGINT)
        try:  # reading both pipes: a sink blocked writing to one would never stop
            rest, errors = sink.communicate(timeout=10)  # 0.12 s idle, 2.5 s with 24 busy processes
        except subprocess.TimeoutExpired:
            sink.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is
            rest, errors = sink.communicate()
            self.fail(f"the sink did not stop on SIGINT; it printed {rest[-2000:]!r}, and {errors[-5000:]!r}")
        self.assertEqual((sink.returncode, errors), (0, ""), rest)
        self.assertEqual(len(os.listdir(os.path.join(maildir, "new"))), 1)

    def test_busy_port_is_a_clear_error(self):
        with socket.socket() as occupier:
            occupier.bind(("127.0.0.1", 0))
            occupier.listen()
            sink = self.start_sink("--port", str(occupier.getsockname()[1]))
            self.assertEqual(sink.wait(20), 2)
        error = sink.stderr.read()
        self.assertIn("python -m serverlayer.smtp: ", error)
        self.assertIn("already in use", error)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
