"""A zope.app.wsgi application (Zope Toolkit, Grok) over each test's database.

Needs ``pip install serverlayer[zopeappwsgi]``. The layer publishes the
application as the ``wsgi_app`` resource; stack it on your application's
``zope.app.appsetup.testlayer.ZODBLayer``, and ``serverlayer.wsgi.Layer``
on it to serve it over real HTTP: ``zopeappwsgi.Layer(bases=(ZODB_LAYER,),
name="APP_LAYER")``, then ``wsgi.Layer(bases=(APP_LAYER,),
name="HTTP_LAYER")``. The documentation's "Zope and Plone" page has a
complete test module.

This is the split gocept.httpserverlayer's ``zopeappwsgi.Layer`` had, so
moving from it means changing the imports; its ``get_current_zodb`` hook
works the same, but is only needed when the database comes from neither a
``ZODBLayer`` nor a ``zodbDB`` resource.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import plone.testing

from serverlayer.errors import missing_extra

try:
    import zope.app.wsgi
    from zope.app.appsetup.testlayer import ZODBLayer
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    needs = "zope.app.wsgi, zope.app.appsetup and ZODB"
    raise missing_extra("serverlayer.zopeappwsgi", needs, "zopeappwsgi", missing) from missing

from serverlayer.errors import ConfigurationError
from serverlayer.layer import claim_identity, instantiating_module, refuse_shared_identity
from serverlayer.wsgi import StartResponse, WSGIApplication, no_test_running


class Layer(plone.testing.Layer):
    """Publishes ``wsgi_app``: zope.app.wsgi's publisher over the current test's database.

    ``testSetUp`` builds a ``zope.app.wsgi.WSGIPublisherApplication`` over
    the database ``get_current_zodb()`` returns, as zope.app.wsgi's own
    ``BrowserLayer.make_wsgi_app`` does, and ``wsgi_app`` hands each request
    to it. A base layer must give every test a database of its own (a
    ``ZODBLayer`` does: a ``DemoStorage`` over the layer's), so that what one
    test's requests commit is gone in the next. The publisher opens a
    connection per request, so requests never share the test's connection.

    Between tests there is no test database to serve, and ``wsgi_app``
    answers 503. ``handle_errors=False`` lets exceptions propagate out of
    the publisher instead of becoming error pages; the wsgi layer then
    fails the test that caused them, with their traceback (a 404 or 401
    too, since those are exceptions as well).
    """

    handle_errors: bool = True

    def __init__(
        self,
        bases: Iterable[Any] | None = None,
        name: str | None = None,
        module: str | None = None,
        *,
        handle_errors: bool | None = None,
    ) -> None:
        # bases, name and module may come positionally, as plone.testing's
        # (and so gocept.httpserverlayer's) Layer takes them.
        # Named after the module that created it, like serverlayer's server
        # layers, so that two layers named alike in two modules stay apart.
        if module is None:
            module = instantiating_module(self)
        super().__init__(bases=None if bases is None else tuple(bases), name=name, module=module)
        if handle_errors is not None:
            self.handle_errors = handle_errors
        claim_identity(self)
        self._publisher: WSGIApplication | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} {self.__module__}.{self.__name__}>"

    def get_current_zodb(self) -> Any:
        """The database of the running test.

        The ``zodbDB`` resource if a base layer publishes one, else the
        ``db`` of a ``zope.app.appsetup.testlayer.ZODBLayer`` among the
        bases (``None`` between tests: a ``ZODBLayer`` has a database only
        while a test runs). Override it for databases kept anywhere else.
        """
        database = self.get("zodbDB")
        if database is not None:
            return database
        for layer in self.baseResolutionOrder:
            if isinstance(layer, ZODBLayer):
                return layer.db
        raise ConfigurationError(
            f"{self!r} found no database to publish: no base layer publishes"
            " a zodbDB resource, and none is a"
            " zope.app.appsetup.testlayer.ZODBLayer. Stack it on the"
            " ZODBLayer of your application,"
            " zopeappwsgi.Layer(bases=(ZODB_LAYER,), name='APP_LAYER'),"
            " or override get_current_zodb()."
        )

    def setUp(self) -> None:
        refuse_shared_identity(self)
        self.get_current_zodb()  # no database source: fail now, not in every testSetUp
        self["wsgi_app"] = self.publish

    def tearDown(self) -> None:
        del self["wsgi_app"]

    def testSetUp(self) -> None:
        self._publisher = zope.app.wsgi.WSGIPublisherApplication(
            self.get_current_zodb(), handle_errors=self.handle_errors
        )

    def testTearDown(self) -> None:
        self._publisher = None

    def publish(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The ``wsgi_app``: hands the request to the running test's publisher."""
        publisher = self._publisher
        if publisher is None:
            return no_test_running(self, start_response)
        return publisher(environ, start_response)
