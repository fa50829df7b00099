"""A server-side exception fails the test that caused it, and only that test."""

from __future__ import annotations

import functools
import io
import logging
import os
import sys
import threading
import unittest
import urllib.error
import urllib.request
from unittest import mock

from serverlayer import ResourceError, ServerSideError, wsgi
from serverlayer.reporting import ErrorLog, ErrorLogHandler, pytest_test, running_test
from serverlayer.tests.helpers import run_testrunner, set_up_by_hand


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
        self.assertIn("Total: 8 tests, 4 failures, 0 errors and 0 skipped", self.output)

    def test_wsgi_failure_shows_the_server_traceback(self):
        failure = self.failure_of("test_1_app_raises")
        self.assertIn("ServerSideError", failure)
        self.assertIn("WSGI_LAYER", failure)
        self.assertIn("Exception while serving /boom", failure)
        self.assertIn('in app\n    raise ZeroDivisionError("boom from the app")', failure)
        self.assertIn("ZeroDivisionError: boom from the app", failure)

    def test_handler_failure_shows_the_server_traceback(self):
        failure = self.failure_of("test_handler_raises")
        self.assertIn("Handler raised while serving GET / from 127.0.0.1", failure)
        self.assertIn("KeyError: 'boom from the handler'", failure)

    def test_a_test_under_a_deep_layer_class_fails_as_any(self):
        failure = self.failure_of("test_1_app_raises_under_a_deep_layer")
        self.assertIn("DEEP_LAYER", failure)
        self.assertIn("ZeroDivisionError: boom from the app", failure)

    def test_explicit_check_fails_mid_way(self):
        failure = self.failure_of("test_4_checked_mid_way")
        self.assertIn("in test_4_checked_mid_way\n    self.layer.check_server_errors()", failure)

    def test_nothing_leaks_into_later_tests(self):
        for name in (
            "test_2_next_test_is_clean", "test_3_expected_error_is_taken", "test_switched_off", "test_2_the_run_goes_on"
        ):
            self.assertNotIn(f"in test {name} ", self.output)
        self.assertEqual(self.output.count("Failure in test"), 4)

    def test_run_is_quiet(self):
        self.assertNotIn("Traceback", self.completed.stderr)
        self.assertNotIn("left new threads behind", self.output)
        self.assertNotIn("ResourceWarning", self.output)


