"""Real HTTP and SMTP servers as zope.testrunner / plone.testing test layers."""

from serverlayer.errors import (
    AddressInUseError,
    ConfigurationError,
    ExpectationError,
    LayerIdentityError,
    MailTimeoutError,
    RequestTimeoutError,
    ResourceError,
    ScriptError,
    ServerLayerError,
    ServerSideError,
    SetUpError,
    WaitTimeoutError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AddressInUseError",
    "ConfigurationError",
    "ExpectationError",
    "LayerIdentityError",
    "MailTimeoutError",
    "RequestTimeoutError",
    "ResourceError",
    "ScriptError",
    "ServerLayerError",
    "ServerSideError",
    "SetUpError",
    "WaitTimeoutError",
    "__version__",
]
