"""HTTP helpers shared by ``bench_http``, ``bench_tls`` and ``bench_peers``.

The same application, handler and client on every side, so that the
contenders differ only in the servers being compared. The keep-alive
clients of ``bench_peers``' concurrency sweep are here too, with what a
separate client process runs (``client_process``): this module imports
nothing but the standard library and ``_timing``, so that process starts
quickly and holds no server code.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import http.server
import json
import os
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import _timing

HOST = "127.0.0.1"
#: What every HTTP server answers.
BODY = b"Hello, benchmark!\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI layers' application: answers ``BODY`` to any path."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


class Handler(http.server.BaseHTTPRequestHandler):
    """The custom layers' handler: answers GET, logs nothing, and keeps the
    connection open after each answer (HTTP/1.1, as serverlayer's content
    and static handlers do; ``BaseHTTPRequestHandler``'s HTTP/1.0 closes).

    It sends each answer in one write: written unbuffered, the body would
    wait for the client to acknowledge the headers (Nagle's algorithm), which
    a client delays by up to 40 ms once the connection stays open.
    """

    protocol_version = "HTTP/1.1"
    wbufsize = -1  # buffered; handle_one_request flushes after each answer

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class CountingConnection(http.client.HTTPConnection):
    """Counts the TCP connections http.client opens."""

    connects = 0

    def connect(self) -> None:
        self.connects += 1
        super().connect()


class CountingHTTPSConnection(http.client.HTTPSConnection, CountingConnection):
    """Counts the TCP connections (each with a handshake) http.client opens:
    ``HTTPSConnection.connect`` calls ``CountingConnection.connect`` before
    its handshake."""


#: Seconds a client waits to connect, and for each answer.
TIMEOUT = 10.0


def connection(port: int, context: ssl.SSLContext | None, timeout: float = TIMEOUT) -> CountingConnection:
    """A client for the server on ``port``; HTTPS verified by ``context`` if given."""
    if context is not None:
        return CountingHTTPSConnection(HOST, port, timeout=timeout, context=context)
    return CountingConnection(HOST, port, timeout=timeout)


def check(port: int, response: http.client.HTTPResponse, body: bytes, expected: bytes) -> None:
    if response.status != 200 or body != expected:
        raise RuntimeError(f"the server on port {port} answered {response.status} {body[:60]!r}")


def get(client: http.client.HTTPConnection, port: int, path: str, expected: bytes) -> None:
    """One GET over ``client``, its answer checked."""
    client.request("GET", path)
    response = client.getresponse()
    check(port, response, response.read(), expected)


def gets(port: int, context: ssl.SSLContext | None, path: str, expected: bytes, requests: int) -> int:
    """``requests`` sequential GETs over one keep-alive connection, each
    answer checked; returns how many TCP connections that took."""
    client = connection(port, context)
    try:
        for _ in range(requests):
            get(client, port, path, expected)
    finally:
        client.close()
    return client.connects


def layer_gets(layer: Any, requests: int, path: str = "/") -> int:
    """``gets`` of ``BODY`` from a layer's server, over HTTPS if it publishes an ``ssl_context``."""
    return gets(layer["http_port"], layer.get("ssl_context"), path, BODY, requests)


def provide_file(documentroot: str, body: bytes, name: str = "index.txt") -> str:
    """Put ``body`` into a static server's ``documentroot``; returns the path to GET it from."""
    with open(os.path.join(documentroot, name), "wb") as file:
        file.write(body)
    return f"/{name}"


@dataclass
class Pair:
    """The same kind of layer twice: the one in the table's ``ours`` column
    and the one it is compared with, in the ``peer`` column."""

    kind: str
    ours: Any
    peer: Any

    def layers(self) -> dict[str, Any]:
        return {"ours": self.ours, "peer": self.peer}


def check_serves(pair: Pair, quiet: _timing.OutputTrap, also: Callable[[Any, str], None] | None = None) -> float:
    """Set up, GET once, tear down: a warm-up that proves both layers serve
    (the static ones a file put into their documentroot). ``also`` checks
    more while a layer is set up, given it and the path.

    Returns the milliseconds ``pair.ours``' ``setUp`` took.
    """
    ours_set_up_ms = 0.0
    for layer in (pair.ours, pair.peer):
        with quiet():
            set_up_ms = _timing.elapsed(layer.setUp) * 1000
            try:
                path = provide_file(layer["documentroot"], BODY) if pair.kind == "static" else "/"
                layer_gets(layer, 1, path)
                if also is not None:
                    also(layer, path)
            finally:
                layer.tearDown()
        if layer is pair.ours:
            ours_set_up_ms = set_up_ms
    return ours_set_up_ms


def get_rates(
    pair: Pair, requests: int, repeats: int, quiet: _timing.OutputTrap
) -> tuple[dict[str, float], dict[str, int]]:
    """Median requests/s of ``repeats`` runs of ``requests`` sequential GETs
    to each layer of ``pair``, over one connection each run; and the TCP
    connections each run took (a server that closes makes http.client
    reconnect, which is part of what is measured)."""
    connects: dict[str, int] = {}

    def run(name: str, layer: Any) -> float:
        with quiet():
            connects[name], seconds = _timing.timed(lambda: layer_gets(layer, requests))
        return requests / seconds

    rates = _timing.rate_medians(
        pair.layers(), run, repeats, quiet, warm_up=lambda layer: layer_gets(layer, min(100, requests))
    )
    return rates, connects


# The concurrency sweep's clients.

#: The most GETs one sweep client makes, whatever its time allows.
CLIENT_REQUEST_LIMIT = 1_000_000
#: Seconds a client process may take beyond twice its clients' time and
#: one ``TIMEOUT``, to start and to report, before it is killed.
CHILD_GRACE = 30.0


@dataclass
class ClientRun:
    """What one sweep client did: GETs answered, the TCP connections that
    took and, if one failed (a timeout, a reset), why; a client stops at
    its first failure."""

    requests: int = 0
    connects: int = 0
    error: str | None = None


@dataclass
class ClientsRun:
    """What a sweep run's clients did together."""

    #: From the clients' release to the last one's end.
    seconds: float
    #: CPU time this process used over the run (``time.process_time``).
    cpu: float
    clients: list[ClientRun]


def keep_alive_client(port: int, path: str, expected: bytes, seconds: float, run: ClientRun) -> None:
    """GETs over one keep-alive connection for ``seconds`` from now (or
    ``CLIENT_REQUEST_LIMIT`` of them), counted into ``run``.

    A GET sent before the time is up is waited for, however late its answer
    comes: a client the server kept waiting gets the answer it asked for,
    and counts it. Only waiting ``TIMEOUT`` longer than the whole run (for
    the connection, or for an answer) is a timeout, so that a server that
    serves one connection at a time answers the others late, not never. A
    failure ends the client and goes into ``run`` instead of being raised.
    """
    client = connection(port, None, TIMEOUT + seconds)
    deadline = time.monotonic() + seconds
    try:
        while run.requests < CLIENT_REQUEST_LIMIT and time.monotonic() < deadline:
            get(client, port, path, expected)
            run.requests += 1
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        client.close()
        run.connects = client.connects


def clients_in_threads(port: int, path: str, expected: bytes, clients: int, seconds: float) -> ClientsRun:
    """``clients`` keep-alive clients on threads of this process, released at once."""
    runs = [ClientRun() for _ in range(clients)]
    work = [functools.partial(keep_alive_client, port, path, expected, seconds, run) for run in runs]
    cpu = time.process_time()
    wall = _timing.in_threads(work)
    return ClientsRun(wall, time.process_time() - cpu, runs)


def client_process(settings: str) -> int:
    """What the separate client process runs: say ``READY``, wait for a line
    on stdin, run ``clients_in_threads`` as ``settings`` (JSON) say, print
    the result as one line of JSON."""
    given = json.loads(settings)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    if not sys.stdin.readline():
        return 1  # the parent went away
    done = clients_in_threads(
        given["port"], given["path"], given["expected"].encode("latin-1"), given["clients"], given["seconds"]
    )
    print(json.dumps(dataclasses.asdict(done)), flush=True)
    return 0


def first_line(fd: int, seconds: float) -> bytes:
    """What ``fd`` gives up to its first newline, read unbuffered (so that
    nothing after it is taken from a later reader); less at end of file or
    after ``seconds``."""
    deadline = time.monotonic() + seconds
    line = b""
    while not line.endswith(b"\n") and len(line) < 1000:
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1) if readable else b""
        if not chunk:
            break
        line += chunk
    return line


def clients_in_child(port: int, path: str, expected: bytes, clients: int, seconds: float) -> ClientsRun:
    """``clients`` keep-alive clients on threads of a fresh ``python -c``
    process. Its ``cpu`` is this process's CPU time from the clients'
    release to the child's report, so the server's alone as long as nothing
    else runs here; the child starts, and its clients wait, before that.

    Raises ``RuntimeError`` if the child fails or does not start within
    ``CHILD_GRACE``, ``subprocess.TimeoutExpired`` if it takes too long (it
    is killed then); a client's own failure is in its ``ClientRun``.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    settings = json.dumps(
        {"port": port, "path": path, "expected": expected.decode("latin-1"), "clients": clients, "seconds": seconds}
    )
    code = f"import sys; sys.path.insert(0, {here!r}); import _http; sys.exit(_http.client_process(sys.argv[1]))"
    limit = 2 * seconds + TIMEOUT + CHILD_GRACE
    with subprocess.Popen(
        [sys.executable, "-c", code, settings], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as child:
        try:
            assert child.stdin is not None and child.stdout is not None
            ready = first_line(child.stdout.fileno(), CHILD_GRACE) == b"READY\n"
            cpu = time.process_time()
            if ready:
                child.stdin.write(b"GO\n")
                child.stdin.flush()
            else:
                child.kill()
            out, err = child.communicate(timeout=limit)
            cpu = time.process_time() - cpu
        except BaseException:
            child.kill()
            child.communicate()
            raise
    if not ready or child.returncode != 0 or not out.strip():
        why = (err.decode(errors="replace").strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        raise RuntimeError(f"the client process failed{'' if ready else ' to start'}: {why[:200]}")
    done = json.loads(out)
    return ClientsRun(done["seconds"], cpu, [ClientRun(**run) for run in done["clients"]])
