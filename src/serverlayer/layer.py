"""The plone.testing side of every serverlayer layer.

``ServerLayer`` does what all our layers share: it gives the layer the name
of the module that created it (and an unnamed one the name of the variable
it is assigned to), works out where to listen, starts the server
in ``setUp``, publishes where it listens, checks for server-side errors
after every test, and in ``tearDown`` stops the server and deletes exactly
the resources it set. A concrete layer says how to make its server
(``make_server``) and what else to publish (``resources``).
"""

from __future__ import annotations

import dis
import gc
import inspect
import os
import socket
import sys
import threading
import types
import unittest
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, ClassVar, TypeVar

import plone.testing

from serverlayer.errors import (
    ConfigurationError,
    ExpectationError,
    LayerIdentityError,
    ResourceError,
    ServerSideError,
    SetUpError,
)
from serverlayer.recording import RequestLog
from serverlayer.reporting import ErrorLog, pytest_item_id, pytest_test, running_test
from serverlayer.server import Server, ServerThread, bind, format_address

DEFAULT_HOST = "127.0.0.1"
_Layer = TypeVar("_Layer", bound="ServerLayer")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def _creating_frame(layer: plone.testing.Layer, frame: FrameType | None) -> FrameType | None:
    """The frame of the code that wrote ``Layer(...)``: ``frame`` and its
    callers, past every ``__init__`` running for ``layer``."""
    while (
        frame is not None
        and frame.f_code.co_name == "__init__"
        and frame.f_locals.get("self") is layer
    ):
        frame = frame.f_back
    return frame


def instantiating_module(layer: plone.testing.Layer) -> str:
    """The module whose code wrote ``Layer(...)``.

    zope.testrunner tells layers apart by ``__module__`` and ``__name__``.
    plone.testing takes the module from the frame just above its own
    ``__init__``, which for a subclass is the subclass's module: every
    unnamed layer would then be ``serverlayer.wsgi.Layer`` and only one of
    them would be set up. Skip every ``__init__`` running for this layer.
    """
    frame = _creating_frame(layer, sys._getframe(1))
    if frame is None:
        return type(layer).__module__
    return str(frame.f_globals.get("__name__", type(layer).__module__))


def assigned_name(layer: plone.testing.Layer) -> str | None:
    """The module variable that ``NAME = Layer(...)`` binds ``layer`` to, if that
    is how it was created; ``None`` for layers made any other way.

    An unnamed layer is named after it, so that two unnamed layers of one
    module are two layers, under the names a reader sees in the code, which
    are the same in every process that imports the module (zope.testrunner's
    ``-j`` subprocesses find their layer by name) and which zope.testrunner's
    ``layer_from_name`` can import. The name is the target of the store
    instruction right after the call (past an EXTENDED_ARG, as in modules of
    over 256 names): the compiler puts it there for ``NAME = Layer(...)`` and
    ``NAME: T = Layer(...)`` only (a chained assignment has other instructions).
    """
    frame = _creating_frame(layer, sys._getframe(1))
    if frame is None:
        return None
    # STORE_NAME binds a module variable only in the module's own code, not
    # in a class body; STORE_GLOBAL (``global NAME``) does so anywhere.
    stores = ("STORE_NAME", "STORE_GLOBAL") if frame.f_code.co_name == "<module>" else ("STORE_GLOBAL",)
    instructions = dis.get_instructions(frame.f_code)
    for instruction in instructions:
        if instruction.offset == frame.f_lasti:  # the call that is creating the layer
            following = next((each for each in instructions if each.opname != "EXTENDED_ARG"), None)
            if following is not None and following.opname in stores:
                return str(following.argval)
            return None
    return None


#: Every live layer that claimed its identity. Several may share one.
_claimed: weakref.WeakSet[plone.testing.Layer] = weakref.WeakSet()
_claimed_lock = threading.Lock()
_RUNNER = "zope.testrunner.runner"


def identity(layer: Any) -> str:
    """The dotted name zope.testrunner knows ``layer`` by: module and name."""
    return f"{layer.__module__}.{layer.__name__}"


