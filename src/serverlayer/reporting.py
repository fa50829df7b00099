"""Turning exceptions raised inside a server into failures of the test.

An exception in a request handler happens on a server thread; the client
only sees a 500 or a dropped connection, and the test may well pass. The
layer records each such exception in an ``ErrorLog`` and checks it when the
test ends.

Where it checks matters. zope.testrunner aborts the whole run when a layer's
``testTearDown`` raises, so the check is added to the running test as a
``unittest`` cleanup instead: a failing cleanup is reported as a failure of
that test, traceback included, and the run goes on. zope.testrunner calls
``testSetUp`` from its result's ``startTest(test)`` without passing the test
along, which is why ``running_test`` looks for it on the call stack. Under
pytest, zope.pytestlayer hands the layer its fixture request, whose
``instance`` is the test (``pytest_test``). Where no test can be found (a
plain pytest function, another runner, a layer driven by hand), the layer
raises from ``testTearDown`` instead, which pytest reports as an error in
the test's teardown.
"""

from __future__ import annotations

import builtins
import logging
import os
import sys
import textwrap
import threading
import traceback
import unittest
from collections.abc import Callable
from types import FrameType, TracebackType

from serverlayer.errors import ServerSideError

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

VERBOSE_ENVIRONMENT = ("SERVERLAYER_VERBOSE", "GOCEPT_HTTP_VERBOSE_LOGGING")


def verbose() -> bool:
    """Whether servers should log requests and errors to stderr.

    Tests stay quiet by default; set ``SERVERLAYER_VERBOSE=1`` to see what
    the servers do.
    """
    return any(os.environ.get(name) for name in VERBOSE_ENVIRONMENT)


def running_test(frame: FrameType | None = None) -> unittest.TestCase | None:
    """The innermost test running on the stack above ``frame``.

    That is the ``self`` of a ``TestCase.run`` frame, or the ``test`` that a
    result's ``startTest(test)`` was called with.

    The whole stack is searched: zope.testrunner's ``startTest`` is two
    frames above a layer's ``testSetUp``, and each ``super().testSetUp()``
    of a layer class, mixin or decorator in between adds one. A test not
    found makes the check raise in ``testTearDown``, which aborts a
    zope.testrunner run.
    """
    frame = frame or sys._getframe(1)
    while frame is not None:
        local_names = frame.f_locals
        if frame.f_code.co_name == "run" and isinstance(local_names.get("self"), unittest.TestCase):
            return local_names["self"]  # type: ignore[no-any-return]
        if isinstance(local_names.get("test"), unittest.TestCase):
            return local_names["test"]  # type: ignore[no-any-return]
        frame = frame.f_back
    return None


def pytest_test(layer: object) -> unittest.TestCase | None:
    """The ``unittest.TestCase`` zope.pytestlayer is setting ``layer`` up for.

    zope.pytestlayer calls ``testSetUp`` from a pytest fixture and hands the
    layer that fixture's ``request`` as ``pytest_request`` first; for a
    ``unittest.TestCase`` its ``instance`` is the test. A plain test
    function has none: the layer then checks in ``testTearDown``, which
    pytest reports as an error in that test's teardown.
    """
    instance = getattr(getattr(layer, "pytest_request", None), "instance", None)
    return instance if isinstance(instance, unittest.TestCase) else None


def pytest_item_id(layer: object) -> str | None:
    """The pytest node id of the test zope.pytestlayer is running ``layer``
    for (``file.py::test_name``), if it is: a plain test function has no
    ``TestCase`` whose ``id()`` names it."""
    node_id = getattr(getattr(getattr(layer, "pytest_request", None), "node", None), "nodeid", None)
    return node_id if isinstance(node_id, str) and node_id else None


