"""The exceptions serverlayer raises.

Every message names the layer, the address involved and what to do about
it, because the person reading it is usually looking at a failed CI run
with nothing else to go on.
"""

from __future__ import annotations


class ServerLayerError(Exception):
    """Base class of every error serverlayer raises."""


class ConfigurationError(ServerLayerError, ValueError):
    """A layer was given settings it cannot work with."""


class LayerIdentityError(ConfigurationError):
    """zope.testrunner is setting a layer up for the tests of another layer
    with the same module and name: it knows layers by that name only, so it
    would run the tests of both on the one."""


class ResourceError(ServerLayerError, KeyError):
    """A test asked a layer for a resource it does not have: the layer is
    not set up (the test did not run under a runner that sets up layers),
    or it has no resource of that name. A ``KeyError`` still, as plone.testing's."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0])


class SetUpError(ServerLayerError):
    """A layer's server could not be started."""


class AddressInUseError(SetUpError, OSError):
    """The fixed address a layer was told to listen on is taken."""


class ServerSideError(ServerLayerError, AssertionError):
    """The server raised while handling a request made during a test.

    It subclasses AssertionError so that unittest counts it as a failure of
    the test that made the request, not as an error in the test machinery.
    """


class WaitTimeoutError(ServerLayerError, AssertionError):
    """What a test waited for did not arrive in time."""


class MailTimeoutError(WaitTimeoutError):
    """The mail a test waited for did not arrive in time."""


class RequestTimeoutError(WaitTimeoutError):
    """The requests a test waited for did not arrive in time."""


class ExpectationError(ServerLayerError, AssertionError):
    """A test's expected requests did not arrive, or unexpected ones did."""


class ScriptError(ServerLayerError):
    """A function the test gave a server (a content layer's answer or
    ``match``, a WebSocket script's reply or match) raised a
    ``ConnectionError`` or ``TimeoutError``: one from a service it called,
    say. It is passed on under this type, its own as the cause, so that the
    server takes it for the test's failure, never for a client gone."""


def missing_extra(module: str, needs: str, extra: str, missing: ModuleNotFoundError) -> ModuleNotFoundError:
    """What a module of an optional capability raises when its extra is not
    installed: Python's own error type, with the module missing and the fix."""
    return ModuleNotFoundError(
        f"{module} needs {needs} ({missing}). Install them with pip install 'serverlayer[{extra}]'.",
        name=missing.name,
    )