def namesakes(layer: plone.testing.Layer) -> list[plone.testing.Layer]:
    """The other live layers with ``layer``'s identity."""
    with _claimed_lock:
        return [each for each in _claimed if each is not layer and identity(each) == identity(layer)]


def claim_identity(layer: plone.testing.Layer, *, derived: bool = False) -> None:
    """Record ``layer`` under its module and name.

    A ``derived`` name is one the user did not choose (the variable name or
    the class name of an unnamed layer); when a live layer has it, the layer
    gets the first free of ``NAME_2``, ``NAME_3`` ... instead. Which one
    depends only on the layers of the module that exist before it, so on the
    order in which the module's code creates them, as in every process.

    A name the user chose is kept even when a live layer has it. Two layers
    with one identity are harmless unless both are layers of tests that
    zope.testrunner runs: gocept.selenium's grok layer creates its inner
    layers with fixed names, once per instance, and sets them up from its
    own ``setUp``, where the runner never sees them. So the mistake is
    reported where the runner makes it: ``refuse_shared_identity`` when the
    runner sets up a layer for another one's tests, and a ``ResourceError``
    saying so when such a test asks the layer that was not set up.
    """
    with _claimed_lock:
        if derived:
            module, name = layer.__module__, layer.__name__
            taken = {identity(each) for each in _claimed if each is not layer}
            if f"{module}.{name}" in taken:
                # A layer of an earlier run of the same code (a repeated doctest,
                # a reloaded module) may only be waiting for the cycle collector.
                gc.collect()
                taken = {identity(each) for each in _claimed if each is not layer}
            candidates = (name, *(f"{name}_{number}" for number in range(2, len(taken) + 3)))
            layer.__name__ = next(each for each in candidates if f"{module}.{each}" not in taken)
        _claimed.add(layer)


def _runner_run(layer: plone.testing.Layer) -> tuple[Any, list[Any]]:
    """What zope.testrunner is setting ``layer`` up for: the layer it runs
    tests of (``layer`` or one based on it) and those tests, the arguments
    of its ``run_layer``, found on the call stack when the runner's
    innermost frame there is ``setup_layer`` setting up ``layer`` itself.

    ``(None, [])`` for a layer set up any other way: by hand, in a ``with``
    block, from another layer's ``setUp`` (as gocept.selenium's grok layer
    sets up its inner layers), or by zope.pytestlayer, which tells layers
    apart by object and so never mixes up two with one name. Also if a
    zope.testrunner release renames those functions or their arguments:
    then only the ``ResourceError`` reports the mix-up, and the tests of
    ``refuse_shared_identity``, which run the installed runner, fail.
    """
    runner_frames = [frame for frame in _callers(sys._getframe(1)) if frame.f_globals.get("__name__") == _RUNNER]
    innermost = runner_frames[0] if runner_frames else None
    if innermost is None or innermost.f_code.co_name != "setup_layer" or innermost.f_locals.get("layer") is not layer:
        return None, []
    run_layer = next((frame for frame in runner_frames if frame.f_code.co_name == "run_layer"), None)
    if run_layer is None:
        return None, []
    return run_layer.f_locals.get("layer"), _flattened(run_layer.f_locals.get("tests"))


