"""Every HTTP layer records the requests of the current test.

The ``http_requests`` resource lists them in arrival order: method, path
and query as the client sent them (with the scheme and authority of an
absolute-form target, as a client sends it to its proxy), headers and
body bytes. Recording reads the body before the application does and
hands it on unchanged, so the application sees exactly what it would have
seen. A chunked body is recorded decoded.
"""

from __future__ import annotations

import dataclasses
import email.message
import functools
import io
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from serverlayer.arrivals import Arrivals, Unread
from serverlayer.errors import RequestTimeoutError, ServerLayerError

if TYPE_CHECKING:
    from serverlayer.tls import ClientCertificate


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it.

    ``headers`` may be given as ``(name, value)`` pairs: they become an
    ``email.message.Message`` (case-insensitive) when a test first reads
    them, not while the server is answering.
    """

    method: str
    #: The path as sent, percent-encoding and all, without the query.
    path: str
    #: The query string as sent, without the ``?``.
    query: str
    raw_headers: email.message.Message | tuple[tuple[str, str], ...]
    body: bytes
    #: The certificate the client presented on a layer with
    #: ``client_certs=``, else ``None``.
    client_cert: ClientCertificate | None = None
    #: The scheme and authority (host, and port if sent) of an absolute-form
    #: target, as sent: ``http`` and ``api.example.com`` for ``GET
    #: http://api.example.com/v1/items``, which is how a client asks the
    #: server it uses as its proxy (RFC 9112 section 3.2.2). ``path`` and
    #: ``query`` are the target's all the same, so that a layer standing in
    #: for that host matches its routes against them. Both empty for the
    #: origin form (``GET /v1/items``) that other clients send.
    scheme: str = ""
    authority: str = ""

    @functools.cached_property
    def headers(self) -> email.message.Message:
        """The headers; ``request.headers['content-type']`` ignores case."""
        if isinstance(self.raw_headers, email.message.Message):
            return self.raw_headers
        headers = email.message.Message()
        for name, value in self.raw_headers:
            headers[name] = value
        return headers

    @property
    def query_params(self) -> dict[str, list[str]]:
        """The query string, decoded: ``{'q': ['tea']}``."""
        return urllib.parse.parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)

    @functools.cached_property
    def decoded_path(self) -> str:
        """The path with its percent-encoding undone: ``/café`` for ``/caf%C3%A9``."""
        return urllib.parse.unquote(self.path)

    @functools.cached_property
    def parsed_json(self) -> tuple[bool, Any]:
        """``(True, value)`` if the body is JSON, else ``(False, None)``:
        parsed once for all the routes that match on it."""
        try:
            return True, json.loads(self.body)
        except ValueError:
            return False, None

    @property
    def target(self) -> str:
        """The request target, rebuilt from its parts: ``/v1/items?x=1``,
        or ``http://api.example.com/v1/items?x=1`` from a client that uses
        the layer as its proxy."""
        origin = f"{self.scheme}://{self.authority}" if self.authority else ""
        return origin + self.path + (f"?{self.query}" if self.query else "")

    def summary(self) -> str:
        size = f" ({len(self.body)} bytes)" if self.body else ""
        return f"{self.method} {self.target}{size}"

    def __str__(self) -> str:
        return self.summary()


class RequestLog(Arrivals[RecordedRequest]):
    """Requests received during the current test, in arrival order."""

    noun = "request"
    timeout_error = RequestTimeoutError
    #: The server's ``http_url`` while its layer is set up, else "".
    url = ""

    def why_missing(self) -> str:
        """Where the requests waited for should have gone: those that never
        came were often sent to another server (another layer's, whose
        ``http_url`` hid this one's in a stack of layers)."""
        if not self.url:
            return ""
        return (
            f"\nThis server records the requests sent to {self.url}; those sent to another address"
            " (another layer's http_url, a URL kept from an earlier set-up) are not among them."
        )


#: The absolute form of a request target (RFC 9112 section 3.2.2): a
#: scheme (RFC 3986 section 3.1), "://", an authority that is not empty,
#: then the path and query.
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]+)(.*)", re.DOTALL)


