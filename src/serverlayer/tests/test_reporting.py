"""A server-side exception fails the test that caused it, and only that test."""

from __future__ import annotations

import functools
import sys
import threading
import unittest
import urllib.error
import urllib.request

from serverlayer import LayerIdentityError, ServerSideError, wsgi
from serverlayer.reporting import ErrorLog, running_test
from serverlayer.tests.helpers import run_testrunner


@functools.cache
def sample_run():
    return run_testrunner("errors", "-vv")


class UnderZopeTestrunnerTests(unittest.TestCase):

    def setUp(self):
        self.completed = sample_run()
        self.output = self.completed.stdout + self.completed.stderr

    def failure_of(self, test_name: str) -> str:
        marker = f"in test {test_name} "
        start = self.output.index(marker)
        end = self.output.find("\n\n\n", start)
        return self.output[start:end]

    def test_run_is_not_aborted_and_counts_right(self):
        self.assertEqual(self.completed.returncode, 1, self.output)
        self.assertIn("Total: 6 tests, 3 failures, 0 errors and 0 skipped", self.output)

    def test_wsgi_failure_shows_the_server_traceback(self):
        failure = self.failure_of("test_1_app_raises")
        self.assertIn("ServerSideError", failure)
        self.assertIn("WSGI_LAYER", failure)
        self.assertIn("Exception while serving /boom", failure)
        self.assertIn('in app\n    raise ZeroDivisionError("boom from the app")', failure)
        self.assertIn("ZeroDivisionError: boom from the app", failure)

    def test_handler_failure_shows_the_server_traceback(self):
        failure = self.failure_of("test_handler_raises")
        self.assertIn("Handler raised while serving a request from 127.0.0.1", failure)
        self.assertIn("KeyError: 'boom from the handler'", failure)

    def test_explicit_check_fails_mid_way(self):
        failure = self.failure_of("test_4_checked_mid_way")
        self.assertIn("in test_4_checked_mid_way\n    self.layer.check_server_errors()", failure)

    def test_nothing_leaks_into_later_tests(self):
        for name in ("test_2_next_test_is_clean", "test_3_expected_error_is_taken", "test_switched_off"):
            self.assertNotIn(f"in test {name} ", self.output)
        self.assertEqual(self.output.count("Failure in test"), 3)

    def test_run_is_quiet(self):
        self.assertNotIn("Traceback", self.completed.stderr)
        self.assertNotIn("left new threads behind", self.output)
        self.assertNotIn("ResourceWarning", self.output)


class ErrorLogTests(unittest.TestCase):

    def test_check_raises_with_every_error_and_forgets_them(self):
        log = ErrorLog("<layer X>")
        try:
            raise ValueError("first")
        except ValueError:
            log.record("serving /a", sys.exc_info())
        log.record("serving /b")
        with self.assertRaises(ServerSideError) as caught:
            log.check()
        message = str(caught.exception)
        self.assertIn("<layer X>: the server raised 2 exceptions", message)
        self.assertIn("serving /a\nTraceback (most recent call last):", message)
        self.assertIn("ValueError: first", message)
        self.assertIn("serving /b", message)
        self.assertIn("report_server_errors=False", message)
        self.assertIsInstance(caught.exception, AssertionError)
        log.check()  # nothing left

    def test_running_test_is_the_innermost_one(self):
        self.assertIs(running_test(), self)
        found = []

        class Inner(unittest.TestCase):
            def test_it(inner):
                found.append(running_test())

        inner = Inner("test_it")
        inner.run(unittest.TestResult())
        self.assertEqual(found, [inner])

    def test_no_test_on_the_stack(self):
        found = []
        thread = threading.Thread(target=lambda: found.append(running_test()))
        thread.start()
        thread.join()
        self.assertEqual(found, [None])


def raising_app(environ, start_response):
    raise RuntimeError("by hand")


class CheckPlacementTests(unittest.TestCase):

    def setUp(self):
        self.layer = wsgi.Layer(raising_app, name=f"placement_{self._testMethodName}")
        self.layer.setUp()
        self.addCleanup(self.layer.tearDown)

    def provoke(self):
        with self.assertRaises(urllib.error.HTTPError):
            urllib.request.urlopen(self.layer["http_url"], timeout=5)

    def test_check_is_a_cleanup_of_the_running_test(self):
        layer, provoke = self.layer, self.provoke

        class Inner(unittest.TestCase):
            def test_it(inner):
                layer.testSetUp()
                provoke()
                layer.testTearDown()  # no check here: the test is still running

        result = unittest.TestResult()
        Inner("test_it").run(result)
        self.assertEqual(len(result.failures), 1, result.errors)
        self.assertIn("RuntimeError: by hand", result.failures[0][1])
        self.assertIn("ServerSideError", result.failures[0][1])

    def test_without_a_test_the_check_runs_in_test_tear_down(self):
        thread = threading.Thread(target=self.layer.testSetUp)
        thread.start()
        thread.join()
        self.provoke()
        with self.assertRaises(ServerSideError) as caught:
            self.layer.testTearDown()
        self.assertIn("RuntimeError: by hand", str(caught.exception))


class IdentityTests(unittest.TestCase):

    def test_unnamed_layers_carry_the_module_that_created_them(self):
        layer = wsgi.Layer(lambda environ, start_response: [])
        self.assertEqual(layer.__module__, __name__)
        self.assertEqual(layer.__name__, "Layer")

    def test_subclass_instances_carry_the_instantiating_module_too(self):
        class MyLayer(wsgi.Layer):
            def __init__(self, **kwargs):
                super().__init__(lambda environ, start_response: [], **kwargs)

        layer = MyLayer(name="subclassed")
        self.assertEqual(layer.__module__, __name__)

    def test_two_layers_with_one_identity_are_refused(self):
        keep = wsgi.Layer(lambda environ, start_response: [], name="twin")
        with self.assertRaises(LayerIdentityError) as caught:
            wsgi.Layer(lambda environ, start_response: [], name="twin")
        self.assertIn(f"{__name__}.twin", str(caught.exception))
        self.assertIn("name=", str(caught.exception))
        del keep

    def test_identity_of_a_dropped_layer_can_be_reused(self):
        wsgi.Layer(lambda environ, start_response: [], name="reused")
        wsgi.Layer(lambda environ, start_response: [], name="reused")

    def test_unnamed_layers_in_two_modules_are_both_set_up(self):
        run = run_testrunner("identity", "-vv")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 0, output)
        self.assertIn("Set up identity_pkg.sample_one.LAYER", output)
        self.assertIn("Set up identity_pkg.sample_two.LAYER", output)
        self.assertIn("Total: 2 tests, 0 failures, 0 errors", output)