def format_chain(error: BaseException, tb: TracebackType | None) -> str:
    """``error``'s traceback, after those of the exceptions it came from
    (``raise ... from``, or raised while handling another), as Python prints it.

    zope.testrunner replaces ``traceback.format_exception`` with one that
    shows zope.exceptions' ``__traceback_info__`` (which Zope applications
    use), but leaves out the causes unless asked, shows only the first
    when asked, and leaves out the members of an exception group. Under
    it, each exception of the chain, and each member of a group, is
    formatted alone, and they are put together here.
    """
    if traceback.format_exception.__module__ == "traceback":  # Python's own
        return "".join(traceback.format_exception(type(error), error, tb))
    chain: list[tuple[BaseException, TracebackType | None, str]] = []
    seen: set[int] = set()
    current: BaseException | None = error
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, tb if current is error else current.__traceback__, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts = []
    for each, each_tb, link in reversed(chain):
        parts.append("".join(traceback.format_exception(type(each), each, each_tb, chain=False)))
        if _GROUP is not None and isinstance(each, _GROUP):
            members: tuple[BaseException, ...] = each.exceptions  # type: ignore[attr-defined]
            for number, member in enumerate(members, 1):
                text = format_chain(member, member.__traceback__)
                parts.append(f"+---------------- {number} ----------------\n" + textwrap.indent(text, "| "))
        if link:
            parts.append(link)
    return "".join(parts)


#: Exception groups' base class, from Python 3.11 on.
_GROUP: type[BaseException] | None = getattr(builtins, "BaseExceptionGroup", None)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


#: What an error a request of an earlier test raised begins with.
#: How the note on an error of a request an earlier test left running begins.
_LEFT_RUNNING = "(raised by a request that an earlier test"


def _left_running(test: str) -> str:
    """The note on an error raised by a request that ``test`` left running."""
    return (
        _LEFT_RUNNING + (f", {test}," if test else "")
        + " left running: the end of that test waited for it in vain, the layer's quiet_timeout)\n"
    )


class ErrorLog:
    """Server-side exceptions of the current test, safe to add to from any thread."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: Where the server listens (``host:port``), named in the errors
        #: raised; set by the layer once it serves.
        self.address = ""
        # Re-entrant: a garbage collection that starts while the lock is
        # held (any allocation may start one) can finalize a pending task
        # of a layer's event loop, whose error is recorded then, in the
        # same thread.
        self._lock = threading.RLock()
        self._errors: list[str] = []
        #: Says whether the thread recording serves a request that an
        #: earlier test left running: that test's name (or ""), else None
        #: (``Activity.left_running``).
        self.left_running: Callable[[], str | None] | None = None

    def _at(self) -> str:
        return f" at {self.address}" if self.address else ""

    def record(
        self, summary: str, exc_info: ExcInfo | None = None, *, left_running: Callable[[], str | None] | None = None
    ) -> None:
        """Remember an exception; the traceback is formatted right away so
        that no frames of the server thread are kept alive.

        ``left_running`` is the recording server's own ``left_running``:
        a server that ``tearDown`` left a request to may record after the
        layer was set up again, whose new server's (``self.left_running``)
        knows nothing of that request.
        """
        text = summary
        source = left_running or self.left_running
        left_by = source() if source is not None else None
        if left_by is not None:
            text = _left_running(left_by) + text
        if exc_info is not None:
            text += "\n" + format_chain(exc_info[1], exc_info[2])
        with self._lock:
            self._errors.append(text.rstrip())

    #: Set by the layer while its server runs: waits until no request of
    #: the test runs (at most the layer's ``quiet_timeout``).
    settle: Callable[[], object] | None = None

    def take(self) -> list[str]:
        """Return the recorded errors and forget them.

        A test that provokes a server error on purpose takes it, checks it,
        and so keeps it from failing the test. It first waits, as the end
        of the test does, until the test's requests are over: an
        application may raise after its client has the answer (Starlette
        and FastAPI answer 500, then raise), and the error would come after
        ``take()``, to fail the test.
        """
        settle = self.settle
        if settle is not None:
            settle()
        return self._take()

    def _take(self) -> list[str]:
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def clear(self) -> None:
        """Forget every recorded error, once the test's requests are over (``take``)."""
        self.take()

    def _clear(self) -> None:
        self._take()

    def check(self) -> None:
        """Raise ``ServerSideError`` if anything was recorded, and forget it."""
        errors = self._take()
        if not errors:
            return
        earlier = any(error.startswith(_LEFT_RUNNING) for error in errors)
        made_by = "during this test" if earlier else "made by this test"
        raise ServerSideError(
            f"{self.owner}: the server{self._at()} raised {_count(errors)} while handling requests"
            f" {made_by}:\n\n{_joined(errors)}\n\n"
            "Fix the server-side error. If the test provokes it on purpose,"
            " take it with layer.server_errors.take() and check it, or create"
            " the layer with report_server_errors=False."
        )

    def check_after_last_test(self) -> None:
        """Raise ``ServerSideError`` for what was recorded after the last
        test's end (the layer's tear-down), and forget it."""
        errors = self._take()
        if not errors:
            return
        raise ServerSideError(
            f"{self.owner}: the server{self._at()} raised {_count(errors)} after the layer's"
            f" last test ended, while handling requests made before its tear-down:\n\n{_joined(errors)}\n\n"
            "Fix the server-side error. A test that makes a request in the"
            " background should wait for its answer before it ends; create the"
            " layer with report_server_errors=False to ignore server errors."
        )


