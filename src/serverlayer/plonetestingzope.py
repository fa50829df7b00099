"""Serve the Zope application of plone.testing.zope over real HTTP.

    >>> from serverlayer import plonetestingzope
    >>> plonetestingzope.HTTP_SERVER  # stacked on plone.testing.zope.FUNCTIONAL_TESTING
    <serverlayer.plonetestingzope.Layer serverlayer.plonetestingzope.HTTP_SERVER>

Needs ``pip install serverlayer[zope]``. A test sees the Zope application
as ``self.layer['app']`` and the server at ``self.layer['http_url']``; what
the test commits, the server serves, and what a request commits, the test
sees after ``transaction.begin()``. The next test starts from the fixture
again: plone.testing's ``FunctionalTesting`` gives every test a database of
its own (a ``DemoStorage`` stacked on the layer's), and Zope opens each
request's connection from whatever database is current when the request
arrives.

Compared with stacking on ``plone.testing.zope.WSGI_SERVER_FIXTURE`` (what
gocept.httpserverlayer 4.0 did), only one server runs, on waitress in a
serverlayer lifecycle, and of Zope's global configuration, only what
``WSGI_SERVER`` changes too is changed while the layer is set up: XML-RPC
is on (Zope's default is off; Plone's robot tests call the site through it).
Between tests, when the database is the fixture's, a request is answered
503, so that a request that comes late (a browser's, a thread's) commits
nothing that the next tests would see.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from serverlayer.errors import missing_extra

try:
    import plone.testing.zope
    from App.config import getConfiguration
    from ZPublisher.httpexceptions import HTTPExceptionHandler
    from ZPublisher.WSGIPublisher import publish_module
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    needs = "Zope and plone.testing's zope extra"
    raise missing_extra("serverlayer.plonetestingzope", needs, "zope", missing) from missing

from serverlayer import wsgi
from serverlayer.errors import ConfigurationError
from serverlayer.server import ServerThread


class Layer(wsgi.Layer):
    """Serves the Zope application that plone.testing.zope started.

    The application is Zope's publisher behind the ``httpexceptions``
    middleware, which is the pipeline Zope's own WSGI configuration (and
    ``plone.testing.zope.WSGI_SERVER``) builds. ``publish_module`` opens a
    ZODB connection for every request from ``Zope2.bobo_application``, whose
    database the ``STARTUP`` layer made a facade over the ``zodbDB``
    resource; so every request reads and commits to the database of the
    test that is running, on a connection of its own, never the test's.

    Bases default to ``plone.testing.zope.FUNCTIONAL_TESTING``; pass
    ``bases=(MY_FUNCTIONAL_TESTING,)`` to serve your own fixture. One of the
    bases must be a ``plone.testing.zope.FunctionalTesting`` layer (Plone's
    ``PLONE_FUNCTIONAL_TESTING`` is one), because only that gives each test
    its own database: without it, what one test's requests commit would
    still be there in the next.

    Besides the ``http_*`` resources, the layer sets ``host`` and ``port``
    (which ``STARTUP`` sets to ``nohost`` and ``80``) to where it listens,
    so that ``absolute_url()`` in a test gives URLs a client can open, as
    under ``WSGI_SERVER`` (``https://`` ones with ``tls=True``).
    """

    defaultBases = (plone.testing.zope.FUNCTIONAL_TESTING,)

    #: Whether a test runs: between tests a request gets a 503.
    _test_running = False
    #: Zope's XML-RPC setting before the layer turned it on.
    _xmlrpc_before: Any = None

    def setUp(self) -> None:
        # Before XML-RPC is turned on: a refused second set-up would take the
        # running layer's setting for the one to restore at its tear-down.
        self.refuse_second_set_up()
        if not any(isinstance(layer, plone.testing.zope.FunctionalTesting) for layer in self.baseResolutionOrder):
            raise ConfigurationError(
                f"{self!r}: none of its base layers gives each test a database"
                " of its own, so what one test's requests commit would still be"
                " there in the next test. Stack it on"
                " plone.testing.zope.FUNCTIONAL_TESTING or on a FunctionalTesting"
                " layer of your own: plonetestingzope.Layer(bases=(MY_FUNCTIONAL_TESTING,),"
                " name='MY_HTTP_SERVER')."
            )
        configuration = getConfiguration()
        self._xmlrpc_before = getattr(configuration, "enable_xmlrpc", None)
        configuration.enable_xmlrpc = True
        try:
            super().setUp()
        except BaseException:
            self._restore_xmlrpc()
            raise

    def tearDown(self) -> None:
        try:
            super().tearDown()
        finally:
            self._restore_xmlrpc()

    def _restore_xmlrpc(self) -> None:
        configuration = getConfiguration()
        if self._xmlrpc_before is None:
            vars(configuration).pop("enable_xmlrpc", None)
        else:
            configuration.enable_xmlrpc = self._xmlrpc_before

    def testSetUp(self) -> None:
        super().testSetUp()
        if self.tls:
            # FunctionalTesting makes the test's request from SERVER_NAME
            # and SERVER_PORT alone, which say nothing of HTTPS.
            self["app"].REQUEST.setServerURL(protocol="https", hostname=self["host"], port=self["port"])
        self._test_running = True

    def testTearDown(self) -> None:
        self._test_running = False
        super().testTearDown()

    def application(self) -> wsgi.WSGIApplication:
        """Zope's publisher; a ``wsgi_app`` argument would be ignored, so it is refused."""
        if self.wsgi_app is not None:
            raise ConfigurationError(
                f"{self!r} serves the Zope application of its base layers and"
                f" takes no WSGI application, but was given {self.wsgi_app!r}."
                " To put middleware in front of Zope, subclass the layer and"
                " wrap what super().application() returns."
            )
        zope_app = HTTPExceptionHandler(publish_module)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if not self._test_running:
                return wsgi.no_test_running(self, start_response)
            return zope_app(environ, start_response)  # type: ignore[no-any-return]

        return app

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        # FunctionalTesting builds each test's app.REQUEST from these: an
        # IPv6 address in brackets, as in a URL.
        resources["host"] = f"[{host}]" if ":" in host else host
        resources["port"] = port
        return resources


#: A Zope server over ``plone.testing.zope.FUNCTIONAL_TESTING``: the
#: counterpart of gocept.httpserverlayer's ``plonetestingzope.HTTP_SERVER``.
HTTP_SERVER = Layer(name="HTTP_SERVER")