def is_latin_1(text: str) -> bool:
    """Whether ``text`` can go into an HTTP head, which carries ISO-8859-1 (PEP 3333)."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def split_target(target: str) -> tuple[str, str, str, str]:
    """Path, query, scheme and authority of a request target (RFC 9112
    section 3.2), each as sent.

    Only the absolute form (``http://host/path?query``, sent to a proxy)
    has a scheme and an authority; its empty path is ``/``. The authority
    form of ``CONNECT example.com:443`` and the asterisk form of ``OPTIONS
    *`` have no path: the target is kept whole as the path.
    """
    if not target.startswith("/") and (absolute := _ABSOLUTE_FORM.fullmatch(target)):
        scheme, authority, rest = absolute.groups()
        path, _, query = rest.partition("?")
        return path or "/", query, scheme, authority
    path, _, query = target.partition("?")
    return path, query, "", ""


#: WSGI variables that hold the connection's objects, which the request
#: log must not keep alive.
CONNECTION_VARIABLES = ("wsgi.input", "wsgi.errors", "wsgi.file_wrapper", "waitress.client_disconnected")

#: The WSGI variable in which the wsgi layer's server hands the recording
#: the request's head as the client sent it (bytes: the request line and
#: the header fields, CRLF between them); the application never sees it.
REQUEST_HEAD = "serverlayer.request_head"


def _header_fields(lines: Iterable[bytes]) -> tuple[tuple[str, str], ...]:
    """The ``(name, value)`` fields of a head's header lines, as sent: names
    as written, each repeated field its own pair, optional whitespace
    around values left out (RFC 9110 section 5.5). A line that starts
    with whitespace continues the field before it (obs-fold, RFC 9112
    section 5.2), joined with one space."""
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, (value + b" " + line.strip(b" \t")).lstrip(b" "))
        elif line:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(b" \t")))
    return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in fields)


class _UnreadHead(Unread[RecordedRequest]):
    """A WSGI request as the head its client sent, until a test reads it.

    A WSGI environ has the header fields rebuilt: repeated fields joined
    with ", ", names upper-cased, and under waitress a chunked body's
    Transfer-Encoding replaced by a Content-Length the client never sent.
    """

    __slots__ = ("head", "body", "certificate")

    def __init__(self, head: bytes, body: bytes, certificate: str | None) -> None:
        self.head = head
        self.body = body
        #: The client's certificate (PEM) behind the TLS front, if any.
        self.certificate = certificate

    def parse(self) -> RecordedRequest:
        request_line, *lines = self.head.split(b"\r\n")
        method, target = request_line.decode("latin-1").split(" ", 2)[:2]
        path, query, scheme, authority = split_target(target)
        client_cert = None
        if self.certificate:
            from serverlayer.tls import ClientCertificate

            client_cert = ClientCertificate.from_pem(self.certificate)
        return RecordedRequest(method, path, query, _header_fields(lines), self.body, client_cert,
                               scheme=scheme, authority=authority)


class _UnreadEnviron(Unread[RecordedRequest]):
    """A WSGI request as its CGI variables, until a test reads it: from a
    server that gives no ``REQUEST_HEAD``, whose header fields are then
    those the environ has."""

    __slots__ = ("variables", "body")

    def __init__(self, variables: dict[str, Any], body: bytes) -> None:
        self.variables = variables
        self.body = body

    def parse(self) -> RecordedRequest:
        variables = self.variables
        headers = tuple(
            (key.removeprefix("HTTP_").replace("_", "-").title(), value)
            for key, value in variables.items()
            if key.startswith("HTTP_") or (key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value)
        )
        target = variables.get("REQUEST_URI") or variables.get("PATH_INFO", "/")
        path, query, scheme, authority = split_target(target)
        client_cert = None
        if variables.get("SSL_CLIENT_CERT"):
            from serverlayer.tls import ClientCertificate

            client_cert = ClientCertificate.from_pem(variables["SSL_CLIENT_CERT"])
        return RecordedRequest(variables["REQUEST_METHOD"], path, query, headers, self.body, client_cert,
                               scheme=scheme, authority=authority)


class RecordingMiddleware:
    """Records each request, then calls the application with the same input.

    The request's method, target and header fields are those of the
    ``REQUEST_HEAD`` the server gives (the wsgi layer's does), else of the
    environ.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], log: RequestLog) -> None:
        self.app = app
        self.log = log

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH") or ""
        body = b""
        if length.isdigit():
            body = environ["wsgi.input"].read(int(length))
            environ["wsgi.input"] = io.BytesIO(body)
        head = environ.pop(REQUEST_HEAD, None)
        if head is not None:  # kept as it is: parsed when a test reads it
            self.log.append(_UnreadHead(head, body, environ.get("SSL_CLIENT_CERT")))
            return self.app(environ, start_response)
        variables = dict(environ)
        for key in CONNECTION_VARIABLES:
            variables.pop(key, None)
        self.log.append(_UnreadEnviron(variables, body))
        return self.app(environ, start_response)


