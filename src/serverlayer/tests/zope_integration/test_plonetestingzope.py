"""plonetestingzope: Zope over real HTTP, each test with a database of its own."""

from __future__ import annotations

import ssl
import threading
import unittest
import urllib.error
import urllib.request
import xmlrpc.client

import plone.testing
import plone.testing.zope
import transaction
from Acquisition import aq_base
from App.config import getConfiguration
from OFS.Image import manage_addFile
from plone.testing import zca
from Products.Five.browser import BrowserView
from zope.configuration import xmlconfig

from serverlayer import ConfigurationError, SetUpError, plonetestingzope
from serverlayer.tests.zope_integration.helpers import fetch, fetch_together

#: Requests to ``@@connection`` wait here for each other.
TOGETHER = threading.Barrier(2, timeout=5)


class Counter(BrowserView):
    def __call__(self) -> str:
        return str(getattr(aq_base(self.context), "counter", 0))


class Increment(BrowserView):
    def __call__(self) -> str:
        context = aq_base(self.context)
        context.counter = getattr(context, "counter", 0) + 1
        return str(context.counter)


class Connection(BrowserView):
    """Which connection, and of which database, the request got."""

    def __call__(self) -> str:
        TOGETHER.wait()
        connection = aq_base(self.context)._p_jar
        return f"{id(connection)} {id(connection.db())}"


class Fail(BrowserView):
    def __call__(self) -> str:
        raise ValueError("provoked by the test")


VIEWS_ZCML = f"""\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:browser="http://namespaces.zope.org/browser">
  <browser:page for="*" name="counter" permission="zope2.Public" class="{__name__}.Counter" />
  <browser:page for="*" name="increment" permission="zope2.Public" class="{__name__}.Increment" />
  <browser:page for="*" name="connection" permission="zope2.Public" class="{__name__}.Connection" />
  <browser:page for="*" name="fail" permission="zope2.Public" class="{__name__}.Fail" />
</configure>
"""


class Views(plone.testing.Layer):
    """Registers the views above, as a project's fixture layer loads its ZCML."""

    defaultBases = (plone.testing.zope.STARTUP,)

    def setUp(self):
        zca.pushGlobalRegistry()
        self["configurationContext"] = context = zca.stackConfigurationContext(self.get("configurationContext"))
        xmlconfig.string(VIEWS_ZCML, context=context)

    def tearDown(self):
        del self["configurationContext"]
        zca.popGlobalRegistry()


VIEWS = Views(name="VIEWS")
VIEWS_FUNCTIONAL = plone.testing.zope.FunctionalTesting(bases=(VIEWS,), name="VIEWS_FUNCTIONAL")
VIEWS_HTTP = plonetestingzope.Layer(bases=(VIEWS_FUNCTIONAL,), name="VIEWS_HTTP")

# Set by the first test of a pair, checked by the second: a change that
# survived into the next test would make the second fail.
committed_by_earlier_test: dict[str, bool] = {}


class ReadyLayerTests(unittest.TestCase):
    """HTTP_SERVER, over plone.testing.zope.FUNCTIONAL_TESTING."""

    layer = plonetestingzope.HTTP_SERVER

    def test_1_serves_what_the_test_committed(self):
        manage_addFile(self.layer["app"], "note.txt", b"committed by the test", content_type="text/plain")
        transaction.commit()
        self.assertEqual(fetch(self.layer["http_url"] + "note.txt"), (200, b"committed by the test"))
        committed_by_earlier_test["note.txt"] = True

    def test_2_the_next_test_starts_from_the_fixture_again(self):
        self.assertTrue(
            committed_by_earlier_test.get("note.txt"),
            "run this test together with test_1_serves_what_the_test_committed,"
            " whose change it must not see",
        )
        self.assertNotIn("note.txt", self.layer["app"].objectIds())
        status, _ = fetch(self.layer["http_url"] + "note.txt")
        self.assertEqual(status, 404)

    def test_absolute_url_is_the_servers(self):
        self.assertEqual(self.layer["app"].absolute_url() + "/", self.layer["http_url"])
        self.assertEqual(self.layer["request"]["SERVER_URL"] + "/", self.layer["http_url"])

    def test_not_found_is_an_answer_not_a_server_error(self):
        status, _ = fetch(self.layer["http_url"] + "nothing-here")
        self.assertEqual(status, 404)
        self.assertEqual(self.layer.server_errors.take(), [])

    def test_unauthorized_asks_for_credentials(self):
        status, _ = fetch(self.layer["http_url"] + "manage_main")
        self.assertEqual(status, 401)

    def test_xml_rpc_is_on_as_under_wsgi_server(self):
        # Plone's robot tests call the site through it (plone.app.robotframework).
        self.layer["app"].acl_users.userFolderAddUser("robot", "secret", ["Manager"], [])
        transaction.commit()
        host, port = self.layer["http_host"], self.layer["http_port"]
        with xmlrpc.client.ServerProxy(f"http://robot:secret@{host}:{port}/") as site:  # closes its connection
            site.manage_addFolder("added_by_xmlrpc")
        transaction.begin()
        self.assertIn("added_by_xmlrpc", self.layer["app"].objectIds())

    def test_a_request_between_tests_commits_nothing_to_the_fixture(self):
        self.layer.testTearDown()  # as between this test and the next
        try:
            status, body = fetch(self.layer["http_url"])
        finally:
            self.layer.testSetUp()
        self.assertEqual(status, 503)
        self.assertIn(b"no test is running", body)