class ErrorLogTests(unittest.TestCase):

    @unittest.skipIf(sys.version_info < (3, 11), "exception groups came with Python 3.11")
    def test_a_recorded_exception_group_shows_its_members_and_their_causes(self):
        log = ErrorLog("<layer X>")
        try:
            try:
                raise KeyError("inner cause")
            except KeyError as error:
                member = ValueError("a member")
                member.__cause__ = error
            raise ExceptionGroup("the group", [member, TypeError("another member")])  # noqa: F821
        except Exception:
            log.record("serving /", sys.exc_info())
        [text] = log.take()
        for line in ("the group (2 sub-exceptions)", "KeyError: 'inner cause'", "ValueError: a member",
                     "TypeError: another member"):
            self.assertIn(line, text)

    def test_a_recorded_error_shows_the_exceptions_it_came_from(self):
        # zope.testrunner (which runs this) swaps traceback.format_exception
        # for one that leaves causes out.
        log = ErrorLog("<layer X>")

        def lookup():
            __traceback_info__ = "looking up order 8"  # noqa: F841 - zope.exceptions shows it
            raise KeyError("order 8")

        try:
            try:
                lookup()
            except KeyError as error:
                raise ConnectionRefusedError(111, "the backend is down") from error
        except ConnectionRefusedError:
            try:
                raise ValueError("while reporting it")
            except ValueError:
                log.record("serving /orders/8", sys.exc_info())
        [text] = log.take()
        order = [
            "KeyError: 'order 8'",
            "The above exception was the direct cause of the following exception:",
            "ConnectionRefusedError: [Errno 111] the backend is down",
            "During handling of the above exception, another exception occurred:",
            "ValueError: while reporting it",
        ]
        self.assertNotIn(-1, [text.find(line) for line in order], text)
        self.assertEqual(sorted(order, key=text.find), order, text)
        if "zope.testrunner" in sys.modules:
            self.assertIn("looking up order 8", text)

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

    def test_an_error_recorded_while_the_errors_are_taken_is_kept(self):
        # take() makes a list, which can start a garbage collection in the
        # taking thread; a collection that finalizes a pending task of a
        # layer's event loop records the task's error then, inside take().
        # With a plain lock, the thread waited for itself.
        log = ErrorLog("<layer X>")
        recorded = []

        class CollectingWhileHeld:
            """The log's lock, with such a collection as soon as it is taken."""

            def __init__(self, lock):
                self.lock = lock

            def __enter__(self):
                self.lock.acquire()
                if not recorded:
                    recorded.append(True)
                    log.record("from a finalizer")

            def __exit__(self, *exc_info):
                self.lock.release()

        log._lock = CollectingWhileHeld(log._lock)
        taken = []
        taker = threading.Thread(target=lambda: taken.extend(log.take()), daemon=True)
        taker.start()
        taker.join(10)
        self.assertFalse(taker.is_alive(), "take() waited for the lock its own thread held")
        self.assertEqual(taken + log.take(), ["from a finalizer"])

    def test_one_error_is_an_exception(self):
        log = ErrorLog("<layer X>")
        log.record("serving /a")
        with self.assertRaises(ServerSideError) as caught:
            log.check()
        self.assertIn("<layer X>: the server raised an exception while", str(caught.exception))

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
        thread.join(10)
        self.assertEqual(found, [None])

    def test_a_test_case_that_is_not_running_is_not_the_running_test(self):
        # A test may use another TestCase's methods as helpers; the test
        # that runs is still the one whose run() is on the stack.
        class Helpers(unittest.TestCase):
            def check(self):  # "check" < "run"
                return running_test()

            def use_layer(self):  # "use_layer" > "run"
                return running_test()

        helpers = Helpers("check")
        self.assertEqual([helpers.check(), helpers.use_layer()], [self, self])


class ErrorAddressTests(unittest.TestCase):
    """A server error names where the server listens: two layers of one
    class in a suite, or a stack of them, are told apart by it."""

    def test_the_error_names_the_servers_host_and_port(self):
        def broken(environ, start_response):
            raise ValueError("broken")

        for tls in (False, True):
            with self.subTest(tls=tls):
                layer = set_up_by_hand(self, wsgi.Layer(broken, name=f"error_address_{tls}", tls=tls))
                with self.assertRaises(urllib.error.HTTPError) as answer:
                    urllib.request.urlopen(layer["http_url"], timeout=5, context=layer.get("ssl_context"))
                answer.exception.close()
                with self.assertRaises(ServerSideError) as caught:
                    layer.check_server_errors()
                self.assertIn(f"{layer!r}: the server at {layer['http_address']} raised an exception",
                              str(caught.exception))