class _BodyFirst:
    """A request's body, already read, followed by the rest of the connection.

    It reads from the connection only as much as the handler asks for, so
    nothing of a following request is taken in advance.
    """

    def __init__(self, body: bytes, rest: Any) -> None:
        self._body = io.BytesIO(body)
        self.rest = rest

    def read(self, size: int | None = -1) -> bytes:
        data = self._body.read(size)
        if size is None or size < 0:
            return data + self.rest.read()
        if len(data) < size:
            data += self.rest.read(size - len(data))
        return data

    def read1(self, size: int = -1) -> bytes:
        return self._body.read1(size) or self.rest.read1(size)

    def readline(self, size: int | None = -1) -> bytes:
        line = self._body.readline(size)
        if line.endswith(b"\n") or (size is not None and 0 <= size <= len(line)):
            return line
        return line + self.rest.readline(-1 if size is None or size < 0 else size - len(line))

    # What a handler may read with besides (io.BufferedReader's), each on
    # read, read1 or readline above: the connection's own would skip the body.

    def readinto(self, buffer: Any) -> int:
        return self._into(buffer, self.read)

    def readinto1(self, buffer: Any) -> int:
        return self._into(buffer, self.read1)

    @staticmethod
    def _into(buffer: Any, read: Any) -> int:
        target = memoryview(buffer).cast("B")
        data = read(len(target))
        target[: len(data)] = data
        return len(data)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> _BodyFirst:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def peek(self, size: int = 0) -> bytes:
        position = self._body.tell()
        unread = self._body.getbuffer()[position:].tobytes()
        return unread if unread else bytes(self.rest.peek(size))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rest, name)


class _MalformedBody(ServerLayerError, ValueError):
    """A request body whose framing is broken; the client gets a 400 saying how."""

    status = 400


class _BodyTooLarge(_MalformedBody):
    """A request body over ``MOST_BODY``; the client gets a 413."""

    status = 413


#: The largest request body the layers built on http.server take, as
#: waitress's default ``max_request_body_size`` (1 GiB) does for the wsgi
#: layer. A larger one gets a 413: it is held in memory to be recorded.
MOST_BODY = 1 << 30


#: The longest chunk-size or trailer line, as ``http.server`` limits the request line.
_MAX_LINE = 65536
#: The most trailer fields, as ``http.client`` limits header fields.
_MAX_TRAILERS = 100
#: 16 hex digits already make 2**64 bytes: a longer size is no real chunk.
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: A huge chunk is read in pieces, so that its size claims no memory up front.
_PIECE = 65536


def _read_line(rfile: Any, raw: bytearray) -> bytes:
    """The next line without its CRLF (or bare LF), appended to ``raw``."""
    line = rfile.readline(_MAX_LINE + 1)
    raw += line
    if not line.endswith(b"\n"):
        if len(line) > _MAX_LINE:
            raise _MalformedBody(f"a line longer than {_MAX_LINE} bytes")
        raise _MalformedBody("the connection closed before the body ended")
    return line.removesuffix(b"\n").removesuffix(b"\r")


