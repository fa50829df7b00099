"""A layer that more than one test module uses; conftest.py makes its fixtures."""

from serverlayer import wsgi


def shared_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"one server for several modules"]


SHARED_LAYER = wsgi.Layer(shared_app, name="SHARED_LAYER")
