"""Conditional and range requests for a file (RFC 9110 sections 13 and 14),
as browsers, media players and resuming download clients send them.

The static layer's handler asks ``precondition_status`` whether the
request's ``If-*`` fields stop it (304 or 412), then ``requested`` which
byte ranges to send, and sends a ``Body``.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.message
import email.utils
import re
import secrets
import sys
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

#: An entity tag: optionally weak (``W/``), then an opaque quoted string.
_ENTITY_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
_RANGE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")

#: A request's header fields: http.server's message, or a mapping.
Headers = email.message.Message | Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Representation:
    """What the conditions are evaluated against: a file's size, strong
    entity tag and modification time (whole seconds, as HTTP dates are)."""

    size: int
    etag: str
    modified: int


def _entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """The (weak, opaque tag) pairs of an ``If-Match``/``If-None-Match``
    list; None for ``*``, or for a list that does not parse (which then
    matches nothing)."""
    if value.strip() == "*":
        return None
    tags, position = [], 0
    while position < len(value):
        found = _ENTITY_TAG.match(value, position)
        if not found:
            return []
        tags.append((bool(found.group(1)), found.group(2)))
        position = found.end()
    return tags


def _matches(value: str, etag: str, *, weak: bool) -> bool:
    """Whether an ``If-Match``/``If-None-Match`` value matches ``etag``:
    ``*`` matches any current representation; a weak comparison ignores
    ``W/``, a strong one never matches a weak tag."""
    tags = _entity_tags(value)
    if tags is None:
        return True
    return any(tag == etag and (weak or not is_weak) for is_weak, tag in tags)


#: asctime's date format, the third HTTP-date format (RFC 9110 section
#: 5.6.7), which names no zone: it is in UTC.
_ASCTIME = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2} \d{4}")


def _date(value: str | None) -> int | None:
    """An HTTP date in whole seconds since the epoch; None if it does not parse."""
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        # A recipient must accept asctime's format, which parses without a
        # zone (as http.server does); another date without one is no date.
        if not _ASCTIME.fullmatch(value.strip()):
            return None
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return int(parsed.timestamp())


def precondition_status(representation: Representation, method: str, headers: Headers) -> int | None:
    """304 or 412 if the request's conditions say so, else None (RFC 9110
    section 13.2.2: If-Match, then If-Unmodified-Since, then If-None-Match,
    then If-Modified-Since)."""
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not _matches(if_match, representation.etag, weak=False):
            return HTTPStatus.PRECONDITION_FAILED
    else:
        since = _date(headers.get("If-Unmodified-Since"))
        if since is not None and representation.modified > since:
            return HTTPStatus.PRECONDITION_FAILED
    safe = method in ("GET", "HEAD")
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if _matches(if_none_match, representation.etag, weak=True):
            return HTTPStatus.NOT_MODIFIED if safe else HTTPStatus.PRECONDITION_FAILED
    elif safe:
        since = _date(headers.get("If-Modified-Since"))
        if since is not None and representation.modified <= since:
            return HTTPStatus.NOT_MODIFIED
    return None


def requested(representation: Representation, method: str, headers: Headers) -> list[tuple[int, int]] | None:
    """The byte ranges to send, as (first, last) inclusive; None for the
    whole representation; [] when none of them is satisfiable (416).

    A ``Range`` on a method other than GET, in a unit other than bytes, or
    that does not parse is ignored, as is one whose ``If-Range`` no longer
    matches: the client then gets the whole, current file.
    """
    value = headers.get("Range")
    if method != "GET" or value is None:
        return None
    unit, _, specs = value.partition("=")
    if unit.strip().lower() != "bytes" or not specs.strip():
        return None
    if_range = headers.get("If-Range")
    if if_range is not None and not _if_range_holds(if_range.strip(), representation):
        return None
    size = representation.size
    found = []
    for spec in specs.split(","):
        if not spec.strip():
            continue  # an empty list element, to be ignored (RFC 9110 section 5.6.1.2)
        parsed = _RANGE.fullmatch(spec)
        if not parsed or not (parsed.group(1) or parsed.group(2)):
            return None
        first, last = parsed.group(1), parsed.group(2)
        if not first:  # the last N bytes
            suffix = _position(last)
            if suffix and size:
                found.append((max(0, size - suffix), size - 1))
            continue
        if last and _precedes(last, first):
            return None  # invalid: the whole field is ignored
        start = _position(first)
        if start < size:
            found.append((start, min(_position(last), size - 1) if last else size - 1))
    if not any(spec.strip() for spec in specs.split(",")):
        return None
    if sum(last - first + 1 for first, last in found) > size:
        # Overlapping ranges would send more than the whole file, as often
        # as a client repeats them (RFC 9110 section 17.15): it gets the whole.
        return None
    if len(found) > MOST_RANGES:
        # Each part costs a part header of about a hundred bytes: thousands
        # of one-byte ranges make a response many times the bytes asked for.
        return None
    return found


#: How many ranges one request may ask for; more get the whole file (200),
#: as Apache's ``MaxRanges`` does. Clients ask for one, or a handful.
MOST_RANGES = 200


#: More digits than any file's size has: such a position is past every end.
_MOST_DIGITS = 19


def _position(digits: str) -> int:
    """A byte position of ``Range``, however many digits it has (``int``
    refuses more than 4,300, leading zeros counted)."""
    significant = digits.lstrip("0") or "0"
    return sys.maxsize if len(significant) > _MOST_DIGITS else int(significant)


def _precedes(digits: str, other: str) -> bool:
    """Whether position ``digits`` comes before ``other``, however many digits either has."""
    one, two = digits.lstrip("0") or "0", other.lstrip("0") or "0"
    return (len(one), one) < (len(two), two)


def _if_range_holds(value: str, representation: Representation) -> bool:
    """An entity tag must match strongly; a date exactly (RFC 9110 section 13.1.5)."""
    if value.startswith(('"', "W/")):
        return value == representation.etag
    return _date(value) == representation.modified


class Body:
    """What to send of a file: whole, one range, or several as
    ``multipart/byteranges``; ``pieces`` are bytes to write and
    (offset, count) spans of the file to send."""

    def __init__(self, file: Any, representation: Representation, content_type: str,
                 ranges: list[tuple[int, int]] | None) -> None:
        self.file = file
        self.size = representation.size
        self.content_type = content_type
        self.pieces: list[bytes | tuple[int, int]] = []
        self.boundary = ""
        if ranges is None:
            if self.size:  # sendfile refuses to send nothing
                self.pieces.append((0, self.size))
        elif len(ranges) == 1:
            [(first, last)] = ranges
            self.pieces.append((first, last - first + 1))
        else:
            self.boundary = secrets.token_hex(16)
            for first, last in ranges:
                self.pieces.append(
                    f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Range: bytes {first}-{last}/{self.size}\r\n\r\n".encode("latin-1")
                )
                self.pieces.append((first, last - first + 1))
                self.pieces.append(b"\r\n")
            self.pieces.append(f"--{self.boundary}--\r\n".encode("latin-1"))
        self.ranges = ranges
        #: Where ``read`` goes on: the piece, and how far into it.
        self._piece = 0
        self._offset = 0

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all, if negative) of what ``pieces`` stand
        for, from where the last read ended.

        ``http.server``'s ``send_head`` returns the open file, and handler
        subclasses read it: a ``copyfile`` of their own (a slow link), a
        ``do_GET`` that changes what it sends. ``static`` sends with
        ``sendfile`` and never reads; this is for them. A file that shrank
        since its head was sent reads short, as the file itself would.
        """
        parts: list[bytes] = []
        wanted = None if size is None or size < 0 else size
        while self._piece < len(self.pieces) and wanted != 0:
            piece = self.pieces[self._piece]
            if isinstance(piece, bytes):
                length = len(piece)
                data = piece[self._offset:length if wanted is None else self._offset + wanted]
            else:
                start, length = piece
                left = length - self._offset
                self.file.seek(start + self._offset)
                data = self.file.read(left if wanted is None else min(left, wanted))
                if not data:  # the file ends sooner now
                    self._piece = len(self.pieces)
                    break
            parts.append(data)
            self._offset += len(data)
            if wanted is not None:
                wanted -= len(data)
            if self._offset >= length:
                self._piece, self._offset = self._piece + 1, 0
        return b"".join(parts)

    def headers(self) -> list[tuple[str, str]]:
        length = sum(len(piece) if isinstance(piece, bytes) else piece[1] for piece in self.pieces)
        if self.boundary:
            content_type = f"multipart/byteranges; boundary={self.boundary}"
        else:
            content_type = self.content_type
        found = [("Content-Type", content_type), ("Content-Length", str(length))]
        if self.ranges is not None and not self.boundary:
            first, last = self.ranges[0]
            found.append(("Content-Range", f"bytes {first}-{last}/{self.size}"))
        return found

    def close(self) -> None:
        self.file.close()
