"""zopeappwsgi: a Zope Toolkit application over real HTTP, each test with a
database of its own."""

from __future__ import annotations

import threading
import unittest
import warnings
from unittest import mock

import plone.testing
import transaction
import zope.app.appsetup.testlayer
from zope.publisher.browser import BrowserView
from zope.security.proxy import removeSecurityProxy

import serverlayer.tests
import serverlayer.tests.zope_integration
from serverlayer import ConfigurationError, wsgi, zopeappwsgi
from serverlayer.layer import identity
from serverlayer.tests.helpers import run_testrunner
from serverlayer.tests.zope_integration.helpers import fetch, fetch_together

#: Requests to ``@@connection`` wait here for each other.
TOGETHER = threading.Barrier(2, timeout=5)


class Counter(BrowserView):
    def __call__(self) -> str:
        return str(getattr(removeSecurityProxy(self.context), "counter", 0))


class Increment(BrowserView):
    def __call__(self) -> str:
        context = removeSecurityProxy(self.context)
        context.counter = getattr(context, "counter", 0) + 1
        return str(context.counter)


class Connection(BrowserView):
    """Which connection, and of which database, the request got."""

    def __call__(self) -> str:
        TOGETHER.wait()
        connection = removeSecurityProxy(self.context)._p_jar
        return f"{id(connection)} {id(connection.db())}"


class Fail(BrowserView):
    def __call__(self) -> str:
        raise ValueError("provoked by the test")


ZODB_LAYER = zope.app.appsetup.testlayer.ZODBLayer(
    serverlayer.tests.zope_integration, "ftesting.zcml", name="ZODB_LAYER"
)
APP_LAYER = zopeappwsgi.Layer(bases=(ZODB_LAYER,), name="APP_LAYER")
HTTP_LAYER = wsgi.Layer(bases=(APP_LAYER,), name="HTTP_LAYER")

RAISING_APP_LAYER = zopeappwsgi.Layer(bases=(ZODB_LAYER,), name="RAISING_APP_LAYER", handle_errors=False)
RAISING_HTTP_LAYER = wsgi.Layer(bases=(RAISING_APP_LAYER,), name="RAISING_HTTP_LAYER")


class GoceptStyleAppLayer(zopeappwsgi.Layer):
    """A layer written for gocept.httpserverlayer.zopeappwsgi, import changed."""

    defaultBases = (ZODB_LAYER,)

    def get_current_zodb(self):
        return ZODB_LAYER.db


GOCEPT_STYLE_APP_LAYER = GoceptStyleAppLayer()
GOCEPT_STYLE_HTTP_LAYER = wsgi.Layer(name="GOCEPT_STYLE_HTTP_LAYER", bases=(GOCEPT_STYLE_APP_LAYER,))

# Set by the first test of a pair, checked by the second: a change that
# survived into the next test would make the second fail.
committed_by_earlier_test: dict[str, bool] = {}


class RequestTests(unittest.TestCase):

    layer = HTTP_LAYER

    def url(self, view):
        return f"{self.layer['http_url']}@@{view}"

    def test_1_requests_and_the_test_commit(self):
        self.assertEqual(fetch(self.url("increment"), data=b""), (200, b"1"))
        self.assertEqual(fetch(self.url("increment"), data=b""), (200, b"2"))
        ZODB_LAYER.getRootFolder().written_by_the_test = True
        transaction.commit()
        self.assertEqual(fetch(self.url("counter")), (200, b"2"))
        committed_by_earlier_test["zopeappwsgi"] = True

    def test_2_what_they_committed_is_gone_in_the_next_test(self):
        self.assertTrue(
            committed_by_earlier_test.get("zopeappwsgi"),
            "run this test together with test_1_requests_and_the_test_commit,"
            " whose changes it must not see",
        )
        self.assertEqual(fetch(self.url("counter")), (200, b"0"))
        self.assertFalse(hasattr(ZODB_LAYER.getRootFolder(), "written_by_the_test"))

    def test_the_server_sees_what_the_test_committed(self):
        ZODB_LAYER.getRootFolder().counter = 41
        transaction.commit()
        self.assertEqual(fetch(self.url("increment"), data=b""), (200, b"42"))

    def test_the_test_sees_what_a_request_committed(self):
        root = ZODB_LAYER.getRootFolder()
        fetch(self.url("increment"), data=b"")
        transaction.begin()  # a new transaction sees what others committed
        self.assertEqual(root.counter, 1)

    def test_concurrent_requests_have_connections_of_their_own(self):
        # Opened first: a connection opened after the requests could be one
        # of theirs, back from the pool.
        test_connection = ZODB_LAYER.getRootFolder()._p_jar
        TOGETHER.reset()
        results = fetch_together(self.url("connection"), 2)
        self.assertEqual([status for status, _ in results], [200, 200], results)
        connections = {body.split()[0] for _, body in results}
        databases = {body.split()[1] for _, body in results}
        self.assertEqual(len(connections), 2, "two requests in flight shared a connection")
        self.assertNotIn(str(id(test_connection)).encode(), connections)
        self.assertEqual(databases, {str(id(ZODB_LAYER.db)).encode()})

    def test_handled_errors_become_error_pages(self):
        status, _ = fetch(self.url("fail"))
        self.assertEqual(status, 500)
        self.assertEqual(self.layer.server_errors.take(), [])
        self.assertEqual(fetch(self.url("no-such-view"))[0], 404)


