"""A thread-safe record of what a server received during the current test.

Servers append from their own threads while the test reads. ``wait_for``
blocks until what the test expects has arrived: mail is often sent, and
requests made, from a background thread or after the response the test
already has. When it times out, the error lists everything that did arrive.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Generic, TypeVar, overload

from serverlayer.errors import ConfigurationError, WaitTimeoutError
from serverlayer.matching import seconds

T = TypeVar("T")


def _checked_timeout(timeout: object) -> float:
    """``timeout`` in seconds; refuses NaN, which waited for ever (threading
    compares it with 0), and infinity and text, which threading raised on."""
    meaning = "wait_for() waits that many seconds, 0 or more"
    if timeout == math.inf:
        raise ConfigurationError(f"timeout={timeout!r}: {meaning}; write timeout=None to wait as long as it takes.")
    checked = seconds(timeout, setting="timeout", meaning=meaning,
                      otherwise="write timeout=None to wait as long as it takes")
    return min(checked, threading.TIMEOUT_MAX)


class Unread(Generic[T]):
    """An arrival as the server stored it, made into what tests see only
    when a test first reads it: the server answers its client sooner when
    it does no more than store what arrived."""

    __slots__ = ()

    def parse(self) -> T:
        raise NotImplementedError


class Arrivals(Sequence[T], Generic[T]):
    """Items in arrival order; each item has a one-line ``summary()``."""

    #: Used in messages: "3 message(s)", "1 request(s)".
    noun: ClassVar[str] = "item"
    timeout_error: ClassVar[type[WaitTimeoutError]] = WaitTimeoutError

    def __init__(self, owner: str = "") -> None:
        #: Who the items arrive at (a layer), named in messages.
        self.owner = owner
        self._items: list[T | Unread[T]] = []
        # Taken directly (not through the Condition, whose ``with`` is
        # Python code): servers append on every request.
        self._lock = threading.RLock()
        #: Made by the first ``wait_for``: a Condition costs a kilobyte,
        #: and most servers' logs are never waited on.
        self._changed: threading.Condition | None = None
        #: Threads in ``wait_for``; only they need waking.
        self._waiting = 0

    def append(self, item: T | Unread[T]) -> None:
        with self._lock:
            self._items.append(item)
            if self._waiting and self._changed is not None:
                self._changed.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _ready(self) -> list[T]:
        """The items as tests see them; called with the lock held."""
        items = self._items
        for index, item in enumerate(items):
            if isinstance(item, Unread):
                items[index] = item.parse()
        return items  # type: ignore[return-value]  # every item is parsed now

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        with self._lock:
            return self._ready()[index]

    def __iter__(self) -> Iterator[T]:
        with self._lock:
            return iter(list(self._ready()))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} with {len(self)} {self.noun}(s)>"

    def wait_for(
        self,
        count: int = 1,
        *,
        match: Callable[[T], bool] | None = None,
        timeout: float | None = 5.0,
    ) -> list[T]:
        """Wait until ``count`` items (matching ``match``, if given) arrived.

        Returns those items; raises ``timeout_error``, listing what did
        arrive, when they are not all there after ``timeout`` seconds.
        ``timeout=None`` waits as long as it takes (Ctrl-C still stops it).
        """

        self._check_wait(count, match)
        if timeout is not None:
            timeout = _checked_timeout(timeout)

        def matching() -> list[T]:
            return [item for item in self._ready() if match is None or match(item)]

        with self._lock:
            if self._changed is None:
                self._changed = threading.Condition(self._lock)
            self._waiting += 1
            try:
                arrived = self._changed.wait_for(lambda: len(matching()) >= count, timeout)
            finally:
                self._waiting -= 1
            found, everything = matching(), list(self._ready())
        if arrived:
            return found[:count]
        wanted = f"{count} {self.noun}(s)"
        if match is not None:
            wanted += f" matching {getattr(match, '__name__', match)}"
        listing = "\n".join(
            f"  {number}. {item.summary()}" for number, item in enumerate(everything, 1)  # type: ignore[attr-defined]
        )
        raise self.timeout_error(
            (f"{self.owner}: " if self.owner else "")
            + f"Waited {timeout} seconds for {wanted}; {len(found)} of them arrived,"
            f" {len(everything)} {self.noun}(s) in all" + (f":\n{listing}" if everything else ".")
            + self.why_missing()
        )

    def _check_wait(self, count: object, match: object) -> None:
        """Refuse, at the call, what ``wait_for`` cannot wait for. Otherwise
        ``match="bob@example.com"`` (as the SMTP layer's ``fail()`` takes it)
        waited the whole timeout and then said nothing matched, or raised
        TypeError once something came; a count of ``"2"`` raised from inside
        the wait, and one of 1.5 waited the whole timeout for a count no list
        reaches."""
        noun = self.noun
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError(
                f"wait_for(): count={count!r} must be a whole number of {noun}s, 0 or more, such as 2."
            )
        if match is not None and not callable(match):
            raise ConfigurationError(
                f"wait_for(): match={match!r} must be a function that takes a {noun} and returns"
                f" True for those to wait for, such as match=lambda {noun}: ..."
            )

    def why_missing(self) -> str:
        """What a timeout's message adds: what the server knows of items that did not arrive."""
        return ""