def _callers(frame: FrameType | None) -> Iterator[FrameType]:
    """``frame`` and the frames that called it, innermost first."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def _flattened(tests: object) -> list[Any]:
    """The tests of ``tests``, a ``unittest.TestSuite`` (of suites)."""
    if not isinstance(tests, unittest.TestSuite):
        return []
    return [test for each in tests for test in (_flattened(each) if isinstance(each, unittest.TestSuite) else [each])]


def _layer_and_bases(layer: Any) -> list[Any]:
    """``layer`` and every layer below it: what a test of ``layer`` needs."""
    found = [layer]
    for base in getattr(layer, "__bases__", ()):
        if base is not object:
            found.extend(_layer_and_bases(base))
    return found


def refuse_shared_identity(layer: plone.testing.Layer) -> None:
    """Raise ``LayerIdentityError`` if zope.testrunner is setting ``layer``
    up for a test that needs another layer with ``layer``'s identity.

    zope.testrunner files each test under the dotted name of its layer and
    sets up the one layer it finds under that name (``layer_from_name``),
    with its bases: of two layers of tests with one identity it sets up
    only one, and runs the tests of both on it. A layer the runner sets up
    sees those tests' own ``layer`` attributes, so it fails its ``setUp``,
    which the runner reports before it runs any of them. Bases the runner
    sets up by object, so two of one name in the layers of one test are no
    harm; nor are layers of one name that are not serverlayer's (the runner
    may well run equal ones alike). Tests whose layer is given to their
    suite, as a doctest's is, carry none: they meet a ``ResourceError``
    saying the same when they ask for a resource.
    """
    chosen, tests = _runner_run(layer)
    name = identity(layer)
    for test in tests:
        declared = getattr(test, "layer", None)  # a layer, its dotted name, or none
        if declared is chosen or not hasattr(declared, "__bases__"):
            continue
        others = [each for each in _layer_and_bases(declared) if each is not layer and identity(each) == name]
        if not others:
            continue
        test_id = test.id() if callable(getattr(test, "id", None)) else repr(test)
        through = "" if others[0] is declared else f", through its layer {identity(declared)!r}, named alike too"
        raise LayerIdentityError(
            f"Two layers are both called {name!r}: the one zope.testrunner is setting up, and"
            f" another one, which {test_id} needs{through}. The runner tells layers apart by"
            " that name, so it sets up only one of them and runs the tests of both on it."
            f" Give each a name of its own, for example {type(layer).__name__}(...,"
            " name='ADMIN_HTTP')."
        )


def takes_positional(function: Any, count: int) -> bool:
    """Whether ``function`` takes exactly ``count`` positional arguments."""
    try:
        parameters = inspect.signature(function, follow_wrapped=False).parameters.values()
    except (TypeError, ValueError):  # no signature to read
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == count and not any(p.kind is p.VAR_POSITIONAL for p in parameters)


_COUNTS = {2: "two", 3: "three"}


def refuse_bound_application(layer: plone.testing.Layer, app: object, attribute: str, arguments: list[str]) -> None:
    """Refuse an application function given as a class attribute
    (``wsgi_app = app``), which Python binds to the layer as a method:
    served, it would be called with the layer as its first argument, its
    every request failing with a TypeError."""
    if isinstance(app, types.MethodType) and app.__self__ is layer and takes_positional(app.__func__, len(arguments)):
        name = app.__func__.__name__
        raise ConfigurationError(
            f"{layer!r}: the {attribute} class attribute {name} is a function of"
            f" {_COUNTS.get(len(arguments), len(arguments))} arguments, which Python binds to the layer"
            f" as a method: it would be called with the layer as its {arguments[0]}."
            f" Write {attribute} = staticmethod({name}) in the class."
        )


def whole_number(value: object, *, owner: str, setting: str, minimum: int) -> int:
    """``value`` if it is a whole number of at least ``minimum``, else a clear error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{owner}: {setting}={value!r} must be a whole number of at least {minimum}.")
    return value


def positive_number(value: object, *, owner: str, setting: str) -> int:
    """``value`` if it is a whole number of at least 1, else a clear error."""
    return whole_number(value, owner=owner, setting=setting, minimum=1)


def flag(value: object, *, owner: str, setting: str) -> bool:
    """``value``, which must be True or False: ``tls="no"`` would be true."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{owner}: {setting}={value!r} must be True or False.")
    return value


def _host_text(value: object, *, owner: str, setting: str) -> str:
    """``value``, a host as a str: a socketserver address tuple or bytes
    failed later with getaddrinfo's TypeError, naming neither the setting
    nor the layer."""
    if not isinstance(value, str):
        raise ConfigurationError(
            f"{owner}: {setting}={value!r} must be a host name or IP address as a str,"
            " such as '127.0.0.1' or 'localhost'; a port goes in port=."
        )
    return value


def timeout_seconds(value: object, *, owner: str, setting: str) -> float:
    """``value``, a positive number of seconds, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigurationError(f"{owner}: {setting}={value!r} must be a positive number of seconds, such as 1.0.")
    return float(value)


