"""serverlayer against all its peers on the same work, in one run, side by side.

Run from the checkout, after ``pip install -e '.[bench]'``::

    python benchmarks/bench_peers.py               # full run, three to four minutes, asgi 40 s more
    python benchmarks/bench_peers.py --quick       # smoke run, about a minute
    python benchmarks/bench_peers.py --only sweep  # the concurrency sweep alone, about 45 s
    python benchmarks/bench_peers.py --only asgi   # serverlayer.asgi against uvicorn alone, about 40 s

``--only`` takes a comma-separated list of the sections below (lifecycle, stalled,
http, transfer, smtp, asgi, sweep, memory) and runs those alone.

The peers, each used as its documentation shows, with its defaults:

- ``gocept``: gocept.httpserverlayer 4.0's wsgi, static and custom layers;
- ``localserver``: pytest-localserver's ``http.WSGIServer``,
  ``http.ContentServer`` and ``smtp.Server``, started and stopped without
  pytest (``start()``, ``stop()``);
- ``httpserver``: pytest-httpserver's ``HTTPServer`` (``start()``,
  ``stop()``, ``expect_request().respond_with_data()``);
- ``aiosmtpd``: a bare ``aiosmtpd.controller.Controller`` whose handler only
  stores each envelope, as in ``bench_smtp.py``;
- ``webtest``: WebTest's ``StopableWSGIServer.create(app)`` and
  ``shutdown()``, which plone.testing.zope's ``WSGIServer`` layer runs;
- ``uvicorn``: the uvicorn fixture users write by hand, for the asgi layer:
  ``uvicorn.Server(uvicorn.Config(app, host=..., port=0,
  log_level="warning", lifespan="on", ws="websockets-sansio"))``,
  its ``run`` on a thread, waited for until ``server.started`` (polled
  every millisecond), stopped with ``server.should_exit = True`` and a
  join; uvicorn's default HTTP protocol (httptools where installed, as
  with ``uvicorn[standard]`` and serverlayer's ``asgi`` extra, else h11)
  and websockets-sansio, as the asgi layer serves with by default, on a
  socket uvicorn binds itself.

It measures, for serverlayer and every peer that can do the work (``-``
where one cannot), in one process, interleaved round by round in an order
that rotates:

1. ``setUp`` + ``tearDown`` of each kind of layer against the peers' start
   and stop of their closest equivalent: wsgi (gocept wsgi, localserver
   WSGIServer, webtest), static and custom (gocept), content (httpserver,
   localserver ContentServer), smtp (aiosmtpd, localserver smtp) and https,
   the wsgi layer with ``tls=True`` (localserver WSGIServer and httpserver
   with an ``ssl_context`` from a trustme CA made beforehand; serverlayer's
   CA and certificate also exist before timing starts). Median of
   ``--rounds``; peers whose stop waits for a 0.5 s poll (gocept,
   localserver's and httpserver's HTTP servers) take part in only
   ``--slow-rounds`` of them, spread evenly, which keeps the run short.
   Then (``stalled``) the same stop, timed while four clients stall on
   the server: one inside its request line (for SMTP: its first command),
   one inside a header (an AUTH exchange), one inside a body (the message
   after DATA), one silent; over HTTPS the silent one stalls before its
   handshake, the others after it. Median of ``--stalled-rounds`` (polling
   peers: at most ``--slow-rounds``). A stop that has not returned after
   5 s has its clients hang up, which frees a stop that waits for them,
   and counts 5 s, a lower bound. The notes say which stops returned with
   a server thread still running or a stalled client still connected half
   a second later. Target: serverlayer under 100 ms for every kind, with
   every client let go and every thread ended.
2. requests/s of ``--requests`` GETs to the wsgi layer and its peers (the
   same WSGI application) and to the content layer and its peers (each
   programmed to answer the same body): sequentially with a new
   ``http.client`` connection and ``Connection: close`` for each request;
   sequentially over one keep-alive ``http.client.HTTPConnection`` (a
   server that closes makes http.client reconnect, which is part of what is
   measured); and from 8 client threads at once, each over its own
   keep-alive connection, sharing the same total. Median of ``--repeats``.
3. MiB/s of ``--downloads`` GETs of a 1 MiB file over one keep-alive
   connection: serverlayer's and gocept's static layers serve it from their
   directory, localserver's ContentServer from memory (median of
   ``--repeats``). A run of 200 takes about 0.15 s: shorter runs let one
   stall of the client or server thread decide the median.
4. messages/s of ``--messages`` small messages over one ``smtplib``
   connection and from 4 senders at once sharing the same total; after
   every run the script counts the mail that arrived.
5. ``asgi``: serverlayer.asgi's layer against the ``uvicorn`` fixture, both
   serving one raw ASGI application (``asgi_app``: ``BODY`` to any GET, a
   WebSocket echo, a lifespan that accepts startup and shutdown):
   ``setUp`` + ``tearDown`` (``--rounds``), with serverlayer's wsgi layer
   serving ``app`` in the same rounds as a yardstick; ``--requests`` GETs
   in the same three ways as the wsgi layer's; and round trips per second of
   ``--echoes`` small binary messages over one WebSocket connection of
   websockets' sync client (``websockets.sync.client.connect`` as a
   context manager, its defaults: permessage-deflate is negotiated with
   both), each echo checked, the handshake and closing untimed. Median of
   ``--repeats``. Targets: ``setUp`` + ``tearDown`` at least 50 times
   faster than uvicorn's and at most twice the wsgi layer's; GETs and
   echoes at least as many per second as uvicorn's (``>= 1x``).
6. the concurrency sweep (``sweep``): 1, 2, 8 and 32 clients at once, each
   a thread with its own keep-alive ``http.client.HTTPConnection``, sending
   GETs for ``--sweep-ms`` (a GET sent in time is waited for, however late
   its answer, up to 10 s beyond the run; a bounded number at most) to the
   wsgi, custom and content
   layers; once with the client threads in this process (``threads``) and
   once in a separate ``python -c`` process (``process``) that starts, waits
   for the word to go and reports every client's count as JSON on stdout.
   The peers that fit take part at 8 clients only, or at every count with
   ``--sweep-peers``: localserver WSGIServer, webtest and gocept wsgi;
   gocept custom; localserver ContentServer and httpserver. ``--sweep-runs``
   rounds (default 3, as every throughput row is the median of 3 runs) of
   a run each, the contenders' order rotating from count to count, each
   contender's servers started once per layer kind; the table shows, per
   contender, mode and count, the run with the median requests/s. For each: requests/s and how it
   compares with the same contender's 1-client rate in the same mode; CPU
   time per request, ``time.process_time`` of this process over the run (so
   for ``threads`` the clients' share is included, for ``process`` it is the
   server's alone); the fewest answers any client got and the mean per
   client; and the clients that failed: a timeout or a reset ends that
   client and is counted and noted, never raised. Targets, reported and not
   asserted: with 2, 8 and 32 clients every layer keeps at least 0.8x its
   own 1-client rate, and no client gets fewer than half the mean. The
   custom layers' handler answers over HTTP/1.1 in one write, so that their
   connections stay open too.
7. memory: for each contender a fresh ``python -c`` process starts one
   server and stops it again (so that lazy imports and first-use caches are
   paid), then sets up ``--servers`` at once and reports how much its
   resident set size (``VmRSS``) grew, layer or server objects included,
   and by how many threads; it tears them all down, in parallel, before it
   exits. One process per contender, one after the other, after the timed
   sections; one run each, since memory hardly varies with machine load.

The table shows every contender's median (the sweep has a table of its
own, a line per run, below it); ``best peer`` and ``slowest peer``
name the peer that does best and the one that does worst on the measure,
each with how many times better serverlayer does (above 1 serverlayer is
ahead). Targets: every set-up and tear-down at least 100 times faster than
the slowest peer and no slower than the fastest; every throughput ahead of
every peer; memory has none; the asgi section's are those of 5.
Everything listens on 127.0.0.1; what the servers print and log (werkzeug
logs every request) goes to a trap, not to the terminal. The script is a report, not a test: it exits 0 whether
targets are met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import math
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import _http
import _timing
from _http import BODY, HOST, TIMEOUT, Handler, app

#: The file of the transfer measure.
FILE_SIZE = 1024 * 1024
LIFECYCLE_SLOWEST_RATIO = 100.0
LIFECYCLE_BEST_RATIO = 1.0
HTTP_CLIENTS = 8
SMTP_SENDERS = 4
#: Seconds a thread a server left behind may take to end before it counts as left running.
THREAD_GRACE = 0.05
#: Seconds a memory process may take.
CHILD_TIMEOUT = 120.0
#: The table's columns of medians, serverlayer first; the module docstring says what each peer runs.
PACKAGES = ("serverlayer", "gocept", "localserver", "httpserver", "aiosmtpd", "webtest", "uvicorn")
LOGGERS = ("mail.log", "asyncio", "werkzeug", "waitress")
T = TypeVar("T")
COUNTS = (
    _timing.Count("rounds", 20, 3, "setUp+tearDown rounds per layer kind"),
    _timing.Count("slow-rounds", 5, 1, "of those, the rounds peers whose stop polls every 0.5 s take part in"),
    _timing.Count("stalled-rounds", 5, 1, "tearDown rounds with stalled clients per layer kind"),
    _timing.Count("requests", 2000, 200, "GETs per HTTP throughput run"),
    _timing.Count("downloads", 200, 20, "1 MiB downloads per transfer run"),
    _timing.Count("messages", 500, 100, "messages per SMTP throughput run"),
    _timing.Count("echoes", 2000, 200, "WebSocket echo round trips per asgi throughput run"),
    _timing.Count("repeats", 3, 2, "throughput runs per contender"),
    _timing.Count("servers", 50, 5, "servers set up at once per memory process"),
    _timing.Count("sweep-ms", 1000, 100, "milliseconds each client of a concurrency sweep run sends GETs"),
    _timing.Count("sweep-runs", 3, 1, "sweep runs per contender, mode and client count; the table shows the median"),
)
#: The measures, in the order they run; ``--only`` picks some.
SECTIONS = ("lifecycle", "stalled", "http", "transfer", "smtp", "asgi", "sweep", "memory")

try:
    import gocept.httpserverlayer.custom as gocept_custom
    import gocept.httpserverlayer.static as gocept_static
    import gocept.httpserverlayer.wsgi as gocept_wsgi
    import pytest_httpserver  # type: ignore[import-not-found, import-untyped, unused-ignore]
    import pytest_localserver.http  # type: ignore[import-not-found, import-untyped, unused-ignore]
    import pytest_localserver.smtp  # type: ignore[import-not-found, import-untyped, unused-ignore]
    import trustme
    import uvicorn
    import websockets.sync.client
    import webtest.http  # type: ignore[import-not-found, import-untyped, unused-ignore]

    import bench_smtp
    import serverlayer.asgi
    import serverlayer.content
    import serverlayer.custom
    import serverlayer.smtp
    import serverlayer.static
    import serverlayer.wsgi
    from bench_smtp import Sent, arrived
except ImportError as exc:
    _timing.missing_extras("bench_peers", exc)


# What every contender offers: a server that starts and stops.


def _nothing() -> None:
    pass


def _fixed_body(body: bytes) -> str:
    """``provide`` of a server that answers ``BODY`` to any path."""
    if body != BODY:
        raise ValueError("this server only answers BODY")
    return "/"


@dataclass
class Running:
    """A started server: where it listens, how to stop it, how to use it."""

    port: int
    stop: Callable[[], None]
    #: Makes the server answer ``body``; returns the path to GET it from.
    provide: Callable[[bytes], str] = _fixed_body
    #: Forgets the requests or mail the server recorded (between runs, untimed).
    clear: Callable[[], None] = _nothing
    #: How many messages arrived (SMTP servers).
    received: Callable[[], int] | None = None
    #: What a client verifies the certificate with (HTTPS servers).
    context: ssl.SSLContext | None = None

    def gets(self, path: str, expected: bytes, requests: int) -> int:
        """``_http.gets`` from this server; returns the connects it took."""
        return _http.gets(self.port, self.context, path, expected, requests)


class Startable:
    """A server a contender starts and stops again, as its users do."""

    def prepare(self) -> None:
        """Untimed work before each start (finding a free port); most need none."""

    def start(self) -> Running:
        """Start the server; return once it serves."""
        raise NotImplementedError


@dataclass
class Contender:
    package: str
    #: Makes a fresh startable; the number tells apart layers' names.
    make: Callable[[int], Startable]
    #: Its stop waits for a 0.5 s poll, so it runs ``--slow-rounds`` only.
    polls: bool = False


class PeerTLS:
    """The peers' certificate: a trustme CA made once, outside any timing."""

    _made: PeerTLS | None = None

    def __init__(self) -> None:
        authority = trustme.CA()
        certificate = authority.issue_cert(HOST, "localhost")
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(self.server)
        self.client = ssl.create_default_context()
        authority.configure_trust(self.client)

    @classmethod
    def get(cls) -> PeerTLS:
        if cls._made is None:
            cls._made = cls()
        return cls._made


