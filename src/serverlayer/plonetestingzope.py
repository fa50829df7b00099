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
serverlayer lifecycle, and Zope's global configuration is left as the
``STARTUP`` layer made it.
"""

from __future__ import annotations

from typing import Any

from serverlayer.errors import missing_extra

try:
    import plone.testing.zope
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
    under ``WSGI_SERVER``.
    """

    defaultBases = (plone.testing.zope.FUNCTIONAL_TESTING,)

    def setUp(self) -> None:
        if not any(isinstance(layer, plone.testing.zope.FunctionalTesting) for layer in self.baseResolutionOrder):
            raise ConfigurationError(
                f"{self!r}: none of its base layers gives each test a database"
                " of its own, so what one test's requests commit would still be"
                " there in the next test. Stack it on"
                " plone.testing.zope.FUNCTIONAL_TESTING or on a FunctionalTesting"
                " layer of your own: plonetestingzope.Layer(bases=(MY_FUNCTIONAL_TESTING,),"
                " name='MY_HTTP_SERVER')."
            )
        super().setUp()

    def application(self) -> wsgi.WSGIApplication:
        """Zope's publisher; a ``wsgi_app`` argument would be ignored, so it is refused."""
        if self.wsgi_app is not None:
            raise ConfigurationError(
                f"{self!r} serves the Zope application of its base layers and"
                f" takes no WSGI application, but was given {self.wsgi_app!r}."
                " To put middleware in front of Zope, subclass the layer and"
                " wrap what super().application() returns."
            )
        app: wsgi.WSGIApplication = HTTPExceptionHandler(publish_module)
        return app

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        # FunctionalTesting builds each test's app.REQUEST from these.
        resources["host"] = host
        resources["port"] = port
        return resources


#: A Zope server over ``plone.testing.zope.FUNCTIONAL_TESTING``: the
#: counterpart of gocept.httpserverlayer's ``plonetestingzope.HTTP_SERVER``.
HTTP_SERVER = Layer(name="HTTP_SERVER")