def _layers(bases: object, kind: str) -> tuple[plone.testing.Layer, ...]:
    """``bases`` as a tuple of layers, or a ConfigurationError saying what to write."""
    if isinstance(bases, str):
        raise ConfigurationError(
            f"{kind}: bases={bases!r} is a string, not a sequence of layers. The positional"
            f" arguments after the first are bases, then name: for a name, write name={bases!r}."
        )
    if isinstance(bases, plone.testing.Layer):
        raise ConfigurationError(f"{kind}: bases={bases!r} is one layer; give a sequence: bases=({bases!r},).")
    if not isinstance(bases, Iterable):
        raise ConfigurationError(f"{kind}: bases={bases!r} is not a sequence of layers.")
    layers = tuple(bases)
    for layer in layers:
        if not hasattr(layer, "__bases__"):  # zope.testrunner's class layers may lack setUp
            raise ConfigurationError(f"{kind}: {layer!r} in bases= is not a layer.")
    return layers


def _port_number(value: object, *, owner: str, source: str) -> int:
    port = -1
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, str) and value.strip().isdigit():
        port = int(value)
    if not 0 <= port <= 65535:
        raise ConfigurationError(
            f"{owner}: port {value!r} ({source}) is not a port number."
            " Use an integer from 1 to 65535, or 0 to let the system pick"
            " a free port."
        )
    return port


def _takes_test(give_up: Any) -> bool:
    """Whether a server's ``give_up`` takes the ended test's name (a server
    of a layer's own may predate it)."""
    try:
        return "test" in inspect.signature(give_up).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


