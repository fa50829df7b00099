"""A factory that gives every layer it makes the same name: a mistake when
two of them are layers of tests, since zope.testrunner knows a layer by its
module and name only."""

from serverlayer import wsgi


def http_layer(text, name):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [text.encode()]

    return wsgi.Layer(app, name=name)