class UnhandledErrorTests(unittest.TestCase):
    """Its layers share ZODB_LAYER with HTTP_LAYER's, so one of the two app
    layers is set up after the other's tests, when the ZODBLayer holds no
    database: set-up must not need one."""

    layer = RAISING_HTTP_LAYER

    def test_with_handle_errors_off_an_exception_fails_the_test(self):
        status, _ = fetch(f"{self.layer['http_url']}@@fail")
        self.assertEqual(status, 500)
        [error] = self.layer.server_errors.take()
        self.assertIn("ValueError: provoked by the test", error)


class GoceptStyleTests(unittest.TestCase):

    layer = GOCEPT_STYLE_HTTP_LAYER

    def test_serves_the_test_database(self):
        ZODB_LAYER.getRootFolder().counter = 7
        transaction.commit()
        self.assertEqual(fetch(f"{self.layer['http_url']}@@counter"), (200, b"7"))

    def test_unnamed_layer_is_named_after_its_class_and_module(self):
        self.assertEqual(
            (GOCEPT_STYLE_APP_LAYER.__module__, GOCEPT_STYLE_APP_LAYER.__name__),
            (__name__, "GoceptStyleAppLayer"),
        )


class DatabaseTests(unittest.TestCase):

    def test_between_tests_it_answers_503(self):
        layer = zopeappwsgi.Layer(bases=(ZODB_LAYER,), name="NO_TEST_RUNNING")
        statuses = []
        body = layer.publish({}, lambda status, headers: statuses.append(status))
        self.assertEqual(statuses, ["503 Service Unavailable"])
        self.assertIn(b"NO_TEST_RUNNING", b"".join(body))
        self.assertIn(b"no test is running", b"".join(body))

    def test_a_zodbDB_resource_comes_first(self):
        database = object()

        class PublishesDatabase(plone.testing.Layer):
            def setUp(self):
                self["zodbDB"] = database

            def tearDown(self):
                del self["zodbDB"]

        base = PublishesDatabase(name="PUBLISHES_DATABASE")
        layer = zopeappwsgi.Layer(bases=(base, ZODB_LAYER), name="RESOURCE_FIRST")
        base.setUp()
        self.addCleanup(base.tearDown)
        self.assertIs(layer.get_current_zodb(), database)

    def test_refuses_to_set_up_without_a_database(self):
        layer = zopeappwsgi.Layer(name="NO_DATABASE")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn("NO_DATABASE", message)
        self.assertIn("zope.app.appsetup.testlayer.ZODBLayer", message)
        self.assertNotIn("wsgi_app", layer)

    def test_takes_bases_name_and_module_positionally_as_plone_testing_does(self):
        layer = zopeappwsgi.Layer((ZODB_LAYER,), "POSITIONAL", "some.module")
        self.assertEqual(
            (layer.__bases__, layer.__name__, layer.__module__), ((ZODB_LAYER,), "POSITIONAL", "some.module")
        )

    def test_named_after_the_module_that_created_it(self):
        self.assertEqual(APP_LAYER.__module__, __name__)

    def test_two_layers_of_tests_with_one_name_fail_the_set_up(self):
        """zope.testrunner would set up one of them and run the tests of both on it."""
        run = run_testrunner("zope_shared_name", "-vv")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 1, output)
        self.assertIn(
            "LayerIdentityError: Two layers are both called 'zope_shared_name_pkg.sample_apps.APP': the"
            " one zope.testrunner is setting up, and another one, which"
            " zope_shared_name_pkg.sample_apps.OneTests.test_one needs.",
            output,
        )
        self.assertNotIn("Ran ", output)


class GoceptSeleniumGrokTests(unittest.TestCase):
    """gocept.selenium's grok layer, with gocept.httpserverlayer's modules
    resolved to serverlayer's as changing the import does. Each instance
    creates inner wsgi and zopeappwsgi layers of the same fixed names in its
    ``__init__`` and sets them up from its own ``setUp``: zope.testrunner
    never sees them, so two instances in one process are no mistake."""

    def test_two_instances_make_inner_layers_of_one_identity(self):
        import gocept.httpserverlayer

        with warnings.catch_warnings():
            # gocept.selenium 7.1 imports pkg_resources, which warns that it,
            # and the namespace packages it declares, are deprecated.
            warnings.simplefilter("ignore")
            import gocept.selenium.grok  # imports gocept's own modules, replaced below

        with (
            mock.patch.object(gocept.httpserverlayer, "wsgi", wsgi),
            mock.patch.object(gocept.httpserverlayer, "zopeappwsgi", zopeappwsgi),
        ):
            one = gocept.selenium.grok.Layer(serverlayer.tests.zope_integration)
            two = gocept.selenium.grok.Layer(serverlayer.tests)
        self.assertIsInstance(one.WSGI_LAYER, zopeappwsgi.Layer)
        self.assertIsInstance(one.HTTP_LAYER, wsgi.Layer)
        for inner in ("WSGI_LAYER", "HTTP_LAYER"):
            self.assertIsNot(getattr(one, inner), getattr(two, inner))
            self.assertEqual(identity(getattr(one, inner)), identity(getattr(two, inner)))
        self.assertEqual(identity(two.HTTP_LAYER), "gocept.selenium.grok.IntegratedHTTPLayer")
