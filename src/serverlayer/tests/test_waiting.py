"""Waiting for what a server does: the waiter wakes when it happens, not
when its timeout runs out (which would pass too, only late)."""

from __future__ import annotations

import threading
import time
import unittest

from serverlayer.arrivals import Arrivals
from serverlayer.server import Activity

#: Longer than any wait below takes when the waiter is woken; a waiter that
#: is not woken returns only at its timeout.
TIMEOUT = 60.0


class ArrivalsWaitTests(unittest.TestCase):

    def test_wait_for_wakes_when_the_item_arrives(self):
        arrivals: Arrivals[str] = Arrivals()
        arrivals.append("unrelated")
        appender = threading.Thread(target=arrivals.append, args=("wanted",))
        self.addCleanup(appender.join, 10)

        def wanted(item: str) -> bool:
            # First asked while the waiter holds the lock: the appender can
            # append only once the waiter waits.
            if not appender.is_alive() and appender.ident is None:
                appender.start()
            return item == "wanted"

        started = time.monotonic()
        self.assertEqual(arrivals.wait_for(match=wanted, timeout=TIMEOUT), ["wanted"])
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)


class ActivityWaitTests(unittest.TestCase):

    def test_wait_quiet_wakes_when_the_last_request_finishes(self):
        activity = Activity()
        busy = threading.Event()

        def request() -> None:
            activity.start()
            busy.set()
            deadline = time.monotonic() + 10
            while not activity._waiting and time.monotonic() < deadline:  # until the test waits
                time.sleep(0.001)
            activity.finish()

        worker = threading.Thread(target=request)
        worker.start()
        self.addCleanup(worker.join, 10)
        self.assertTrue(busy.wait(10))
        started = time.monotonic()
        self.assertTrue(activity.wait_quiet(TIMEOUT))
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)

    def test_wait_quiet_waits_for_every_request(self):
        activity = Activity()
        activity.start()  # this thread's request, never finished
        self.assertFalse(activity.wait_quiet(0.01))
        activity.finish()
        self.assertTrue(activity.wait_quiet(0.01))


class BusyTasksWaitTests(unittest.TestCase):

    def test_wait_empty_wakes_when_the_last_task_ends(self):
        from serverlayer.asgi import _BusyTasks

        tasks = _BusyTasks()
        task = object()  # stands for a request's asyncio task
        tasks.add(task)  # type: ignore[arg-type]

        def end() -> None:
            deadline = time.monotonic() + 10
            while not tasks.waiting and time.monotonic() < deadline:  # until the test waits
                time.sleep(0.001)
            tasks.discard(task)

        ender = threading.Thread(target=end)
        ender.start()
        self.addCleanup(ender.join, 10)
        started = time.monotonic()
        self.assertTrue(tasks.wait_empty(TIMEOUT))
        self.assertLess(time.monotonic() - started, TIMEOUT / 2)
        self.assertFalse(tasks)
