"""Serve a directory of files.

    >>> from serverlayer import static
    >>> FILES = static.Layer(name='FILES')   # a fresh temporary directory

Given no directory, the layer creates a temporary one, publishes it as the
``documentroot`` resource, empties it before every test and removes it in
``tearDown``. A directory you pass in is served as it is and never changed.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Final

import plone.testing

from serverlayer import custom, ranges
from serverlayer.errors import ConfigurationError
from serverlayer.layer import flag
from serverlayer.recording import split_target


class StaticFileHandler(custom.RequestHandler, http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` that never lets a URL leave its directory.

    The standard library drops ``..`` from the path, but fails on NUL bytes
    and on names the file system cannot encode; those end in a 404 here. A
    subclass's own ``translate_path`` is served wherever it points, as
    under ``http.server``. Symbolic links in the directory are followed wherever they
    point, as the standard library, gocept.httpserverlayer, nginx and Apache
    do: tests link fixtures into the served directory. With
    ``follow_symlinks=False`` a link is served only if it resolves inside.
    """

    protocol_version = "HTTP/1.1"
    #: The directory served when the layer passes none: gocept.httpserverlayer's
    #: users subclass ``StaticFileRequestHandler`` and set it on the class
    #: to serve a directory from ``custom.Layer``. A handler object also has
    #: it set to the directory it serves.
    documentroot: str | None = None
    #: Browsers may keep a file but ask whether it changed (a 304 when it
    #: did not) each time: a browser shared by the tests would otherwise
    #: take a file from its cache for a while (a tenth of its age, by
    #: heuristic) after a later test rewrote it, and keep a directory's
    #: redirect (301) or a 404 after a later test made the file. Sent with
    #: every final answer. A subclass may set another, or None for none.
    cache_control: str | None = "no-cache"
    #: Set on the class a static layer serves while it is set up: the
    #: directory the layer passes is its ``documentroot``, which a test may change.
    _documentroot_from_layer = False
    #: Whether the answer being sent has its Cache-Control already.
    _cache_control_sent = True

    def __init__(
        self,
        *args: Any,
        directory: str | os.PathLike[str] | None = None,
        follow_symlinks: bool = True,
        **kwargs: Any,
    ) -> None:
        self.follow_symlinks = follow_symlinks  # before the base class serves the request
        #: Whether the directory is the class's ``documentroot``, read again for every request.
        self._root_of_class = directory is None or self._documentroot_from_layer
        if directory is None:
            directory = self.documentroot
        if directory is None:
            server = args[2] if len(args) > 2 else None
            raise ConfigurationError(
                f"{type(self).__qualname__}, serving"
                f" {getattr(server, 'server_name', '?')}:{getattr(server, 'server_port', '?')},"
                " has no directory to serve. Set documentroot on the class,"
                " or serve the directory with static.Layer(directory)."
            )
        self.documentroot = os.fspath(directory)
        super().__init__(*args, directory=self.documentroot, **kwargs)

    def parse_request(self) -> bool:
        # gocept.httpserverlayer's handler read its class's documentroot
        # for every request: a test could point the layer's
        # ``request_handler`` at another directory for a while. Here one
        # handler serves a keep-alive connection's requests, so the class's
        # is taken again for each.
        if self._root_of_class:
            root = type(self).documentroot
            if root is not None:
                self.documentroot = self.directory = os.fspath(root)
        return bool(super().parse_request())

    def __getattr__(self, name: str) -> Any:
        # http.server answers a method without a do_ method 501 (not
        # implemented); a file server that knows the method but allows only
        # GET and HEAD answers 405 and says so (RFC 9110 section 15.5.6).
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        body = f"{self.command} is not allowed here: a static file server answers GET and HEAD.\n".encode()
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_response_only(self, code: int, message: str | None = None) -> None:
        # An interim answer (100 Continue) is no answer a cache keeps.
        self._cache_control_sent = code < 200 or self.cache_control is None
        super().send_response_only(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "cache-control":
            self._cache_control_sent = True
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        # Listings, redirects and errors come from http.server, which sends none.
        if not self._cache_control_sent:
            self.send_header("Cache-Control", str(self.cache_control))
        super().end_headers()

    def translate_path(self, path: str) -> str:
        # A client that uses the layer as its proxy names the host in the
        # request target (``GET http://api.example.com/file``: the absolute
        # form, which RFC 9112 section 3.2.2 says a server must accept).
        # http.server takes the whole URL for the file's path, and finds none.
        if not path.startswith("/"):
            file_path, query, _, authority = split_target(path)
            if authority:
                path = file_path + (f"?{query}" if query else "")
        return str(super().translate_path(path))

    def send_head(self) -> Any:
        path = self.translate_path(self.path)
        if not self._inside_directory(path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        if os.path.isdir(path) and urllib.parse.urlsplit(self.path).path.endswith("/"):
            index = next((candidate for name in ("index.html", "index.htm")
                          if os.path.isfile(candidate := os.path.join(path, name))), None)
            if index is not None and not self._inside_directory(index):
                self.send_error(HTTPStatus.NOT_FOUND, "File not found")
                return None
            path = index or path
        if path.endswith("/") or not os.path.isfile(path):  # listings, redirects, what is missing
            return super().send_head()
        try:
            file = open(path, "rb")  # noqa: SIM115 - do_GET closes it
        except OSError:  # gone since, or unreadable: as http.server answers
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        try:
            return self._send_file_head(file, self.guess_type(path))
        except BaseException:
            file.close()
            raise

    def _send_file_head(self, file: Any, content_type: str) -> Any:
        """Answer for a regular file: conditions, ranges, or the whole of it."""
        stat = os.fstat(file.fileno())
        representation = ranges.Representation(
            size=stat.st_size,
            etag=f'"{stat.st_ino:x}-{stat.st_size:x}-{stat.st_mtime_ns:x}"',
            modified=int(stat.st_mtime),
        )
        status = ranges.precondition_status(representation, self.command, self.headers)
        if status is not None:
            file.close()
            if status == HTTPStatus.NOT_MODIFIED:
                self.send_response(status)
                self.send_header("ETag", representation.etag)
                self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
                self.end_headers()
            else:
                self.send_error(status)
            return None
        wanted = ranges.requested(representation, self.command, self.headers)
        if wanted == []:
            file.close()
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{representation.size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        body = ranges.Body(file, representation, content_type, wanted)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if wanted else HTTPStatus.OK)
        for name, value in body.headers():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", representation.etag)
        self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
        self.end_headers()
        return body

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Send a file's bytes with ``sendfile``: the kernel copies them to the socket.

        Anything else (a directory listing) and any other output (a
        subclass that buffers what it sends) goes as ``http.server`` sends it.
        """
        if not isinstance(source, ranges.Body):
            super().copyfile(source, outputfile)
            return
        writing = getattr(self.server, "writing", None)
        try:
            # A client that stops reading (a browser's <audio> or <video>
            # with its buffer full) holds the write: marked as the test's,
            # it is cut when the test ends, and its worker freed.
            with writing(self.connection) if writing is not None else contextlib.nullcontext():
                self._send_pieces(source, outputfile)
        except ConnectionError:  # cut at the test's end, or the client left
            self.close_connection = True

    def _send_pieces(self, source: ranges.Body, outputfile: Any) -> None:
        for piece in source.pieces:
            if isinstance(piece, bytes):
                outputfile.write(piece)
                continue
            offset, count = piece
            if outputfile is self.wfile:
                sent = self.connection.sendfile(source.file, offset, count)
            else:
                source.file.seek(offset)
                data = source.file.read(count)
                outputfile.write(data)
                sent = len(data)
            if sent < count:
                # The file shrank while it was sent (a test truncated or
                # rewrote it): the answer is shorter than it said, and the
                # client would wait for the rest for ever. Ending the
                # connection tells it at once that the answer is cut.
                self.close_connection = True
                return

    def _inside_directory(self, path: str) -> bool:
        if "\0" in path:
            return False
        try:
            os.fsencode(path)
        except UnicodeEncodeError:  # a name the file system cannot encode, such as a lone surrogate
            return False
        if type(self).translate_path is not StaticFileHandler.translate_path:
            # A subclass that maps URLs to files itself (another directory
            # mounted under /extra/, say) is taken at its word, as by
            # http.server and gocept.httpserverlayer, whose users did so.
            # The base class's mapping, which it calls for the rest, drops
            # ".." from URLs already.
            return True
        # abspath only normalises the path as written; realpath also resolves links.
        resolve = os.path.abspath if self.follow_symlinks else os.path.realpath
        root, candidate = resolve(self.directory), resolve(path)
        return candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep)


#: gocept.httpserverlayer's name.
StaticFileRequestHandler = StaticFileHandler

#: No directory: serve a fresh temporary one (what ``Layer()`` does);
#: gocept.httpserverlayer's name for it.
TEMPORARY: Final = None


class Layer(custom.Layer):
    """Serves ``documentroot``, or a temporary directory when none is given.

    As with gocept.httpserverlayer, positional arguments after the
    directory are plone.testing's ``bases``, ``name`` and ``module``.
    Symbolic links in it are served wherever they point;
    ``follow_symlinks=False`` answers 404 for those that lead outside.
    """

    #: Serve symbolic links in the directory wherever they point.
    follow_symlinks: bool = True

    def __init__(
        self,
        documentroot: str | os.PathLike[str] | None = TEMPORARY,
        bases: Iterable[plone.testing.Layer] | None = None,
        name: str | None = None,
        module: str | None = None,
        *,
        follow_symlinks: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(_handler_of_one_layer(), bases, name, module, **kwargs)
        self.documentroot = None if documentroot is None else os.fspath(documentroot)
        if follow_symlinks is not None:
            # Checked: follow_symlinks="no" would be true, and serve the
            # links leading outside that it was meant to refuse.
            self.follow_symlinks = flag(follow_symlinks, owner=repr(self), setting="follow_symlinks")
        self._temporary: str | None = None

    def setUp(self) -> None:
        self.refuse_second_set_up()  # before a new directory replaces the one served
        if self.documentroot is None:
            root = self._temporary = tempfile.mkdtemp(prefix="serverlayer-static-")
        elif os.path.isdir(self.documentroot):
            root = os.path.abspath(self.documentroot)
        else:
            raise ConfigurationError(
                f"{self!r}: documentroot {self.documentroot!r} is not a"
                " directory. Pass an existing directory, or none to serve a"
                " fresh temporary one."
            )
        self.publish({"documentroot": root})
        handler = self.request_handler
        assert isinstance(handler, type)  # the class of its own that __init__ made
        handler.documentroot = root  # type: ignore[attr-defined]
        handler._documentroot_from_layer = True  # type: ignore[attr-defined]
        super().setUp()

    def tearDown(self) -> None:
        try:
            super().tearDown()
        finally:
            if isinstance(self.request_handler, type):
                self.request_handler.documentroot = None  # type: ignore[attr-defined]
                self.request_handler._documentroot_from_layer = False  # type: ignore[attr-defined]
            if self._temporary is not None:
                shutil.rmtree(self._temporary, ignore_errors=True)
                self._temporary = None

    def testSetUp(self) -> None:
        super().testSetUp()
        if self._temporary is not None:
            with os.scandir(self._temporary) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)

    def handler_arguments(self) -> dict[str, Any]:
        return {"directory": self["documentroot"], "follow_symlinks": self.follow_symlinks}


def _handler_of_one_layer() -> type[StaticFileHandler]:
    """``StaticFileHandler`` for one layer, which sets its ``documentroot``
    to the directory it serves while set up.

    gocept.httpserverlayer's static layers set ``documentroot`` on the one
    handler class they all shared: ``layer["request_handler"].documentroot``
    named the directory of whichever layer was set up last. Each layer
    here has a class of its own (a subclass: ``issubclass`` holds).
    """
    attributes = {"__module__": __name__, "__qualname__": StaticFileHandler.__qualname__}
    return type(StaticFileHandler.__name__, (StaticFileHandler,), attributes)


#: A ready layer serving a temporary directory.
STATIC_FILES = Layer(name="STATIC_FILES")