# serverlayer's and gocept's layers: one object, set up and torn down again.


class LayerServer(Startable):
    """A plone.testing layer whose ``setUp`` starts its server."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def start(self) -> Running:
        self.layer.setUp()
        return self.running()

    def running(self) -> Running:
        layer = self.layer
        requests = getattr(layer, "requests", None)  # serverlayer's request log
        return Running(
            layer["http_port"],
            layer.tearDown,
            clear=_nothing if requests is None else requests.clear,
            context=layer.get("ssl_context"),
        )


class StaticLayerServer(LayerServer):
    def running(self) -> Running:
        running = super().running()
        root = self.layer["documentroot"]

        def provide(body: bytes) -> str:
            return _http.provide_file(root, body, "index.txt" if body == BODY else "file.bin")

        running.provide = provide
        return running


class ContentLayerServer(LayerServer):
    def running(self) -> Running:
        running = super().running()
        content = self.layer["http_content"]
        served: list[bytes] = []

        def provide(body: bytes) -> str:
            served[:] = [body]
            content.serve_content(body)
            return "/"

        def clear() -> None:
            self.layer.requests.clear()
            content.reset()  # also forgets the requests it matched
            if served:
                content.serve_content(served[0])

        running.provide, running.clear = provide, clear
        return running


class SMTPLayerServer(LayerServer):
    def running(self) -> Running:
        layer = self.layer
        outbox = layer["outbox"]
        return Running(layer["smtp_port"], layer.tearDown, clear=outbox.clear, received=lambda: len(outbox))


def serverlayer_layer(kind: str, number: int) -> Startable:
    name = f"BENCH_PEERS_{kind.upper()}_{number}"
    if kind == "wsgi":
        return LayerServer(serverlayer.wsgi.Layer(app, name=name, host=HOST))
    if kind == "https":
        return LayerServer(serverlayer.wsgi.Layer(app, name=name, host=HOST, tls=True))
    if kind == "static":
        return StaticLayerServer(serverlayer.static.Layer(name=name, host=HOST))
    if kind == "custom":
        return LayerServer(serverlayer.custom.Layer(Handler, name=name, host=HOST))
    if kind == "content":
        return ContentLayerServer(serverlayer.content.Layer(name=name, host=HOST))
    if kind == "smtp":
        return SMTPLayerServer(serverlayer.smtp.Layer(name=name, host=HOST))
    if kind == "asgi":
        return LayerServer(serverlayer.asgi.Layer(asgi_app, name=name, host=HOST))
    raise ValueError(kind)


def gocept_layer(kind: str, number: int) -> Startable:
    name = f"BENCH_PEERS_GOCEPT_{kind.upper()}_{number}"
    if kind == "wsgi":
        # The peer's wsgi layer takes its host from here only.
        os.environ["GOCEPT_HTTP_APP_HOST"] = HOST
        layer = gocept_wsgi.Layer(name=name)
        layer.wsgi_app = app
        return LayerServer(layer)
    if kind == "static":
        layer = gocept_static.Layer(name=name)
        layer.host = HOST
        return StaticLayerServer(layer)
    if kind == "custom":
        layer = gocept_custom.Layer(Handler, name=name)
        layer.host = HOST
        return LayerServer(layer)
    raise ValueError(kind)


# The other peers: a new server object for every start, as their users make one.


class TLSPeer(Startable):
    """A peer that serves HTTPS with the peers' certificate when made with ``tls``."""

    def __init__(self, tls: bool = False) -> None:
        self.tls = PeerTLS.get() if tls else None

    @property
    def server_context(self) -> ssl.SSLContext | None:
        """What the server presents; None, the servers' default, for plain HTTP."""
        return None if self.tls is None else self.tls.server

    @property
    def client_context(self) -> ssl.SSLContext | None:
        return None if self.tls is None else self.tls.client


class LocalserverWSGI(TLSPeer):
    def start(self) -> Running:
        server = pytest_localserver.http.WSGIServer(host=HOST, application=app, ssl_context=self.server_context)
        server.start()
        return Running(server.server_address[1], server.stop, context=self.client_context)