class RequestTests(unittest.TestCase):
    """Requests get connections of their own, to the running test's database."""

    layer = VIEWS_HTTP

    def url(self, view):
        return f"{self.layer['http_url']}@@{view}"

    def test_1_requests_commit(self):
        self.assertEqual(fetch(self.url("increment"), data=b""), (200, b"1"))
        self.assertEqual(fetch(self.url("increment"), data=b""), (200, b"2"))
        self.assertEqual(fetch(self.url("counter")), (200, b"2"))
        committed_by_earlier_test["counter"] = True

    def test_2_what_requests_committed_is_gone_in_the_next_test(self):
        self.assertTrue(
            committed_by_earlier_test.get("counter"),
            "run this test together with test_1_requests_commit, whose change it must not see",
        )
        self.assertEqual(fetch(self.url("counter")), (200, b"0"))

    def test_the_test_sees_what_a_request_committed(self):
        fetch(self.url("increment"), data=b"")
        transaction.begin()  # a new transaction sees what others committed
        self.assertEqual(aq_base(self.layer["app"]).counter, 1)

    def test_concurrent_requests_have_connections_of_their_own(self):
        TOGETHER.reset()
        results = fetch_together(self.url("connection"), 2)
        self.assertEqual([status for status, _ in results], [200, 200], results)
        connections = {body.split()[0] for _, body in results}
        databases = {body.split()[1] for _, body in results}
        self.assertEqual(len(connections), 2, "two requests in flight shared a connection")
        self.assertNotIn(str(id(self.layer["app"]._p_jar)).encode(), connections)
        # The database of this test, not the layer's that it stacks on.
        self.assertEqual(databases, {str(id(self.layer["zodbDB"])).encode()})

    def test_an_exception_in_a_view_fails_the_test(self):
        status, _ = fetch(self.url("fail"))
        self.assertEqual(status, 500)
        [error] = self.layer.server_errors.take()
        self.assertIn("ValueError: provoked by the test", error)


V6_HTTP = plonetestingzope.Layer(name="V6_HTTP", host="::1")
TLS_HTTP = plonetestingzope.Layer(name="TLS_HTTP", tls=True)


class IPv6Tests(unittest.TestCase):
    """absolute_url() gives URLs a client can open: an IPv6 address in brackets."""

    layer = V6_HTTP

    def test_absolute_url_is_the_servers(self):
        self.assertEqual(self.layer["app"].absolute_url() + "/", self.layer["http_url"])
        self.assertTrue(self.layer["http_url"].startswith("http://[::1]:"), self.layer["http_url"])
        self.assertEqual(fetch(self.layer["app"].absolute_url() + "/nothing-here")[0], 404)


class TLSTests(unittest.TestCase):
    """absolute_url() gives URLs a client can open: https:// over TLS."""

    layer = TLS_HTTP

    def test_absolute_url_is_the_servers(self):
        self.assertEqual(self.layer["app"].absolute_url() + "/", self.layer["http_url"])
        self.assertTrue(self.layer["http_url"].startswith("https://"), self.layer["http_url"])
        context = ssl.create_default_context(cafile=self.layer["ca_bundle"])
        with self.assertRaises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(self.layer["app"].absolute_url() + "/nothing-here", timeout=10, context=context)
        self.assertEqual(answer.exception.code, 404)
        answer.exception.close()


class ConfigurationTests(unittest.TestCase):

    def test_refuses_bases_without_a_database_per_test(self):
        layer = plonetestingzope.Layer(bases=(plone.testing.zope.INTEGRATION_TESTING,), name="NOT_ISOLATED")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        message = str(caught.exception)
        self.assertIn("NOT_ISOLATED", message)
        self.assertIn("plone.testing.zope.FUNCTIONAL_TESTING", message)
        self.assertEqual(layer._resources, {})

    def test_refuses_a_wsgi_application(self):
        def app(environ, start_response):
            raise AssertionError("never called")

        layer = plonetestingzope.Layer(app, name="GIVEN_AN_APP")
        with self.assertRaises(ConfigurationError) as caught:
            layer.setUp()
        self.assertIn("GIVEN_AN_APP", str(caught.exception))
        self.assertIn("super().application()", str(caught.exception))
        self.assertEqual(layer._resources, {})

    def test_a_refused_second_set_up_leaves_xml_rpc_as_the_layer_found_it(self):
        configuration = getConfiguration()
        before = vars(configuration).get("enable_xmlrpc", "unset")
        layer = plonetestingzope.Layer(name="SET_UP_TWICE")
        layer.setUp()
        try:
            with self.assertRaises(SetUpError):
                layer.setUp()
        finally:
            layer.tearDown()
        self.assertEqual(vars(configuration).get("enable_xmlrpc", "unset"), before)