class ServerLayer(plone.testing.Layer):
    """A layer that runs a server from ``setUp`` until ``tearDown``.

    Where the server listens, first match wins:

    - host: the ``host`` keyword or class attribute; a ``<prefix>_host``
      resource preset by a base layer; the environment variables in
      ``host_environment``; ``127.0.0.1``.
    - port: the ``port`` keyword or class attribute; a preset
      ``<prefix>_port`` resource; ``0``, which lets the system pick.

    The published host is ``public_host`` (keyword, class attribute or the
    variables in ``public_host_environment``) when given, so that a browser
    on another machine can be told where to connect while the server binds
    an interface of this one.
    """

    #: ``http`` or ``smtp``: resources are called ``<prefix>_host`` etc.
    resource_prefix: ClassVar[str] = ""
    #: The resource holding the server object (``httpd``, ``smtpd``). A base
    #: layer that has it runs a server of its own, so its ``<prefix>_host``
    #: and ``<prefix>_port`` are not presets for this layer.
    server_resource: ClassVar[str] = ""
    host_environment: ClassVar[tuple[str, ...]] = ()
    public_host_environment: ClassVar[tuple[str, ...]] = ()

    host: str | None = None
    port: int | None = None
    public_host: str | None = None
    #: Fail a test whose requests made the server raise.
    report_server_errors: bool = True
    #: Seconds ``tearDown`` grants requests still running before abandoning
    #: them (their connections are closed first, so only code that never
    #: touches the connection can take that long).
    stop_timeout: float = 1.0
    #: Seconds the end-of-test check waits for requests still being handled
    #: (a response closing after the client read it), so that what they
    #: raise is reported in the test that made them.
    quiet_timeout: float = 1.0

    def __init__(
        self,
        *,
        bases: Iterable[plone.testing.Layer] | None = None,
        name: str | None = None,
        module: str | None = None,
        host: str | None = None,
        port: int | None = None,
        public_host: str | None = None,
        report_server_errors: bool | None = None,
        stop_timeout: float | None = None,
        quiet_timeout: float | None = None,
    ) -> None:
        if module is None:
            module = instantiating_module(self)
        super().__init__(
            bases=None if bases is None else _layers(bases, f"{type(self).__module__}.{type(self).__qualname__}"),
            name=name or assigned_name(self) or type(self).__name__,
            module=module,
        )
        if host is not None:
            self.host = _host_text(host, owner=repr(self), setting="host")
        if port is not None:
            self.port = _port_number(port, owner=repr(self), source="port=")
        if public_host is not None:
            self.public_host = _host_text(public_host, owner=repr(self), setting="public_host")
        if report_server_errors is not None:
            self.report_server_errors = flag(report_server_errors, owner=repr(self), setting="report_server_errors")
        if stop_timeout is not None:
            self.stop_timeout = timeout_seconds(stop_timeout, owner=repr(self), setting="stop_timeout")
        if quiet_timeout is not None:
            self.quiet_timeout = timeout_seconds(quiet_timeout, owner=repr(self), setting="quiet_timeout")
        claim_identity(self, derived=not name)
        self.server_errors = ErrorLog(repr(self))
        self._running: ServerThread | None = None
        self._sockets: list[socket.socket] = []
        self._published: list[str] = []
        self._check_in_test_tear_down = False
        #: Where the running server listens, for messages.
        self._serving_at = ""
        #: Since the last tearDown: None before any, else whether it raised.
        self._tear_down_raised: bool | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} {self.__module__}.{self.__name__}>"

    def __getitem__(self, key: str) -> Any:
        try:
            return super().__getitem__(key)
        except KeyError:
            raise ResourceError(self._missing(key)) from None

    def _missing(self, key: str) -> str:
        """Why ``key`` is not among the resources, and what to do."""
        if self._running is None and self._tear_down_raised is not None:
            message = f"{self!r} was torn down, so it has no {key!r} resource any more."
            if self._tear_down_raised:
                message += (
                    " Its tearDown raised the server error reported there, and zope.pytestlayer does"
                    " not set up again a layer whose tearDown raised: the tests after it fail like"
                    " this one. Fix that error."
                )
            return message
        if self._running is None:
            set_up = [each for each in namesakes(self) if isinstance(each, ServerLayer) and each._running is not None]
            if set_up:
                return (
                    f"{self!r} is not set up, so it has no {key!r} resource, but another layer"
                    f" called {identity(self)!r} is. zope.testrunner tells layers apart by that"
                    " name: of two layers of tests with one name, it sets up only one and runs"
                    " the tests of both on it. Give each a name of its own, for example"
                    f" {type(self).__name__}(..., name='ADMIN_HTTP')."
                )
        if self._running is None and "zope.pytestlayer" in sys.modules:
            return (
                f"{self!r} is not set up (yet), so it has no {key!r} resource. Under pytest,"
                " zope.pytestlayer sets up a TestCase's layer (its `layer` attribute) before"
                " setUp, but after setUpClass: read resources in setUp or in the test. A plain"
                " test function gets the layer through a fixture: globals().update(fixture.create("
                "LAYER, function_fixture_name='my_layer')) in its module or a conftest.py, and"
                " my_layer among the function's arguments."
            )
        if self._running is None:
            return (
                f"{self!r} is not set up, so it has no {key!r} resource yet. Run the test"
                " with a runner that sets up its layers: zope-testrunner (zope-testrunner"
                " --path=DIRECTORY), or pytest with zope.pytestlayer installed. By hand, call"
                " layer.setUp() first, or use the layer in a with block."
            )
        names = sorted({name for manager in self.baseResolutionOrder for name in getattr(manager, "_resources", {})})
        return f"{self!r} has no {key!r} resource; it has: {', '.join(names) or 'none'}."

    # What a concrete layer provides.

    def make_server(self, sockets: Sequence[socket.socket]) -> Server:
        """Return the server that will serve on every one of the listening
        ``sockets``: one per address of the host, all on the same port."""
        raise NotImplementedError

    def build_server(self, sockets: Sequence[socket.socket], host: str) -> Server:
        """The server ``setUp`` runs on ``sockets``, bound for ``host``;
        layers that wrap ``make_server``'s (in TLS, for one) or need the
        host (SMTP names it in its greeting) override this."""
        return self.make_server(sockets)

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        """The resources to publish once the server runs."""
        prefix = self.resource_prefix
        self.server_errors.address = format_address(host, port)
        return {
            f"{prefix}_host": host,
            f"{prefix}_port": port,
            f"{prefix}_address": self.server_errors.address,
            self.server_resource: running.server,
        }

    # Lifecycle.

    def refuse_second_set_up(self) -> None:
        """Raise ``SetUpError`` if the layer is set up already: a layer
        whose ``setUp`` does something before this class's calls this
        first, so that a refused second set-up leaves the running one alone."""
        if self._running is not None:
            raise SetUpError(
                f"{self!r} is already set up (serving at {self._serving_at}); tear it down first,"
                " or use another layer object for a second server."
            )

    def setUp(self) -> None:
        self.refuse_second_set_up()
        self.server_errors._clear()  # what a server of an earlier set-up raised is no news
        try:
            refuse_shared_identity(self)
            host, port, source = self.listen_address()
            sockets = self._sockets = bind(host, port, owner=repr(self), source=source)
            bound_port = sockets[0].getsockname()[1]
            server = self.build_server(sockets, host)
            running = ServerThread(
                server, name=f"serverlayer {self.__module__}.{self.__name__}"
            )
            self._running = running
            running.start(owner=repr(self))
            self.server_errors.settle = lambda: running.server.wait_quiet(self.quiet_timeout)
            published_host = self.published_host(host)
            self._serving_at = format_address(published_host, bound_port)
            self.publish(self.resources(published_host, bound_port, running))
        except BaseException:
            try:
                self.tearDown()
            except ServerSideError:
                pass  # raised while the set-up failed: the set-up's error says why
            finally:
                self._tear_down_raised = None  # it never served: not set up, rather than torn down
            raise

    def tearDown(self) -> None:
        """Stop the server; then raise ``ServerSideError`` if it raised
        since the last test ended: a request that test left running (the
        end of the test gave up waiting for it) may still raise, and there
        is no later test for it to fail."""
        running, self._running = self._running, None
        sockets, self._sockets = self._sockets, []
        self.server_errors.settle = None
        served = running is not None
        if served:
            self._tear_down_raised = True  # until it returns
        try:
            if running is not None:
                running.stop(timeout=self.stop_timeout)
                failure, running.failure = running.failure, None
                if failure is not None:  # its shut-down failed: what it left open is the layer's
                    self.server_errors.record(
                        "The serving loop died", (type(failure), failure, failure.__traceback__)
                    )
        finally:
            for sock in sockets:
                sock.close()  # the server closes them too; this covers one that failed to start
            for key in reversed(self._published):
                del self[key]
            self._published.clear()
        if self.report_server_errors:
            self.server_errors.check_after_last_test()
        else:
            self.server_errors._clear()
        if served:
            self._tear_down_raised = False

    def __enter__(self: _Layer) -> _Layer:
        """Run the server for a ``with`` block, outside any test runner's
        layers: ``with content.Layer() as server: server["http_url"] ...``.

        This sets up the layer itself, not its bases.
        """
        self.setUp()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Check what the end of a test checks, then stop. If the block
        failed, its error is the one raised, with what the checks found (the
        server's errors, unmet expectations) as notes (from Python 3.11 on;
        before, the block's error alone)."""
        if exc_type is None:
            try:
                self.check_after_test()
            finally:
                self.tearDown()
            return
        # The block's error is the one to see (a test expecting it must get
        # it); what the checks find, often the reason, goes with it.
        found: list[AssertionError] = []
        try:
            try:
                self.check_after_test()  # waits for the block's requests: their errors come
            except (ServerSideError, ExpectationError) as problem:
                found.append(problem)
        finally:
            try:
                self.tearDown()
            except ServerSideError as problem:
                found.append(problem)
        add_note = getattr(exc, "add_note", None)  # none before Python 3.11: the block's error alone
        if add_note is not None:
            for finding in found:
                add_note(str(finding))

    def testSetUp(self) -> None:
        # Errors recorded since the last test's end are kept: they fail
        # this test (a request that test left running, raising late).
        test = running_test() or pytest_test(self)
        self._check_in_test_tear_down = test is None
        if test is not None:
            test.addCleanup(self.check_after_test)

    def testTearDown(self) -> None:
        try:
            if self._check_in_test_tear_down:
                self._check_in_test_tear_down = False
                self.check_after_test()
        finally:
            # zope.testrunner looks for threads a test left behind after
            # the layers' testTearDown.
            if self._running is not None:
                self._running.server.test_ended(self.quiet_timeout)

    # Helpers for subclasses and tests.

    def publish(self, resources: Mapping[str, Any]) -> None:
        """Set resources that ``tearDown`` will delete again."""
        for key, value in resources.items():
            self[key] = value
            if key not in self._published:
                self._published.append(key)

    def check_after_test(self) -> None:
        """What runs when a test ends: server errors (unless switched off),
        and whatever a layer adds."""
        running = self._running
        if running is not None:
            running.server.wait_quiet(self.quiet_timeout)
            # What still runs is the ended test's: later tests' ends do not
            # wait for it, and what it raises from now on says so, and
            # fails the test during which it comes.
            give_up = getattr(running.server, "give_up", None)  # a server of a layer's own may have none
            if give_up is not None:
                test = running_test() or pytest_test(self)
                # Under pytest, a plain test function has no TestCase: its
                # node id names it.
                name = test.id() if test is not None else pytest_item_id(self)
                if name is not None and _takes_test(give_up):
                    give_up(test=name)  # named in what those requests raise later
                else:
                    give_up()
        if self.report_server_errors:
            self._check_recorded()
        else:
            self.server_errors._clear()  # the ended test's, not the next one's

    def check_server_errors(self) -> None:
        """Fail now if the server raised since the test began.

        Runs by itself when a test ends; call it to check mid-way.
        """
        running = self._running
        if running is not None:
            running.server.wait_quiet(self.quiet_timeout)
        self._check_recorded()

    def _check_recorded(self) -> None:
        """Fail if the server raised, or its loop died: what was recorded is taken."""
        running = self._running
        if running is not None and running.failure is not None:
            failure, running.failure = running.failure, None
            self.server_errors.record(
                "The serving loop died",
                (type(failure), failure, failure.__traceback__),
            )
        self.server_errors.check()

    def listen_address(self) -> tuple[str, int, str]:
        """Host, port and a description of where they came from."""
        prefix = self.resource_prefix
        presets_apply = self.get(self.server_resource) is None
        host, host_source = DEFAULT_HOST, "the default host"
        preset_host = self.get(f"{prefix}_host") if presets_apply else None
        environment_host = next(
            ((name, os.environ[name]) for name in self.host_environment if os.environ.get(name)),
            None,
        )
        if self.host is not None:
            host, host_source = self.host, "host="
        elif preset_host is not None:
            host, host_source = str(preset_host), f"the {prefix}_host resource of a base layer"
        elif environment_host is not None:
            host, host_source = environment_host[1], f"${environment_host[0]}"

        port, port_source = 0, "port 0"
        preset_port = self.get(f"{prefix}_port") if presets_apply else None
        if self.port is not None:
            port, port_source = self.port, "port="
        elif preset_port is not None:
            port_source = f"the {prefix}_port resource of a base layer"
            port = _port_number(preset_port, owner=repr(self), source=port_source)
        return host, port, f"host from {host_source}, port from {port_source}"

    def published_host(self, bound_host: str) -> str:
        """The host clients are told to use."""
        if self.public_host:
            return self.public_host
        for name in self.public_host_environment:
            if os.environ.get(name):
                return os.environ[name]
        if bound_host in _WILDCARD_HOSTS:
            # Listening on every interface is for clients on other machines;
            # they need a name, not the wildcard.
            return socket.gethostname()
        return bound_host


class HTTPLayer(ServerLayer):
    """A server layer that speaks HTTP and publishes the ``http_*`` resources.

    With ``tls=True`` it speaks HTTPS with a certificate from the test
    process's certificate authority, and also publishes that authority as
    ``ca_bundle`` and ``ssl_context``.

    ``client_certs="optional"`` or ``"required"`` (with ``tls=True``) asks
    each client for a certificate from the same authority: mutual TLS. A
    client without one (when required) or with an untrusted one fails its
    handshake; the server goes on serving the others. Such a layer also
    publishes ``client_cert`` (a PEM file with a key and a certificate for
    ``test-client``), ``issue_client_cert(name)`` (the same for another
    identity), and its ``ssl_context`` presents ``client_cert``.
    """

    resource_prefix = "http"
    server_resource = "httpd"
    host_environment: ClassVar[tuple[str, ...]] = ("SERVERLAYER_HTTP_HOST",)
    public_host_environment = ("SERVERLAYER_HTTP_PUBLIC_HOST",)
    tls: bool = False
    client_certs: str | None = None

    def __init__(self, *, tls: bool | None = None, client_certs: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tls is not None:
            self.tls = flag(tls, owner=repr(self), setting="tls")
        if client_certs is not None:
            self.client_certs = client_certs
        if self.client_certs not in (None, "optional", "required"):
            raise ConfigurationError(
                f"{self!r}: client_certs={self.client_certs!r} is not a choice:"
                " use 'optional' (ask for a certificate) or 'required' (refuse"
                " clients without one), or leave it out."
            )
        if self.client_certs is not None and not self.tls:
            raise ConfigurationError(
                f"{self!r}: client_certs={self.client_certs!r} asks clients for"
                " certificates in the TLS handshake, and this layer has no TLS:"
                " add tls=True."
            )
        #: The requests of the current test, published as ``http_requests``.
        self.requests = RequestLog(repr(self))

    def setUp(self) -> None:
        self.refuse_second_set_up()  # a refused set-up leaves the running server's requests alone
        # What the server of an earlier set-up received is no news, as its
        # errors are not: a layer set up again without a test in between
        # (``with layer:`` blocks, by hand) runs no testSetUp to empty the
        # log, and a wait_for would return those requests.
        self.requests.clear()
        super().setUp()

    def tearDown(self) -> None:
        self.requests.url = ""
        super().tearDown()

    def testSetUp(self) -> None:
        super().testSetUp()
        self.requests.clear()

    def own_server(self) -> Server | None:
        """The server this layer runs (with TLS, the one behind the front);
        None while the layer is not set up.

        Not ``self["httpd"]``: a layer based on this one that publishes an
        ``httpd`` of its own shadows it, and plone.testing then hands this
        layer that one.
        """
        if self._running is None:
            return None
        server = self._running.server
        if self.tls:
            from serverlayer import tls

            if isinstance(server, tls.TLSFront):
                return server.backend
        return server

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def build_server(self, sockets: Sequence[socket.socket], host: str) -> Server:
        if not self.tls:
            return self.make_server(sockets)
        # Imported here, as below: trustme, and with it cryptography, only
        # for layers that use TLS.
        from serverlayer import tls

        # The certificate first: a host it cannot name fails setUp before
        # there is a server behind the front (with waitress's worker
        # threads running already) to stop again.
        addresses = [sock.getsockname()[0] for sock in sockets]
        names = tls.certificate_names(host, self.published_host(host), *addresses)
        context = tls.certificate_authority().server_context(names, self.client_certs, owner=repr(self))
        # One internal address is enough for the front's own connections.
        [backend_socket] = bind("127.0.0.1", 0, owner=repr(self), source="the plain-text side of TLS")
        try:
            backend = self.make_server([backend_socket])
        except BaseException:
            backend_socket.close()
            raise
        try:
            return tls.TLSFront(
                sockets,
                backend,
                backend_socket,
                context=context,
                errors=self.server_errors,
                thread_name=f"serverlayer {self.__module__}.{self.__name__}",
            )
        except BaseException:
            # Never served: its threads and sockets go now, not at garbage collection.
            backend.release(self.stop_timeout)
            backend_socket.close()
            raise

    def resources(self, host: str, port: int, running: ServerThread) -> dict[str, Any]:
        resources = super().resources(host, port, running)
        resources["http_url"] = self.requests.url = f"{self.scheme}://{format_address(host, port)}/"
        resources["httpd_thread"] = running.thread
        resources["http_requests"] = self.requests
        if self.tls:
            from serverlayer import tls

            if isinstance(running.server, tls.TLSFront):  # the server behind it is the one tests talk to
                resources["httpd"] = running.server.backend
            resources.update(tls_resources(tls.certificate_authority(), client_certs=self.client_certs is not None))
        return resources


def tls_resources(authority: Any, *, client_certs: bool = False) -> dict[str, Any]:
    """What a layer with TLS publishes about the certificate authority; with
    ``client_certs``, also what its clients need to present a certificate."""
    if not client_certs:
        return {"ca_bundle": authority.ca_bundle, "ssl_context": authority.client_context()}
    client_cert = authority.client_cert()
    return {
        "ca_bundle": authority.ca_bundle,
        "ssl_context": authority.client_context(client_cert),
        "client_cert": client_cert,
        "issue_client_cert": authority.client_cert,
    }