class LocalserverContent(Startable):
    def start(self) -> Running:
        server = pytest_localserver.http.ContentServer(host=HOST)
        server.start()

        def provide(body: bytes) -> str:
            server.serve_content(body)
            return "/"

        return Running(server.server_address[1], server.stop, provide=provide, clear=server.requests.clear)


class LocalserverSMTP(Startable):
    def start(self) -> Running:
        server = pytest_localserver.smtp.Server(host=HOST)
        server.start()
        outbox = server.outbox
        return Running(server.port, server.stop, clear=outbox.clear, received=lambda: len(outbox))


class Httpserver(TLSPeer):
    def start(self) -> Running:
        server = pytest_httpserver.HTTPServer(host=HOST, ssl_context=self.server_context)
        server.start()

        def provide(body: bytes) -> str:
            server.expect_request("/").respond_with_data(body)
            return "/"

        return Running(server.port, server.stop, provide=provide, clear=server.clear_log, context=self.client_context)


class AiosmtpdController(Startable):
    """bench_smtp's peer: a Controller, on a port found free beforehand, whose handler stores each envelope."""

    def __init__(self) -> None:
        self.peer = bench_smtp.Peer()

    def prepare(self) -> None:
        self.peer.prepare()

    def start(self) -> Running:
        peer = self.peer
        peer.start()
        envelopes = peer["outbox"]
        return Running(peer.port, peer.controller.stop, clear=envelopes.clear, received=lambda: len(envelopes))


class WebtestServer(Startable):
    def start(self) -> Running:
        # As plone.testing.zope's WSGIServer layer makes it.
        server = webtest.http.StopableWSGIServer.create(app, host=HOST, clear_untrusted_proxy_headers=False)
        return Running(int(server.effective_port), server.shutdown)


# The asgi section's application and peer.


async def asgi_app(
    scope: serverlayer.asgi.Scope, receive: serverlayer.asgi.Receive, send: serverlayer.asgi.Send
) -> None:
    """The ASGI 3 application of the asgi section, raw: answers ``BODY`` to
    any GET, as ``app`` does; echoes every WebSocket message; accepts its
    lifespan's startup and shutdown."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
            else:
                await send({"type": "websocket.send", "text": message["text"]})


#: Seconds the uvicorn peer may take to start, and its thread to end once told to stop.
UVICORN_TIMEOUT = 10.0
#: How often the uvicorn peer looks whether its server started, as users' fixtures do.
UVICORN_POLL = 0.001


class UvicornThread(Startable):
    """The uvicorn fixture users write by hand: ``uvicorn.Server(config).run``
    on a thread, waited for until ``server.started``, stopped with
    ``server.should_exit = True`` and a join. uvicorn's default HTTP
    protocol (httptools where installed) and websockets-sansio, the ones
    serverlayer.asgi serves with by default; a
    port of its own choosing (0), lifespan on. The thread is a daemon only
    so that a stop that never ends cannot keep the benchmark from exiting;
    a stop still waits for it to end (``UVICORN_TIMEOUT``, then it fails)."""

    def start(self) -> Running:
        config = uvicorn.Config(
            asgi_app,
            host=HOST,
            port=0,
            log_level="warning",
            lifespan="on",
            ws="websockets-sansio",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="bench_peers uvicorn", daemon=True)

        def stop() -> None:
            server.should_exit = True
            thread.join(UVICORN_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError(f"uvicorn's thread was still running {UVICORN_TIMEOUT:g} s after should_exit")

        thread.start()
        try:
            deadline = time.monotonic() + UVICORN_TIMEOUT
            while not server.started:
                if not thread.is_alive():
                    raise RuntimeError("uvicorn's thread ended before its server started")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start within {UVICORN_TIMEOUT:g} s")
                time.sleep(UVICORN_POLL)
            port = server.servers[0].sockets[0].getsockname()[1]
        except BaseException:
            stop()
            raise
        return Running(port, stop)


def contenders(kind: str) -> list[Contender]:
    """serverlayer first, then the peers that have an equivalent of ``kind``."""
    ours = Contender("serverlayer", lambda number: serverlayer_layer(kind, number))
    peers = {
        "wsgi": [
            Contender("gocept", lambda number: gocept_layer("wsgi", number), polls=True),
            Contender("localserver", lambda number: LocalserverWSGI(), polls=True),
            Contender("webtest", lambda number: WebtestServer()),
        ],
        "static": [Contender("gocept", lambda number: gocept_layer("static", number), polls=True)],
        "custom": [Contender("gocept", lambda number: gocept_layer("custom", number), polls=True)],
        "content": [
            Contender("localserver", lambda number: LocalserverContent(), polls=True),
            Contender("httpserver", lambda number: Httpserver(), polls=True),
        ],
        "smtp": [
            Contender("localserver", lambda number: LocalserverSMTP()),
            Contender("aiosmtpd", lambda number: AiosmtpdController()),
        ],
        "https": [
            Contender("localserver", lambda number: LocalserverWSGI(tls=True), polls=True),
            Contender("httpserver", lambda number: Httpserver(tls=True), polls=True),
        ],
        "asgi": [Contender("uvicorn", lambda number: UvicornThread())],
    }[kind]
    return [ours, *peers]


KINDS = ("wsgi", "static", "custom", "content", "smtp", "https")
#: The transfer measure's contenders: (package, kind).
TRANSFER = (("serverlayer", "static"), ("gocept", "static"), ("localserver", "content"))


# The table.


@dataclass(frozen=True)
class PeerRow:
    """One measure: every contender's median, and what serverlayer aims for."""

    measure: str
    values: Mapping[str, float]
    #: Formats a value for its cell.
    unit: str
    higher_is_better: bool
    #: "lifecycle", "stalled", "throughput", "asgi lifecycle", "level" or None.
    target: str | None
    #: False when serverlayer lost mail, or kept a stalled client or a
    #: thread: the target is then missed whatever the figure.
    valid: bool = True
    #: For "asgi lifecycle": the median of serverlayer's wsgi layer in the
    #: same rounds, which the asgi layer aims to stay close to.
    reference: float | None = None

    def ratio(self, package: str) -> float:
        """How many times better serverlayer does than ``package`` (> 1 is better)."""
        ours, theirs = self.values["serverlayer"], self.values[package]
        if self.higher_is_better:
            return ours / theirs if theirs else float("inf")
        return theirs / ours if ours else float("inf")

    def peers(self) -> list[str]:
        return [package for package in PACKAGES[1:] if package in self.values]

    def best_and_slowest(self) -> tuple[str, str] | None:
        if "serverlayer" not in self.values or not self.peers():
            return None
        ranked = sorted(self.peers(), key=self.ratio)
        return ranked[0], ranked[-1]

    def met(self) -> bool | None:
        if self.target is not None and "serverlayer" not in self.values:
            return False  # serverlayer failed
        extremes = self.best_and_slowest()
        if self.target is None or extremes is None:
            return None
        best, slowest = extremes
        if self.target == "stalled":
            return self.valid and self.values["serverlayer"] < STALLED_TARGET_MS
        if self.target == "lifecycle":
            return self.ratio(slowest) >= LIFECYCLE_SLOWEST_RATIO and self.ratio(best) >= LIFECYCLE_BEST_RATIO
        if self.target == "asgi lifecycle":
            return (
                self.ratio(slowest) >= ASGI_SLOWEST_RATIO
                and self.reference is not None
                and self.values["serverlayer"] <= ASGI_WSGI_FACTOR * self.reference
            )
        if self.target == "level":
            return self.valid and self.ratio(best) >= 1
        return self.valid and self.ratio(best) > 1

    def target_text(self) -> str:
        if self.target == "lifecycle":
            return f">= {LIFECYCLE_SLOWEST_RATIO:g}x slowest, >= {LIFECYCLE_BEST_RATIO:g}x best"
        if self.target == "throughput":
            return "> 1x best"
        if self.target == "asgi lifecycle":
            return f">= {ASGI_SLOWEST_RATIO:g}x slowest, <= {ASGI_WSGI_FACTOR:g}x wsgi"
        if self.target == "level":
            return ">= 1x best"
        if self.target == "stalled":
            return f"< {STALLED_TARGET_MS:g} ms, all let go"
        return "-"

    @classmethod
    def rate(
        cls, measure: str, values: Mapping[str, float], unit: str, valid: bool = True, target: str = "throughput"
    ) -> PeerRow:
        """A throughput measure: more per second is better, and serverlayer
        aims to lead (``target`` "level": to keep up)."""
        return cls(measure, values, unit, higher_is_better=True, target=target, valid=valid)


