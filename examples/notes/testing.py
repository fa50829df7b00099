"""The test layers of the notes application.

Two layers, stacked:

``NOTES_APP`` creates the application once, in ``setUp``, and publishes it
as the ``wsgi_app`` resource. Its ``testSetUp`` empties the store, so every
test starts with no notes even though all tests share one server.

``NOTES_HTTP`` is a ``serverlayer.wsgi.Layer`` based on ``NOTES_APP``. Given
no application of its own, it serves the ``wsgi_app`` resource of its base
layer, and publishes ``http_url``, ``http_host``, ``http_port`` and
``http_address``. Tests use ``layer = NOTES_HTTP`` and see the resources of
both layers through ``self.layer``.

Starting the server once per layer rather than once per test keeps the
tests fast; resetting the store per test keeps them independent.
"""

from __future__ import annotations

import plone.testing

import serverlayer.wsgi
from notes.app import NotesApp, make_app


class NotesAppLayer(plone.testing.Layer):
    """Provides a fresh ``NotesApp`` as ``wsgi_app``, emptied before each test."""

    def setUp(self) -> None:
        self["wsgi_app"] = make_app()

    def testSetUp(self) -> None:
        app: NotesApp = self["wsgi_app"]
        app.reset()

    def tearDown(self) -> None:
        del self["wsgi_app"]


NOTES_APP = NotesAppLayer(name="NOTES_APP")
NOTES_HTTP = serverlayer.wsgi.Layer(bases=(NOTES_APP,), name="NOTES_HTTP")