def _read_chunked(rfile: Any) -> tuple[bytes, bytes]:
    """A chunked body (RFC 9112 section 7.1): decoded, and as sent.

    Chunk extensions and trailer fields are read and left out of the
    decoded body.
    """
    raw = bytearray()
    body = bytearray()
    while True:
        line = _read_line(rfile, raw)
        size_field = line.split(b";", 1)[0].strip(b" \t")
        if not _CHUNK_SIZE.fullmatch(size_field):
            raise _MalformedBody(f"bad chunk size {line[:20]!r}, expected 1 to 16 hex digits")
        size = int(size_field, 16)
        if not size:
            break
        if len(body) + size > MOST_BODY:
            raise _BodyTooLarge(f"a body over {MOST_BODY} bytes")
        remaining = size
        while remaining:
            piece = rfile.read(min(remaining, _PIECE))
            if not piece:
                raise _MalformedBody("the connection closed before the body ended")
            raw += piece
            body += piece
            remaining -= len(piece)
        if _read_line(rfile, raw):
            raise _MalformedBody(f"chunk of {size} bytes not followed by CRLF")
    for _ in range(_MAX_TRAILERS + 1):
        if not _read_line(rfile, raw):
            return bytes(body), bytes(raw)
    raise _MalformedBody(f"more than {_MAX_TRAILERS} trailer fields")


def _transfer_codings(headers: email.message.Message) -> list[str]:
    return [
        coding.strip().lower()
        for value in headers.get_all("Transfer-Encoding") or ()
        for coding in value.split(",")
        if coding.strip()
    ]


def _owes_continue(request: Any) -> bool:
    """Whether the client waits for a ``100 Continue`` that http.server did not send.

    http.server sends it only for HTTP/1.1 handlers. Recording reads the
    body before the handler runs, so the client of an HTTP/1.0 handler
    would wait for it (curl: one second) before sending the body anyway.
    """
    return (
        request.headers.get("Expect", "").lower() == "100-continue"
        and request.request_version >= "HTTP/1.1"
        and request.protocol_version < "HTTP/1.1"
    )


def _read_exactly(rfile: Any, length: int) -> bytes:
    """``length`` bytes of ``rfile``, fewer only if the connection ends:
    an unbuffered file (a handler's ``rbufsize = 0``) returns what one
    read of the socket gives."""
    parts = []
    while length:
        # A buffered file makes room for all it is asked for before it
        # reads: a client's Content-Length alone would take the memory.
        piece = rfile.read(min(length, _PIECE))
        if not piece:
            break
        parts.append(piece)
        length -= len(piece)
    return b"".join(parts)


#: RFC 9112 section 6.3: a Content-Length is one or more ASCII digits.
#: ``str.isdigit`` also takes other digits (``"²"``, which ``int`` refuses),
#: and ``int`` also takes a sign, underscores and other scripts' digits.
_LENGTH = re.compile(r"[0-9]+", re.ASCII)


def _content_length(headers: email.message.Message) -> int:
    """The body's length by the request's one Content-Length field, 0
    without one.

    The field's optional whitespace (RFC 9110 section 5.5) is no part of
    the value, and the user's handlers read ``int(headers['Content-Length'])``,
    which ignores it too. Anything else -- a sign, a list, a second field --
    leaves the body's end in doubt, which RFC 9112 section 6.3 makes an
    unrecoverable error: guessing, the server would take what follows for
    another request (RFC 9110 section 8.6 allows refusing even a list of
    equal values, and waitress does).
    """
    values = headers.get_all("Content-Length")
    if not values:
        return 0
    value = values[0].strip(" \t")
    if len(values) > 1 or not _LENGTH.fullmatch(value):
        shown = ", ".join(repr(each) for each in values)
        raise _MalformedBody(f"Content-Length {shown[:60]}: a body's length must be one field of digits")
    if len(value.lstrip("0")) > len(str(MOST_BODY)) or int(value) > MOST_BODY:
        raise _BodyTooLarge(f"Content-Length {value[:60]}: a body over {MOST_BODY} bytes")
    return int(value)


def _http_09(request_line: bytes) -> bool:
    """Whether ``http.server`` reads ``request_line`` as an HTTP/0.9
    request: ``GET /path``, without a version."""
    words = str(request_line, "iso-8859-1").split()
    return len(words) == 2 and words[0] == "GET"


def _never() -> bool:
    return False


