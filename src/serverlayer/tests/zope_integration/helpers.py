"""What the Zope tests share: plain HTTP requests, and two in flight at once."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request


def fetch(url: str, *, data: bytes | None = None) -> tuple[int, bytes]:
    """Status and body of a GET (or, with ``data``, a POST), errors included."""
    try:
        with urllib.request.urlopen(url, data=data, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def fetch_together(url: str, count: int) -> list[tuple[int, bytes]]:
    """Make ``count`` requests from as many threads and return their results.

    The view at ``url`` waits on a ``threading.Barrier(count)``, so the
    requests are inside the application at the same time.
    """
    results: list[tuple[int, bytes]] = []
    clients = [threading.Thread(target=lambda: results.append(fetch(url))) for _ in range(count)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(15)
    return results