def _count(errors: list[str]) -> str:
    return "an exception" if len(errors) == 1 else f"{len(errors)} exceptions"


def _joined(errors: list[str]) -> str:
    return "\n\n".join(errors)


class _ServerLogger(logging.Logger):
    """A logger that ``logging.disable()`` does not silence: a suite that
    turns logging off to keep its output quiet must not turn off the
    layer's reports of server errors. (Outside the registry, a logger's
    cache of what is enabled would also keep what it found while logging
    was off: ``logging.disable`` and ``setLevel`` clear registered ones only.)"""

    def isEnabledFor(self, level: int) -> bool:
        return level >= self.getEffectiveLevel()


def server_logger(name: str, parent: logging.Logger | None = None) -> logging.Logger:
    """A logger of one server's own (or, given ``parent``, a part of it
    that logs through it), outside ``logging``'s registry.

    A registered logger would outlive its server, and pytest (since 9.1)
    adds its log capture to every registered logger that does not
    propagate: a failing test would show the server's traceback twice, in
    its failure and under "Captured log call". A server's logger never
    propagates to the root: a handler there printing to the terminal would
    print every server error, which the layer reports itself.
    """
    logger = _ServerLogger(name)
    if parent is None:
        logger.setLevel(logging.DEBUG if verbose() else logging.WARNING)
        logger.propagate = False
    else:
        logger.parent = parent
    return logger


class ErrorLogHandler(logging.Handler):
    """Turns a server library's error log records into server-side errors.

    waitress and aiosmtpd report an exception in the application or handler
    by logging it. This handler records every ERROR record, traceback
    included, in the layer's ``ErrorLog``, and echoes all records to stderr
    under ``$SERVERLAYER_VERBOSE``. Given ``thread_id``, it takes only the
    records logged on that thread: aiosmtpd logs every server through one
    module-wide logger.
    """

    def __init__(
        self, errors: ErrorLog, *, thread_id: int | None = None, left_running: Callable[[], str | None] | None = None
    ) -> None:
        super().__init__(logging.DEBUG)
        self.errors = errors
        self.thread_id = thread_id
        #: The server's own ``left_running`` (``ErrorLog.record``).
        self.left_running = left_running

    def emit(self, record: logging.LogRecord) -> None:
        if self.thread_id is not None and record.thread != self.thread_id:
            return
        if record.levelno >= logging.ERROR:
            exc_info = record.exc_info if record.exc_info and record.exc_info[0] else None
            self.errors.record(record.getMessage(), exc_info, left_running=self.left_running)  # type: ignore[arg-type]
        if verbose():
            sys.stderr.write(self.format(record) + "\n")