def record_requests(
    handler: Any, log: RequestLog, client_cert: ClientCertificate | None = None, *, cut: Callable[[], bool] = _never
) -> None:
    """Make ``handler`` record each request it reads into ``log``, with the
    certificate its client presented.

    ``cut()`` says whether the server ended the connection while the
    request was still arriving (its test is over): the end it read then is
    no end of the request's head or body, so the request is none.

    Called on a ``BaseHTTPRequestHandler`` instance before its ``__init__``
    serves the connection. It sets methods on the instance rather than
    making a subclass, so that the handler's class stays the user's own.
    The handler still reads the body it expects from ``rfile``: the bytes
    as sent come first (a chunked body still chunked), then the rest of
    the connection.
    """
    handler_class = type(handler)

    def parse_request() -> bool:
        self = handler
        if self.raw_requestline in (b"\r\n", b"\n"):
            # RFC 9112 section 2.2: an empty line before a request line is
            # to be ignored (a client may end a body with an extra CRLF);
            # http.server closes the connection on it, unanswered, with
            # the requests after it. Here it is read as no request at all,
            # and the connection waits for the next, as after any answer.
            self.close_connection = False
            return False
        # http.server answers a request line it cannot parse as it answers
        # HTTP/0.9: an error page without status line or headers, which an
        # HTTP/1.x client reads as no answer (and after an answer on its
        # connection, as that answer's garbled end). Such a line is what
        # follows a request whose client sent it a body without saying so
        # (RFC 9112 section 6.3: no Content-Length, no Transfer-Encoding, no
        # body), and it gets its 400 in HTTP/1.x. HTTP/0.9 requests are
        # answered as before.
        if not _http_09(self.raw_requestline):
            self.default_request_version = "HTTP/1.0"
        else:  # the class's again, after an HTTP/1.x request on the connection
            self.__dict__.pop("default_request_version", None)
        if not handler_class.parse_request(self) or cut():
            self.close_connection = True
            return False
        codings = _transfer_codings(self.headers)
        if codings and codings[-1] != "chunked":
            self.send_error(400, f"Transfer-Encoding {', '.join(codings)}: chunked must be the last transfer coding,"
                                 " else the body has no known end")
            return False
        length = 0
        if not codings:  # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length
            try:
                length = _content_length(self.headers)
            except _MalformedBody as problem:
                self.send_error(problem.status, str(problem))
                return False
        has_body = bool(codings) or length > 0
        if has_body and _owes_continue(self) and not self.handle_expect_100():
            return False
        if has_body and self.headers.get("Expect", "").lower() == "100-continue":
            # handle_expect_100 writes its 100 Continue to wfile, which a
            # handler with ``wbufsize`` set buffers: the body read next would
            # wait for a client that waits for that answer (gocept's handler
            # ran first, and its answer flushed both).
            self.wfile.flush()
        if codings:
            if "Content-Length" in self.headers:  # chunked wins, and the framing is in doubt
                self.close_connection = True
            try:
                body, raw = _read_chunked(self.rfile)
            except _MalformedBody as problem:
                if cut():
                    self.close_connection = True
                    return False
                malformed = problem.status == 400
                self.send_error(problem.status, f"Malformed chunked body: {problem}" if malformed else str(problem))
                return False
        else:
            body = raw = _read_exactly(self.rfile, length) if has_body else b""
            if cut():
                self.close_connection = True
                return False
            if len(body) < length:  # no request: what came is not what it announced
                self.send_error(400, f"The connection closed after {len(body)} of the {length} bytes"
                                     " that Content-Length announced")
                return False
        # The request line's target, not self.path: parse_request makes a
        # leading "//" one "/" in that (against open redirects of
        # SimpleHTTPRequestHandler, gh-87389), so "//api" would be recorded
        # and matched as "/api". The handler still gets its self.path.
        path, query, scheme, authority = split_target(self.requestline.split()[1])
        # The fields, not the handler's self.headers, which the handler may
        # change (replace_header, del) while the request is recorded as sent.
        fields = tuple(self.headers.raw_items())
        self.recorded_request = RecordedRequest(self.command, path, query, fields, body, client_cert,
                                                scheme=scheme, authority=authority)
        log.append(self.recorded_request)
        if raw:
            self.rfile = _BodyFirst(raw, self.rfile)
        return True

    def handle_one_request() -> None:
        try:
            handler_class.handle_one_request(handler)
        finally:
            if isinstance(handler.rfile, _BodyFirst):  # what the handler left unread is no next request
                handler.rfile = handler.rfile.rest

    handler.parse_request = parse_request
    handler.handle_one_request = handle_one_request