class ErrorLogHandlerTests(unittest.TestCase):
    """What a server library logs becomes a server-side error, or not."""

    def log_to(self, handler):
        logger = logging.getLogger(f"serverlayer.tests.{self._testMethodName}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        return logger

    def test_errors_and_worse_are_recorded_warnings_are_not(self):
        errors = ErrorLog("handler")
        logger = self.log_to(ErrorLogHandler(errors))
        logger.warning("a warning")
        logger.error("an error")
        logger.critical("a critical error")
        self.assertEqual(errors.take(), ["an error", "a critical error"])

    def test_given_a_thread_it_records_only_that_threads_errors(self):
        # Three threads alive at once have three different idents; the
        # handler takes the middle one's, so a comparison other than
        # "equal" lets one of the others through.
        errors = ErrorLog("handler")
        handler = ErrorLogHandler(errors)
        logger = self.log_to(handler)
        idents: dict[int, str] = {}
        all_known = threading.Barrier(4, timeout=10)
        handler_set = threading.Barrier(4, timeout=10)

        def log(name):
            idents[threading.get_ident()] = name
            all_known.wait()
            handler_set.wait()
            logger.error(f"from {name}")

        threads = [threading.Thread(target=log, args=(name,)) for name in ("a", "b", "c")]
        for thread in threads:
            thread.start()
        all_known.wait()
        middle = sorted(idents)[1]
        handler.thread_id = middle
        handler_set.wait()
        for thread in threads:
            thread.join(10)
        logger.error("from the test's thread")
        self.assertEqual(errors.take(), [f"from {idents[middle]}"])

    def test_an_exception_given_but_never_raised_is_recorded_too(self):
        errors = ErrorLog("handler")
        logger = self.log_to(ErrorLogHandler(errors))
        logger.error("serving failed", exc_info=ValueError("never raised"))
        [error] = errors.take()
        lines = error.splitlines()
        self.assertEqual((lines[0], lines[-1]), ("serving failed", "ValueError: never raised"))

    def test_verbose_echoes_every_record_to_stderr(self):
        errors = ErrorLog("handler")
        logger = self.log_to(ErrorLogHandler(errors))
        with mock.patch.dict(os.environ, {"SERVERLAYER_VERBOSE": "1"}), \
                mock.patch("sys.stderr", new_callable=io.StringIO) as stderr:
            logger.info("a request")
            logger.error("an error")
        self.assertEqual(stderr.getvalue(), "a request\nan error\n")
        self.assertEqual(errors.take(), ["an error"])

    def test_without_an_exception_only_the_message_is_recorded(self):
        errors = ErrorLog("handler")
        logger = self.log_to(ErrorLogHandler(errors))
        logger.exception("outside any except block")
        self.assertEqual(errors.take(), ["outside any except block"])


class LoggingDisabledTests(unittest.TestCase):
    """A suite that turns logging off (``logging.disable``) to keep its
    output quiet does not turn off the layers' reports of server errors."""

    def test_server_errors_are_reported_while_logging_is_disabled_and_after(self):
        from serverlayer import asgi, wsgi

        def wsgi_app(environ, start_response):
            raise RuntimeError("raised while logging was off")

        async def asgi_app(scope, receive, send):
            if scope["type"] == "http":
                raise RuntimeError("raised while logging was off")

        for layer in (wsgi.Layer(wsgi_app, name="logging_off_wsgi"), asgi.Layer(asgi_app, name="logging_off_asgi")):
            with self.subTest(layer=layer):
                set_up_by_hand(self, layer)
                for disabled in (True, False):  # and its logger does not stay off afterwards
                    logging.disable(logging.CRITICAL if disabled else logging.NOTSET)
                    try:
                        with self.assertRaises(urllib.error.HTTPError) as answer:
                            urllib.request.urlopen(layer["http_url"], timeout=5)
                        answer.exception.close()
                    finally:
                        logging.disable(logging.NOTSET)
                    [error] = layer.server_errors.take()
                    self.assertIn("RuntimeError: raised while logging was off", error)


class RunningTestSearchTests(unittest.TestCase):
    """How far up the stack running_test and pytest_test look."""

    def test_a_test_any_number_of_frames_up_is_found(self):
        def nested(depth):
            return nested(depth - 1) if depth else running_test()

        for depth in (0, 1, 12, 13, 200):
            with self.subTest(depth=depth):
                self.assertIs(nested(depth), self)

    def test_no_test_on_the_stack_is_none(self):
        found = []
        thread = threading.Thread(target=lambda: found.append(running_test()))
        thread.start()
        thread.join(10)
        self.assertEqual(found, [None])

    def test_pytest_test_is_the_instance_of_a_unittest_test_case(self):
        class Request:
            def __init__(self, instance):
                self.instance = instance

        class Layer:
            pytest_request = None

        layer = Layer()
        self.assertIsNone(pytest_test(layer))
        layer.pytest_request = Request(self)
        self.assertIs(pytest_test(layer), self)
        layer.pytest_request = Request(object())  # a plain test function's: no TestCase
        self.assertIsNone(pytest_test(layer))


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
        thread.join(10)
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

    def test_two_layers_with_one_identity_are_both_created(self):
        """Harmless until a runner mixes them up (see below): gocept.selenium's
        grok layer makes inner layers of fixed names, once per instance."""
        first = wsgi.Layer(lambda environ, start_response: [], name="twin")
        second = wsgi.Layer(lambda environ, start_response: [], name="twin")
        self.assertEqual([layer.__name__ for layer in (first, second)], ["twin", "twin"])

    def test_a_layer_not_set_up_names_the_set_up_layer_of_its_identity(self):
        first = wsgi.Layer(lambda environ, start_response: [], name="namesake")
        with wsgi.Layer(lambda environ, start_response: [], name="namesake"):
            with self.assertRaises(ResourceError) as caught:
                first["http_url"]
        message = str(caught.exception)
        self.assertIn(f"another layer called '{__name__}.namesake' is", message)
        self.assertIn("name=", message)

    def test_test_layers_sharing_an_identity_fail_the_set_up_and_say_why(self):
        """zope.testrunner would set up one of them and run the tests of both
        on it: the one it sets up refuses, naming the other one's test."""
        run = run_testrunner("shared_name", "-vv", "-m", "sample_classes")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 1, output)
        self.assertIn(
            "LayerIdentityError: Two layers are both called 'shared_name_pkg.layers.HTTP': the one"
            " zope.testrunner is setting up, and another one, which"
            " shared_name_pkg.sample_classes.OneTests.test_one needs.",
            output,
        )
        self.assertIn("name='ADMIN_HTTP'", output)
        self.assertIn("Tests with errors:\n   Layer: shared_name_pkg.layers.HTTP.setUp\n", output)
        self.assertNotIn("Ran ", output)  # neither test ran on the wrong server

    def test_test_layers_sharing_an_identity_on_server_layers_sharing_one_fail_the_set_up(self):
        """Each test layer stacked on a server layer, both pairs named alike:
        the server layer the runner sets up names the test's layer too."""
        run = run_testrunner("shared_name", "-vv", "-m", "sample_stacked")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 1, output)
        self.assertIn(
            "LayerIdentityError: Two layers are both called 'shared_name_pkg.layers.STACKED_HTTP': the"
            " one zope.testrunner is setting up, and another one, which"
            " shared_name_pkg.sample_stacked.OneTests.test_one needs, through its layer"
            " 'shared_name_pkg.sample_stacked.STACKED', named alike too.",
            output,
        )
        self.assertNotIn("Ran ", output)

    def test_suite_layers_sharing_an_identity_fail_the_test_that_asks_and_say_why(self):
        """A layer given to a suite is not on its tests, so only the test of
        the layer that was not set up sees the mix-up, when it asks for a resource."""
        run = run_testrunner("shared_name", "-vv", "-m", "sample_suites")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 1, output)
        self.assertIn("Ran 2 tests with 0 failures, 1 errors", output)
        self.assertIn(
            "ResourceError: <serverlayer.wsgi.Layer shared_name_pkg.layers.SUITE_HTTP> is not set up,"
            " so it has no 'http_url' resource, but another layer called"
            " 'shared_name_pkg.layers.SUITE_HTTP' is.",
            output,
        )
        self.assertIn("name='ADMIN_HTTP'", output)

    def test_inner_layers_an_outer_layer_sets_up_may_share_their_names(self):
        """gocept.selenium's grok pattern: each outer layer creates inner
        layers of fixed names in its __init__ and sets them up itself."""
        run = run_testrunner("integrated", "-vv")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 0, output)
        self.assertIn("Set up integrated_pkg.sample_one.ONE_LAYER", output)
        self.assertIn("Set up integrated_pkg.sample_two.TWO_LAYER", output)
        self.assertIn("Total: 2 tests, 0 failures, 0 errors", output)

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