def format_value(value: float, unit: str) -> str:
    if unit in ("ms", "MiB"):
        return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    return f"{value:,.0f}"


def peer_table(rows: Sequence[PeerRow]) -> list[str]:
    header = ("measure", *PACKAGES, "best peer", "slowest peer", "target", "met")
    lines = [header]
    for row in rows:
        extremes = row.best_and_slowest()
        met = row.met()
        lines.append(
            (
                f"{row.measure} ({row.unit})",
                *(format_value(row.values[p], row.unit) if p in row.values else "-" for p in PACKAGES),
                *(("-", "-") if extremes is None else (f"{p} {row.ratio(p):.2f}x" for p in extremes)),
                row.target_text(),
                "-" if met is None else "yes" if met else "NO",
            )
        )
    return _timing.columns(lines, right_aligned=set(range(1, 1 + len(PACKAGES))))


# Shared machinery.


@dataclass
class Notes:
    """What goes below the table."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def failed(self, name: str, what: str, error: BaseException) -> None:
        self.add(f"FAILED, {name}, {what}: {type(error).__name__}: {str(error)[:200]}")


class Guard:
    """Keeps one contender's failure from ending the run: its measurements
    become NaN, the notes say why, and its column shows ``-``."""

    def __init__(self, what: str, notes: Notes) -> None:
        self.what = what
        self.notes = notes
        self.failed: set[str] = set()

    def __call__(self, name: str, measure: _timing.Measurement) -> _timing.Measurement:
        def guarded() -> float:
            if name in self.failed:
                return math.nan
            try:
                return measure()
            except Exception as exc:
                self.failed.add(name)
                self.notes.failed(name, self.what, exc)
                return math.nan

        return guarded

    def medians(self, results: Mapping[str, Sequence[float]]) -> dict[str, float]:
        return {name: _timing.median(values) for name, values in results.items() if name not in self.failed}


def rates(
    what: str,
    running: Mapping[str, Running],
    names: Iterable[str],
    run: Callable[[str, Running], float],
    repeats: int,
    quiet: _timing.OutputTrap,
    notes: Notes,
    per: tuple[int, str] | None = None,
) -> dict[str, float]:
    """The median of ``repeats`` interleaved ``run(name, server)`` for each
    of ``names``, each run after the server forgot what it recorded (untimed).
    A server whose run fails is named in the notes and left out.

    With ``per`` (how many of what one run does: ``(2000, "GET")``), the
    notes also tell this process's median CPU time for each, clients
    included: a steadier measure than a rate, which the scheduling of
    the client's and the server's threads sways from run to run.
    """
    cpu: dict[str, list[float]] = {name: [] for name in names}

    def measure(name: str) -> _timing.Measurement:
        def once() -> float:
            item = running[name]
            item.clear()
            with quiet():
                start = time.process_time()
                rate = run(name, item)
                cpu[name].append(time.process_time() - start)
                return rate

        return once

    guard = Guard(what, notes)
    results = _timing.interleaved({name: guard(name, measure(name)) for name in names}, repeats)
    medians = guard.medians(results)
    # Two contenders whose runs overlap are level, whatever their medians say.
    notes.add(
        f"{what}, lowest to highest of {repeats} runs: "
        + ", ".join(f"{name} {min(results[name]):,.0f}-{max(results[name]):,.0f}" for name in medians)
    )
    if per is not None:
        count, unit = per
        notes.add(
            f"{what}, median CPU time of this process per {unit}, clients included: "
            + ", ".join(f"{name} {_timing.median(cpu[name]) / count * 1e6:,.0f} us" for name in medians)
        )
    return medians


def gets_new_connection(running: Running, path: str, expected: bytes, requests: int) -> int:
    """``requests`` sequential GETs, each on a connection of its own."""
    for _ in range(requests):
        client = _http.connection(running.port, running.context)
        try:
            client.request("GET", path, headers={"Connection": "close"})
            response = client.getresponse()
            _http.check(running.port, response, response.read(), expected)
        finally:
            client.close()
    return requests


def gets_concurrently(running: Running, path: str, expected: bytes, requests: int) -> float:
    """``requests`` GETs from ``HTTP_CLIENTS`` threads, each over its own
    keep-alive connection; returns the seconds from their start to the last one's end."""
    shares = [requests // HTTP_CLIENTS + (number < requests % HTTP_CLIENTS) for number in range(HTTP_CLIENTS)]
    return _timing.in_threads([functools.partial(running.gets, path, expected, share) for share in shares])


@contextlib.contextmanager
def started(
    servers: Mapping[str, Startable], quiet: _timing.OutputTrap, notes: Notes, what: str
) -> Iterator[dict[str, Running]]:
    """Start every server; stop them all again at the end. One that fails
    to start or stop is named in the notes and left out."""
    running: dict[str, Running] = {}
    try:
        for name, server in servers.items():
            try:
                with quiet():
                    server.prepare()
                    running[name] = server.start()
            except Exception as exc:
                notes.failed(name, f"{what}, starting", exc)
        yield running
    finally:
        for name, item in reversed(list(running.items())):
            try:
                with quiet():
                    item.stop()
            except Exception as exc:
                notes.failed(name, f"{what}, stopping", exc)


def on_each(
    running: Mapping[str, Running],
    action: Callable[[Running], T],
    quiet: _timing.OutputTrap,
    notes: Notes,
    what: str,
) -> dict[str, T]:
    """``action`` on every server, output trapped; one whose action fails is
    named in the notes (as ``what``) and left out. Returns what the action
    returned for each of the others."""
    done = {}
    for name, item in running.items():
        try:
            with quiet():
                done[name] = action(item)
        except Exception as exc:
            notes.failed(name, what, exc)
    return done


def serve_once(item: Running) -> None:
    """Receive one message, or answer one GET; raise if the server does not."""
    if item.received is not None:
        bench_smtp.check_receives(item.port, item.received, timeout=SMTP_TIMEOUT)
    else:
        item.gets(item.provide(BODY), BODY, 1)


def check_serves(
    kind: str, servers: Mapping[str, Startable], quiet: _timing.OutputTrap, notes: Notes
) -> dict[str, Startable]:
    """Start, answer once, stop: a warm-up that proves each contender does
    the work. Returns those that did."""
    working = {}
    for name, server in servers.items():
        with started({name: server}, quiet, notes, f"{kind} warm-up") as running:
            if on_each(running, serve_once, quiet, notes, f"{kind} warm-up"):
                working[name] = server
    return working


def warm_up(
    running: Mapping[str, Running], body: bytes, requests: int, quiet: _timing.OutputTrap, notes: Notes, what: str
) -> dict[str, str]:
    """Make each server answer ``body`` and GET it a few times; returns the
    path for each server that did."""

    def provide_and_get(item: Running) -> str:
        path = item.provide(body)
        item.gets(path, body, requests)
        return path

    return on_each(running, provide_and_get, quiet, notes, f"{what}, warm-up")


def threads_left_running(before: set[threading.Thread]) -> bool:
    """Whether a thread started since ``before`` is still running
    ``THREAD_GRACE`` seconds from now."""
    new = [thread for thread in threading.enumerate() if thread not in before]
    for thread in new:
        thread.join(THREAD_GRACE)
    return any(thread.is_alive() for thread in new)


# 1. setUp + tearDown.


def bench_lifecycle(
    kind: str,
    servers: Mapping[str, Startable],
    polling: set[str],
    arguments: argparse.Namespace,
    quiet: _timing.OutputTrap,
    notes: Notes,
) -> PeerRow:
    left: dict[str, int] = {}
    cpu: dict[str, list[float]] = {name: [] for name in servers}

    def cycle(name: str, server: Startable) -> _timing.Measurement:
        def measure() -> float:
            with quiet():
                server.prepare()
                before = set(threading.enumerate())
                start_cpu = time.process_time()
                milliseconds = _timing.elapsed(lambda: server.start().stop()) * 1000
                cpu[name].append((time.process_time() - start_cpu) * 1000)
                still_running = threads_left_running(before)
            if still_running:
                left[name] = left.get(name, 0) + 1
            return milliseconds

        return measure

    servers = check_serves(kind, servers, quiet, notes)
    guard = Guard(f"{kind} setUp+tearDown", notes)
    results = _timing.interleaved(
        {name: guard(name, cycle(name, server)) for name, server in servers.items()},
        arguments.rounds,
        fewer={name: arguments.slow_rounds for name in servers if name in polling},
    )
    for name, count in left.items():
        notes.add(
            f"{name} {kind}: stop returned with a thread still running {THREAD_GRACE * 1000:g} ms later"
            f" in {count} of {len(results[name])} rounds"
        )
    notes.add(
        f"{kind} setUp+tearDown, median CPU time of this process, all threads (ms; other processes"
        " hardly change it): "
        + ", ".join(f"{name} {_timing.median(cpu[name]):.2f}" for name in guard.medians(results))
    )
    return PeerRow(
        f"{kind} setUp+tearDown",
        guard.medians(results),
        "ms",
        higher_is_better=False,
        target="lifecycle",
    )


# 1b. tearDown with stalled clients connected.

#: What each stalled client sends before it goes silent, per protocol: one
#: stalled inside the request line (for SMTP: its first command), one inside
#: a header (an AUTH exchange), one inside a body (the message after DATA),
#: and one that says nothing more. Each first proves that the server took
#: it up: an HTTP client gets an answer to a whole request, an SMTP client
#: the greeting (on a server that closes each connection after its answer,
#: the HTTP client then stalls on a new connection).
STALLS = {
    "http": (
        b"GET /stalled HT",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: ",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf of it",
        b"",
    ),
    "smtp": (
        b"HELO half-a-comm",
        b"EHLO x\r\nAUTH PLAIN\r\n",
        b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: stalled\r\n\r\nha",
        b"",
    ),
}
#: Seconds a stop may take with stalled clients before they are made to
#: hang up (which frees a stop that waits for them) and it counts as hung.
STALLED_STOP_BOUND = 5.0
#: Seconds a stalled client waits, after the stop returned, to see its connection closed.
LET_GO_WAIT = 0.5
#: serverlayer's target for a tearDown with stalled clients connected.
STALLED_TARGET_MS = 100.0


def stall(running: Running, kind: str) -> list[socket.socket]:
    """Connect a client per ``STALLS`` entry, once the server took it up
    leave it stalled."""
    clients: list[socket.socket] = []

    def connect(handshake: bool) -> socket.socket:
        clients.append(socket.create_connection((HOST, running.port), timeout=STALLED_STOP_BOUND))
        if handshake and running.context is not None:
            clients[-1] = running.context.wrap_socket(clients[-1], server_hostname=HOST)
        return clients[-1]

    try:
        for data in STALLS["smtp" if kind == "smtp" else "http"]:
            try:
                sock = connect(handshake=True)
                if kind != "smtp":
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = sock.recv(65536)
                if answer.startswith(b"HTTP/1.0"):
                    # The server closes every connection after its answer
                    # (no keep-alive): this client stalls on a new one.
                    clients.pop().close()
                    sock = connect(handshake=bool(data))
            except TimeoutError:
                raise RuntimeError(
                    f"client {len(clients)} got no answer in {STALLED_STOP_BOUND:g} s while"
                    f" {len(clients) - 1} other(s) stalled: the server serves one connection at a time"
                ) from None
            if not answer.startswith(b"220" if kind == "smtp" else b"HTTP/"):
                raise RuntimeError(f"client {len(clients)} got {answer[:50]!r} instead of an answer")
            sock.sendall(data)
    except BaseException:
        for sock in clients:
            sock.close()
        raise
    return clients


def let_go(clients: Sequence[socket.socket]) -> int:
    """How many of ``clients`` see their connection closed within ``LET_GO_WAIT``
    (whatever the server said before closing it)."""
    deadline = time.monotonic() + LET_GO_WAIT
    closed = 0
    for sock in clients:
        try:
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                if not sock.recv(65536):
                    break
        except TimeoutError:
            continue
        except OSError:
            pass  # reset: closed too
        closed += 1
    return closed


@dataclass
class StalledStops:
    """What the stops with stalled clients did, per contender, besides their time."""

    rounds: Counter[str] = field(default_factory=Counter)
    hung: Counter[str] = field(default_factory=Counter)
    #: Rounds in which a thread the server started was still running when stop returned.
    threads_left: Counter[str] = field(default_factory=Counter)
    #: Stalled clients whose connection was still open after stop returned.
    clients_held: Counter[str] = field(default_factory=Counter)

    def clean(self, name: str) -> bool:
        return not (self.hung[name] or self.threads_left[name] or self.clients_held[name])


def bench_stalled(
    kind: str,
    servers: Mapping[str, Startable],
    polling: set[str],
    arguments: argparse.Namespace,
    quiet: _timing.OutputTrap,
    notes: Notes,
) -> PeerRow:
    stops = StalledStops()

    def cycle(name: str, server: Startable) -> _timing.Measurement:
        def measure() -> float:
            with quiet():
                server.prepare()
                before = set(threading.enumerate())
                running = server.start()
                try:
                    clients = stall(running, kind)
                except BaseException:
                    running.stop()  # stall() let its clients go: this stop has nothing to wait for
                    raise
                stopper = threading.Thread(target=running.stop, name=f"bench_peers stop of {name}", daemon=True)
                try:
                    started = time.perf_counter()
                    stopper.start()
                    stopper.join(STALLED_STOP_BOUND)
                    milliseconds = (time.perf_counter() - started) * 1000
                    stops.rounds[name] += 1
                    if stopper.is_alive():
                        stops.hung[name] += 1
                    else:
                        stops.threads_left[name] += threads_left_running(before | {stopper})
                        stops.clients_held[name] += len(clients) - let_go(clients)
                finally:
                    for sock in clients:
                        sock.close()
                stopper.join(30)
            return milliseconds

        return measure

    servers = check_serves(kind, servers, quiet, notes)
    guard = Guard(f"{kind} tearDown, stalled clients", notes)
    results = _timing.interleaved(
        {name: guard(name, cycle(name, server)) for name, server in servers.items()},
        arguments.stalled_rounds,
        fewer={name: min(arguments.slow_rounds, arguments.stalled_rounds) for name in servers if name in polling},
    )
    for name, rounds in stops.rounds.items():
        if stops.clean(name):
            continue
        found = []
        if stops.hung[name]:
            found.append(
                f"stop had not returned after {STALLED_STOP_BOUND:g} s in {stops.hung[name]} (it returned"
                " once the clients hung up; the cell is a lower bound)"
            )
        if stops.threads_left[name]:
            found.append(f"stop returned with a thread still running in {stops.threads_left[name]}")
        if stops.clients_held[name]:
            found.append(
                f"{stops.clients_held[name]} stalled clients still connected {LET_GO_WAIT:g} s after stop returned"
            )
        notes.add(f"{name} {kind}, stalled clients, in {rounds} rounds: " + "; ".join(found))
    medians = guard.medians(results)
    return PeerRow(
        f"{kind} tearDown, {len(STALLS['smtp' if kind == 'smtp' else 'http'])} stalled clients",
        medians,
        "ms",
        higher_is_better=False,
        target="stalled",
        valid=stops.clean("serverlayer"),
    )


# 2. HTTP requests per second.

#: Label in the table, run: (running, path, requests) -> (seconds, connects or None).
HTTPMode = tuple[str, Callable[[Running, str, int], tuple[float, int | None]]]


def _new_connections(running: Running, path: str, requests: int) -> tuple[float, int | None]:
    return _timing.elapsed(lambda: gets_new_connection(running, path, BODY, requests)), None


def _keep_alive(running: Running, path: str, requests: int) -> tuple[float, int | None]:
    connects, seconds = _timing.timed(lambda: running.gets(path, BODY, requests))
    return seconds, connects


def _concurrent(running: Running, path: str, requests: int) -> tuple[float, int | None]:
    return gets_concurrently(running, path, BODY, requests), None


HTTP_MODES: tuple[HTTPMode, ...] = (
    ("new connection each", _new_connections),
    ("one keep-alive conn.", _keep_alive),
    (f"{HTTP_CLIENTS} client threads", _concurrent),
)


def connects_note(what: str, connects: Mapping[str, int]) -> str:
    return f"{what}: " + ", ".join(f"{name} {count}" for name, count in connects.items())


def bench_http_throughput(
    kind: str,
    servers: Mapping[str, Startable],
    arguments: argparse.Namespace,
    quiet: _timing.OutputTrap,
    notes: Notes,
    target: str = "throughput",
) -> list[PeerRow]:
    requests, rows = arguments.requests, []
    connects: dict[str, int] = {}
    with started(servers, quiet, notes, f"{kind} GETs") as running:
        paths = warm_up(running, BODY, min(100, requests), quiet, notes, f"{kind} GETs")
        for label, mode in HTTP_MODES:

            def run(name: str, item: Running, mode: Callable[..., tuple[float, int | None]] = mode) -> float:
                seconds, count = mode(item, paths[name], requests)
                if count is not None:
                    connects[name] = count
                return requests / seconds

            what = f"{kind} GETs, {label}"
            values = rates(what, running, paths, run, arguments.repeats, quiet, notes, per=(requests, "GET"))
            rows.append(PeerRow.rate(what, values, "req/s", target=target))
    notes.add(connects_note(f"{kind}: TCP connections per {requests} GETs over one keep-alive connection", connects))
    return rows


# 3. Transfer of a 1 MiB file.


def bench_transfer(
    servers: Mapping[str, Startable], arguments: argparse.Namespace, quiet: _timing.OutputTrap, notes: Notes
) -> PeerRow:
    data = os.urandom(FILE_SIZE)
    downloads = arguments.downloads
    connects: dict[str, int] = {}
    with started(servers, quiet, notes, "1 MiB file") as running:
        paths = warm_up(running, data, 2, quiet, notes, "1 MiB file")

        def run(name: str, item: Running) -> float:
            connects[name], seconds = _timing.timed(lambda: item.gets(paths[name], data, downloads))
            return downloads * FILE_SIZE / (1024 * 1024) / seconds

        values = rates("1 MiB file", running, paths, run, arguments.repeats, quiet, notes, per=(downloads, "download"))
    notes.add(connects_note(f"1 MiB file: TCP connections per {downloads} downloads", connects))
    return PeerRow.rate(f"1 MiB file, {downloads} GETs, keep-alive", values, "MiB/s")


# 4. SMTP messages per second.

#: Seconds the sender waits for an answer: raised from bench_smtp's for slow peers.
SMTP_TIMEOUT = 30.0


def send(port: int, messages: int) -> tuple[float, Sent]:
    """``messages`` over one connection; the seconds that took and what was sent."""
    sent, seconds = _timing.timed(lambda: bench_smtp.send(port, messages, timeout=SMTP_TIMEOUT))
    return seconds, sent


def send_concurrently(port: int, messages: int) -> tuple[float, Sent]:
    """``messages`` from ``SMTP_SENDERS`` connections at once; seconds and the total sent."""
    shares = [messages // SMTP_SENDERS + (number < messages % SMTP_SENDERS) for number in range(SMTP_SENDERS)]
    sents: list[Sent] = []

    def sender(share: int) -> None:
        sents.append(bench_smtp.send(port, share, timeout=SMTP_TIMEOUT))

    seconds = _timing.in_threads([functools.partial(sender, share) for share in shares])
    errors = [sent.error for sent in sents if sent.error is not None]
    return seconds, Sent(sum(sent.accepted for sent in sents), errors[0] if errors else None)


def bench_smtp_throughput(
    servers: Mapping[str, Startable], arguments: argparse.Namespace, quiet: _timing.OutputTrap, notes: Notes
) -> list[PeerRow]:
    messages, rows = arguments.messages, []
    modes: tuple[tuple[str, Callable[[int, int], tuple[float, Sent]]], ...] = (
        ("one connection", send),
        (f"{SMTP_SENDERS} senders", send_concurrently),
    )
    with started(servers, quiet, notes, "mail") as running:
        with quiet():
            for item in running.values():
                send(item.port, min(100, messages))  # warm up; a failure shows in the runs
        for label, mode in modes:
            lost: dict[str, list[str]] = {name: [] for name in running}

            def run(
                name: str,
                item: Running,
                mode: Callable[[int, int], tuple[float, Sent]] = mode,
                lost: dict[str, list[str]] = lost,
            ) -> float:
                assert item.received is not None
                seconds, sent = mode(item.port, messages)
                problem = sent.problem(messages, arrived(item.received, messages))
                if problem is not None:
                    lost[name].append(problem)
                return sent.accepted / seconds

            values = rates(
                f"mail, {label}", running, running, run, arguments.repeats, quiet, notes, per=(messages, "message")
            )
            rows.append(PeerRow.rate(f"mail, {label}", values, "msg/s", valid=not lost.get("serverlayer")))
            for name, problems in lost.items():
                if problems:
                    notes.add(f"LOST MAIL, {name}, {label}: " + "; ".join(problems))
            if not any(lost.values()):
                notes.add(
                    f"mail, {label}: all {messages} messages arrived in each of {arguments.repeats} runs"
                    f" of each of {', '.join(running)}"
                )
    return rows


# 5. serverlayer.asgi against uvicorn's own server.

#: The asgi layer's targets: its setUp+tearDown this many times faster than
#: uvicorn's fixture, and at most this many times the wsgi layer's.
ASGI_SLOWEST_RATIO = 50.0
ASGI_WSGI_FACTOR = 2.0
#: The asgi section's yardstick, serverlayer's wsgi layer, in the set-up rounds and their notes.
ASGI_REFERENCE = "wsgi layer"


def open_descriptors() -> int | None:
    """How many file descriptors this process has open (Linux only)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def ws_url(running: Running) -> str:
    return f"ws://{HOST}:{running.port}/"


def echoes(running: Running, message: bytes, count: int) -> float:
    """``count`` round trips of ``message`` over one WebSocket connection of
    websockets' sync client, each echo checked; the seconds they took (the
    handshake and the closing not included)."""
    with websockets.sync.client.connect(ws_url(running), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as client:
        start = time.perf_counter()
        for _ in range(count):
            client.send(message)
            echo = client.recv(TIMEOUT)
            if echo != message:
                raise RuntimeError(f"the server on port {running.port} echoed {echo[:60]!r}")
        return time.perf_counter() - start


def bench_websocket(
    servers: Mapping[str, Startable], arguments: argparse.Namespace, quiet: _timing.OutputTrap, notes: Notes
) -> PeerRow:
    count = arguments.echoes
    what = "asgi WebSocket echo, one connection"
    with started(servers, quiet, notes, what) as running:
        working = on_each(running, lambda item: echoes(item, BODY, min(100, count)), quiet, notes, f"{what}, warm-up")

        def run(name: str, item: Running) -> float:
            return count / echoes(item, BODY, count)

        values = rates(what, running, working, run, arguments.repeats, quiet, notes, per=(count, "echo"))
    return PeerRow.rate(what, values, "echoes/s", target="level")


def bench_asgi(arguments: argparse.Namespace, quiet: _timing.OutputTrap, notes: Notes) -> list[PeerRow]:
    """The asgi layer against uvicorn's fixture: setUp+tearDown (and the
    wsgi layer's in the same rounds), GETs, WebSocket echoes. Notes any
    thread or descriptor of the section's left behind."""
    threads, descriptors = set(threading.enumerate()), open_descriptors()
    servers = {contender.package: contender.make(0) for contender in contenders("asgi")}
    wsgi = LayerServer(serverlayer.wsgi.Layer(app, name="BENCH_PEERS_ASGI_WSGI", host=HOST))
    lifecycle = bench_lifecycle("asgi", {**servers, ASGI_REFERENCE: wsgi}, set(), arguments, quiet, notes)
    values = dict(lifecycle.values)
    reference = values.pop(ASGI_REFERENCE, None)
    rows = [dataclasses.replace(lifecycle, values=values, target="asgi lifecycle", reference=reference)]
    if reference is not None:
        rows.append(
            PeerRow("wsgi setUp+tearDown, same rounds", {"serverlayer": reference}, "ms", False, target=None)
        )
        if "serverlayer" in values:
            ratio = values["serverlayer"] / reference
            notes.add(
                f"asgi setUp+tearDown over the wsgi layer's in the same rounds: {ratio:.2f}x"
                f" (target <= {ASGI_WSGI_FACTOR:g}x: {'yes' if ratio <= ASGI_WSGI_FACTOR else 'NO'})"
            )
    rows += bench_http_throughput("asgi", servers, arguments, quiet, notes, target="level")
    rows.append(bench_websocket(servers, arguments, quiet, notes))
    if threads_left_running(threads) or open_descriptors() != descriptors:
        left = [thread.name for thread in threading.enumerate() if thread not in threads]
        notes.add(
            f"LEFT BEHIND by the asgi section: threads {left}, descriptors {descriptors} at its start,"
            f" {open_descriptors()} at its end"
        )
    else:
        notes.add(f"asgi: every server stopped, no thread left running, {descriptors} descriptors before and after")
    return rows


# 6. The concurrency sweep.

SWEEP_KINDS = ("wsgi", "custom", "content")
SWEEP_CLIENTS = (1, 2, 8, 32)
#: The one client count the peers are swept at, unless ``--sweep-peers``.
SWEEP_PEER_CLIENTS = HTTP_CLIENTS
#: Where the clients run: threads of this process, or of a separate one.
SWEEP_MODES: dict[str, Callable[[int, str, bytes, int, float], _http.ClientsRun]] = {
    "threads": _http.clients_in_threads,
    "process": _http.clients_in_child,
}
#: The share of its own 1-client rate a layer aims to keep with more clients.
SCALING_TARGET = 0.8
#: The share of the mean the client that got the fewest answers aims to get.
FAIRNESS_TARGET = 0.5


@dataclass(frozen=True)
class SweepCell:
    """One sweep run: a contender's ``kind`` of server, ``clients`` clients in ``mode``."""

    kind: str
    package: str
    clients: int
    mode: str
    run: _http.ClientsRun

    @property
    def counts(self) -> list[int]:
        return [client.requests for client in self.run.clients]

    @property
    def requests(self) -> int:
        return sum(self.counts)

    @property
    def rate(self) -> float:
        return self.requests / self.run.seconds if self.run.seconds > 0 else 0.0

    @property
    def mean(self) -> float:
        return self.requests / self.clients

    @property
    def errors(self) -> list[str]:
        return [client.error for client in self.run.clients if client.error is not None]

    @property
    def connects(self) -> int:
        return sum(client.connects for client in self.run.clients)

    def fair(self) -> bool | None:
        """Whether no client got fewer than ``FAIRNESS_TARGET`` of the mean; None for one client."""
        return None if self.clients == 1 else min(self.counts) >= FAIRNESS_TARGET * self.mean

    def scaling(self, cells: Sequence[SweepCell]) -> float | None:
        """This rate over the same contender's 1-client rate in the same mode,
        if ``cells`` hold that; None for one client."""
        if self.clients == 1:
            return None
        single = [c.rate for c in cells if (c.kind, c.package, c.mode, c.clients) == (*self.key, 1)]
        return self.rate / single[0] if single and single[0] > 0 else None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.kind, self.package, self.mode

    @property
    def order(self) -> tuple[int, int]:
        """Where the run goes among its contender's: by mode, then client count."""
        return list(SWEEP_MODES).index(self.mode), self.clients


def sweep_counts(package: str, arguments: argparse.Namespace) -> tuple[int, ...]:
    """The client counts ``package`` is swept at."""
    return SWEEP_CLIENTS if package == "serverlayer" or arguments.sweep_peers else (SWEEP_PEER_CLIENTS,)


def bench_sweep(
    servers: Mapping[str, Mapping[str, Startable]],
    arguments: argparse.Namespace,
    quiet: _timing.OutputTrap,
    notes: Notes,
) -> list[SweepCell]:
    """For each of ``SWEEP_KINDS``, with its contenders all started:
    ``--sweep-runs`` rounds of a run of every client count in every mode for
    each contender, the contenders' order rotating from count to count; each
    run after the server forgot what it recorded (untimed). Returns every
    run."""
    seconds, cells = arguments.sweep_ms / 1000, []
    for kind in SWEEP_KINDS:
        with started(servers[kind], quiet, notes, f"{kind} sweep") as running:
            paths = warm_up(running, BODY, 100, quiet, notes, f"{kind} sweep")
            for number, clients in enumerate(SWEEP_CLIENTS * arguments.sweep_runs):
                names = [name for name in paths if clients in sweep_counts(name, arguments)]
                shift = number % max(1, len(names))
                for mode, name in itertools.product(SWEEP_MODES, names[shift:] + names[:shift]):
                    try:
                        with quiet():
                            running[name].clear()
                            done = SWEEP_MODES[mode](running[name].port, paths[name], BODY, clients, seconds)
                    except Exception as exc:
                        notes.failed(name, f"{kind} sweep, {clients} clients in {mode}", exc)
                    else:
                        cells.append(SweepCell(kind, name, clients, mode, done))
    return cells


@dataclass(frozen=True)
class SweepLine:
    """A line of the sweep's table: the run with the median req/s of those
    of one contender, mode and client count (the lower middle one of an
    even number), and the clients that failed in any of them."""

    cell: SweepCell
    errors: int


def sweep_lines(cells: Sequence[SweepCell]) -> list[SweepLine]:
    """The table's lines, in the order of layer, contender, mode, client count."""
    runs: dict[tuple[str, str, str, int], list[SweepCell]] = {}
    for cell in cells:
        runs.setdefault((*cell.key, cell.clients), []).append(cell)
    lines = [
        SweepLine(sorted(same, key=lambda c: c.rate)[(len(same) - 1) // 2], sum(len(c.errors) for c in same))
        for same in runs.values()
    ]
    return sorted(
        lines, key=lambda line: (SWEEP_KINDS.index(line.cell.kind), PACKAGES.index(line.cell.package), *line.cell.order)
    )


def sweep_table(lines: Sequence[SweepLine]) -> list[str]:
    medians = [line.cell for line in lines]
    header = (
        "layer",
        "contender",
        "clients in",
        "clients",
        "req/s",
        "x 1 client",
        "CPU/req",
        "fewest",
        "mean",
        "errors",
        f">= {SCALING_TARGET:g}x 1 client",
        f"fewest >= {FAIRNESS_TARGET:g} mean",
    )
    table = [header]
    for line in lines:
        cell = line.cell
        scaling = cell.scaling(medians)
        fair = cell.fair()
        table.append(
            (
                cell.kind,
                cell.package,
                cell.mode,
                str(cell.clients),
                f"{cell.rate:,.0f}",
                "-" if scaling is None else f"{scaling:.2f}x",
                f"{cell.run.cpu / cell.requests * 1e6:,.0f} us" if cell.requests else "-",
                f"{min(cell.counts):,}",
                f"{cell.mean:,.0f}",
                str(line.errors),
                "-" if scaling is None else "yes" if scaling >= SCALING_TARGET else "NO",
                "-" if fair is None else "yes" if fair else "NO",
            )
        )
    return _timing.columns(table, right_aligned={3, 4, 5, 6, 7, 8, 9})


def sweep_notes(cells: Sequence[SweepCell], lines: Sequence[SweepLine], notes: Notes) -> None:
    """Every run's client errors; the lines whose server closed connections;
    how many of serverlayer's lines meet the targets."""
    for cell in cells:
        if cell.errors:
            notes.add(
                f"ERRORS, sweep, {cell.package} {cell.kind}, {cell.clients} clients in {cell.mode}:"
                f" {len(cell.errors)} clients failed; first: {cell.errors[0]}"
            )
    medians = [line.cell for line in lines]
    reconnected = [cell for cell in medians if cell.connects > cell.clients]
    if reconnected:
        notes.add(
            "sweep, TCP connections where the server closed keep-alive connections (one per client otherwise): "
            + ", ".join(f"{c.package} {c.kind} {c.clients} in {c.mode} {c.connects:,}" for c in reconnected)
        )
    ours = [line for line in lines if line.cell.package == "serverlayer" and line.cell.clients > 1]
    if ours:
        kept = sum(1 for line in ours if (line.cell.scaling(medians) or 0.0) >= SCALING_TARGET)
        fair = sum(1 for line in ours if line.cell.fair())
        notes.add(
            f"sweep targets, serverlayer's lines with 2 or more clients: {kept} of {len(ours)} keep"
            f" >= {SCALING_TARGET:g}x their 1-client rate; in {fair} of {len(ours)} no client got fewer"
            f" than {FAIRNESS_TARGET:g} of the mean; {sum(1 for line in ours if line.errors)} had client errors"
        )


# 7. Memory of a process holding many servers.


def rss_kib() -> int | None:
    """This process's resident set size in KiB, from /proc (Linux only)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def stop_all(running: Sequence[Running]) -> None:
    """Stop the servers in parallel: peers polling every 0.5 s would take minutes one by one."""
    threads = [threading.Thread(target=item.stop, daemon=True) for item in running]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def memory_child(kind: str, package: str, count: int) -> int:
    """What the memory measure's processes run: set up ``count`` servers, report, tear down."""
    contender = next(item for item in contenders(kind) if item.package == package)
    quiet, logged = _timing.OutputTrap(), _timing.LogTrap()
    running: list[Running] = []
    with logged.installed(LOGGERS), quiet():
        warm = contender.make(0)
        warm.prepare()
        warm.start().stop()
        deadline = time.monotonic() + 2  # let threads a stop left running end (webtest's runner)
        for thread in threading.enumerate():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        gc.collect()
        before, threads_before = rss_kib(), threading.active_count()
        try:
            for number in range(1, count + 1):
                server = contender.make(number)
                server.prepare()
                running.append(server.start())
            gc.collect()
            after, threads_after = rss_kib(), threading.active_count()
        finally:
            stop_all(running)
    if before is None or after is None:
        return 1
    print("RESULT " + json.dumps({"rss_kib": after - before, "threads": threads_after - threads_before}))
    return 0


def bench_memory(count: int, notes: Notes) -> list[PeerRow]:
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for kind in KINDS:
        values: dict[str, float] = {}
        threads: dict[str, int] = {}
        for contender in contenders(kind):
            code = (
                f"import sys; sys.path.insert(0, {here!r}); import bench_peers;"
                f" sys.exit(bench_peers.memory_child({kind!r}, {contender.package!r}, {count}))"
            )
            try:
                child = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT
                )
            except subprocess.TimeoutExpired:
                notes.add(f"memory, {contender.package} {kind}: the process did not end within {CHILD_TIMEOUT:g} s")
                continue
            result = next((line for line in child.stdout.splitlines() if line.startswith("RESULT ")), None)
            if child.returncode != 0 or result is None:
                why = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
                notes.add(f"memory, {contender.package} {kind}: no result ({why[:200]})")
                continue
            measured = json.loads(result.removeprefix("RESULT "))
            values[contender.package] = measured["rss_kib"] / 1024
            threads[contender.package] = measured["threads"]
        if values:
            rows.append(PeerRow(f"RSS, {count} {kind} servers", values, "MiB", higher_is_better=False, target=None))
            notes.add(
                f"threads held by {count} {kind} servers: " + ", ".join(f"{n} {c}" for n, c in threads.items())
            )
    return rows


def sections(text: str) -> tuple[str, ...]:
    """``--only``'s value: section names, separated by commas."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SECTIONS)}, not {text!r}")
    return names


def more_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        type=sections,
        default=SECTIONS,
        metavar="SECTION[,SECTION...]",
        help=f"run only these measures, of: {', '.join(SECTIONS)} (default all)",
    )
    parser.add_argument(
        "--sweep-peers",
        action="store_true",
        help=f"sweep the peers at every client count too (default only at {SWEEP_PEER_CLIENTS})",
    )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    arguments = _timing.options(
        __doc__,
        COUNTS,
        "3 rounds (1 slow), 1 stalled round, 2 runs of 200 GETs, 20 downloads, 100 messages; 5 servers;"
        " 100 ms sweep runs",
        argv,
        more_options,
    )
    arguments.slow_rounds = min(arguments.slow_rounds, arguments.rounds)
    return arguments


def counts_detail(arguments: argparse.Namespace) -> str:
    """The header's line of counts, for the sections that run."""
    only = arguments.only
    parts = []
    if "lifecycle" in only:
        parts.append(
            f"{arguments.rounds} setUp+tearDown rounds per kind ({arguments.slow_rounds} for peers polling every 0.5 s)"
        )
    if "stalled" in only:
        parts.append(f"{arguments.stalled_rounds} tearDown rounds with stalled clients per kind")
    throughput = [
        f"{arguments.repeats} x {arguments.requests} GETs" if "http" in only else "",
        f"{arguments.downloads} downloads" if "transfer" in only else "",
        f"{arguments.messages} messages" if "smtp" in only else "",
    ]
    if any(throughput):
        parts.append(", ".join(part for part in throughput if part))
    if "asgi" in only:
        parts.append(
            f"asgi: {arguments.rounds} setUp+tearDown rounds, {arguments.repeats} x {arguments.requests} GETs,"
            f" {arguments.repeats} x {arguments.echoes} WebSocket echoes"
        )
    if "sweep" in only:
        peers = "every count" if arguments.sweep_peers else str(SWEEP_PEER_CLIENTS)
        parts.append(
            f"sweep: {'/'.join(map(str, SWEEP_CLIENTS))} clients x {arguments.sweep_ms} ms,"
            f" {arguments.sweep_runs} run(s) each (peers at {peers})"
        )
    if "memory" in only:
        parts.append(f"{arguments.servers} servers per memory process")
    return "; ".join(parts)


PEER_LEGEND = (
    "best peer / slowest peer: the peer that does best / worst, and how many times better",
    "  serverlayer does than it (shorter time, more per second, less memory); above 1",
    "  serverlayer is ahead; '-': no peer can do the work, or no target",
    "columns: gocept = gocept.httpserverlayer layers; localserver = pytest-localserver WSGIServer,"
    " ContentServer, smtp.Server; httpserver = pytest-httpserver HTTPServer; aiosmtpd = a bare"
    " Controller; webtest = StopableWSGIServer (plone.testing.zope's WSGI server); uvicorn ="
    " uvicorn.Server(Config(...)).run on a thread, stopped with should_exit",
)
ASGI_LEGEND = (
    "asgi: serverlayer.asgi.Layer against uvicorn's own server on a thread (both uvicorn's"
    " default HTTP protocol, httptools where installed, and websockets-sansio; the same raw"
    " ASGI application); targets: setUp+tearDown",
    f"  >= {ASGI_SLOWEST_RATIO:g}x faster than uvicorn's and <= {ASGI_WSGI_FACTOR:g}x the wsgi layer's in the same"
    " rounds (the row below it), GETs and WebSocket echoes >= 1x uvicorn's",
)
SWEEP_LEGEND = (
    "sweep: each client GETs over its own keep-alive http.client connection for the run's time;",
    "  'clients in' threads: client threads in this process, CPU/req = this process's CPU per request,",
    "  clients included; process: client threads in a separate python process, CPU/req = the server's",
    "  alone (this process's CPU); x 1 client: req/s over the same contender's 1-client req/s in the",
    "  same mode; fewest / mean: answers the least served client got / the mean per client; errors:",
    "  clients that failed (timeout, reset), each ending at its failure. Targets (reported, not",
    f"  asserted): with 2+ clients >= {SCALING_TARGET:g}x the 1-client rate, and no client below"
    f" {FAIRNESS_TARGET:g} of the mean",
)


def legend(arguments: argparse.Namespace) -> list[str]:
    only = arguments.only
    lines = list(PEER_LEGEND) if set(only) - {"sweep"} else []
    if "lifecycle" in only:
        lines.append(
            f"rounds: peers whose stop waits for a 0.5 s poll (gocept; localserver's and httpserver's HTTP"
            f" servers) took part in {arguments.slow_rounds} of the {arguments.rounds} rounds, spread evenly"
        )
    if "asgi" in only:
        lines += ASGI_LEGEND
    if "sweep" in only:
        lines += SWEEP_LEGEND
    return lines


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    only = arguments.only

    def measure(quiet: _timing.OutputTrap) -> _timing.Findings:
        notes = Notes()
        servers = {kind: {c.package: c.make(0) for c in contenders(kind)} for kind in KINDS}
        polling = {kind: {c.package for c in contenders(kind) if c.polls} for kind in KINDS}
        rows: list[PeerRow] = []
        if "lifecycle" in only:
            with quiet():
                PeerTLS.get()
            rows += [bench_lifecycle(kind, servers[kind], polling[kind], arguments, quiet, notes) for kind in KINDS]
        if "stalled" in only:
            with quiet():
                PeerTLS.get()
            rows += [bench_stalled(kind, servers[kind], polling[kind], arguments, quiet, notes) for kind in KINDS]
        if "http" in only:
            for kind in ("wsgi", "content"):
                rows += bench_http_throughput(kind, servers[kind], arguments, quiet, notes)
        if "transfer" in only:
            transfer = {package: servers[kind][package] for package, kind in TRANSFER}
            rows.append(bench_transfer(transfer, arguments, quiet, notes))
        if "smtp" in only:
            rows += bench_smtp_throughput(servers["smtp"], arguments, quiet, notes)
        if "asgi" in only:
            rows += bench_asgi(arguments, quiet, notes)
        cells = bench_sweep(servers, arguments, quiet, notes) if "sweep" in only else []
        if "memory" in only:
            rows += bench_memory(arguments.servers, notes)
        table = peer_table(rows) if rows else []
        if cells:
            lines = sweep_lines(cells)
            sweep_notes(cells, lines, notes)
            table += [""] * bool(table) + sweep_table(lines)
        return _timing.Findings(table, notes.lines)

    return _timing.report(
        "serverlayer vs its peers on the same work (medians, interleaved)",
        {
            "packages": _timing.versions(
                "waitress",
                "gocept.httpserverlayer",
                "pytest-localserver",
                "pytest-httpserver",
                "werkzeug",
                "aiosmtpd",
                "WebTest",
                "uvicorn",
                "h11",
                "httptools",
                "websockets",
            ),
            "imported": os.path.dirname(serverlayer.__file__),
            "counts": counts_detail(arguments),
        },
        measure,
        legend(arguments),
        printed_by="servers",
        loggers=LOGGERS,
    )


if __name__ == "__main__":
    sys.exit(main())
