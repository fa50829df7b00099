"""How a request body or message differs from what a test expects, said
the way a reader fixes it: ``$.amount is 42.0, not 4200``."""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import operator
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from serverlayer.errors import ConfigurationError, ScriptError

_Result = TypeVar("_Result")

def call_test_function(function: Callable[..., _Result], *arguments: Any) -> _Result:
    """``function(*arguments)``, a function the test gave the server.

    The server takes a ``ConnectionError`` or ``TimeoutError`` for its
    client hanging up, which is no error; raised by the test's own function
    (calling a service that is down), it is the test's failure, and is
    raised again as a ``ScriptError``.
    """
    try:
        return function(*arguments)
    except (ConnectionError, TimeoutError) as error:
        name = getattr(function, "__qualname__", repr(function))
        raise ScriptError(f"{name}, given by the test, raised {error!r}") from error


#: At most this many differences of one body are listed; then "and N more".
SHOWN_DIFFERENCES = 5


def json_differences(expected: object, actual: object, path: str = "$", *, subset: bool = False) -> list[str]:
    """Where ``actual`` differs from ``expected``, one ``$.path`` each.

    With ``subset``, ``actual`` may hold more keys than ``expected``, at any
    depth. ``True`` is not ``1`` here, as it is not in JSON.
    """
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key, value in expected.items():
            if key not in actual:
                found.append(f"{path}.{key} is missing")
            else:
                found.extend(json_differences(value, actual[key], f"{path}.{key}", subset=subset))
        if not subset:
            found.extend(f"{path}.{key} is not expected" for key in actual if key not in expected)
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path} has {len(actual)} items, not {len(expected)}"]
        return [line for index, (want, got) in enumerate(zip(expected, actual, strict=True))
                for line in json_differences(want, got, f"{path}[{index}]", subset=subset)]
    if expected == actual and isinstance(expected, bool) == isinstance(actual, bool):
        return []
    # Text as written ("Zoë"), not escaped ("Zo\u00eb"): reports show JSON values that way.
    return [f"{path} is {json.dumps(actual, ensure_ascii=False)}, not {json.dumps(expected, ensure_ascii=False)}"]


def shortened(found: list[str], prefix: str) -> list[str]:
    """``found``, each line with ``prefix``, cut to ``SHOWN_DIFFERENCES`` lines."""
    lines = [f"{prefix}{line}" for line in found[:SHOWN_DIFFERENCES]]
    if len(found) > SHOWN_DIFFERENCES:
        lines.append(f"and {len(found) - SHOWN_DIFFERENCES} more differences")
    return lines


def form_fields(content_type: str, body: bytes) -> dict[str, list[str]] | None:
    """The fields of an urlencoded or multipart form body; None for any
    other body. A file field's value is its content, decoded as UTF-8."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        return urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    if kind != "multipart/form-data":
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return None
    fields: dict[str, list[str]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            fields.setdefault(name, []).append(data.decode("utf-8", "replace"))
    return fields


def checked_fields(setting: str, fields: object) -> dict[str, str | list[str]]:
    """``query=`` or ``form=`` fields, each value a str or a list of str;
    refuses what no request could have (``{"page": 1}``)."""
    if not isinstance(fields, Mapping):
        raise ConfigurationError(
            f"{setting}={fields!r}: give a mapping of field names to values, such as {{'page': '1'}}."
        )
    checked: dict[str, str | list[str]] = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"{setting}=: a field's name is a str; {name!r} is not.")
        if isinstance(value, str):
            checked[name] = value
            continue
        values = list(value) if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)) else None
        if values is None or not all(isinstance(each, str) for each in values):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                hint = f" (write {str(value)!r})"
            elif values is not None and all(isinstance(each, (int, float, str)) for each in values):
                hint = f" (write {[str(each) for each in values]!r})"
            else:
                hint = ""
            raise ConfigurationError(
                f"{setting}=: field {name!r} is {value!r}; a value is a str or a list of str, as fields"
                f" arrive in a request{hint}."
            )
        checked[name] = values
    return checked


def form_differences(expected: Mapping[str, str | Sequence[str]], fields: Mapping[str, list[str]]) -> list[str]:
    """The fields that differ; fields the form has beyond ``expected`` are fine."""
    found = []
    for name, value in expected.items():
        wanted = [value] if isinstance(value, str) else list(value)
        if name not in fields:
            found.append(f"field {name} is missing")
        elif fields[name] != wanted:
            got = fields[name][0] if len(fields[name]) == 1 else fields[name]
            found.append(f"field {name} is {got!r}, not {value!r}")
    return found


def shown(value: Any, limit: int = 60) -> str:
    """``value``'s repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bytes_difference(actual: bytes, expected: bytes, limit: int = 60) -> str:
    """How ``actual`` differs from ``expected``, for a report: both whole
    when they are short; else from where they part, as both cut to their
    first ``limit`` characters are often the same and say nothing."""
    if len(repr(actual)) <= limit and len(repr(expected)) <= limit:
        return f"is {shown(actual, limit)}, not {shown(expected, limit)}"
    # The length of the part they share, found by comparing halves (in C)
    # rather than byte by byte in Python: bodies run to megabytes.
    first, second = memoryview(actual), memoryview(expected)
    low, high = 0, min(len(actual), len(expected))
    while low < high:
        middle = (low + high + 1) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle - 1
    if low == min(len(actual), len(expected)):
        return f"is {len(actual)} bytes, not {len(expected)}, the same as far as it goes"
    return f"differs from byte {low} on: it has {shown(actual[low:], limit)}, not {shown(expected[low:], limit)}"


def check_counts(times: int | None, at_least: int | None) -> int | None:
    """Refuse an expectation's count that no number of requests or messages
    could meet (``times=-1``, ``times=1.5``), or that any would (``at_least=0``);
    return the exact count, None when ``at_least`` gives a minimum instead."""
    if times is None and at_least is None:
        raise ConfigurationError("expect() needs times= or at_least=.")
    if at_least is not None:
        # times defaults to 1, so only another number says the test gave both;
        # at_least won, and the exact count asked for too went unchecked.
        if times is not None and times != 1:
            raise ConfigurationError(
                f"expect(times={times!r}, at_least={at_least!r}): give times= for an exact count"
                " or at_least= for a minimum, not both."
            )
        times = None
    for name, value, least in (("times", times, 0), ("at_least", at_least, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigurationError(f"expect({name}={value!r}): a count is a whole number, {least} or more.")
    return times


def seconds(value: object, *, setting: str, meaning: str, otherwise: str) -> float:
    """``value``, a pause or pace in seconds, as a float; refuses what no
    clock reaches: NaN or infinity made a schedule of NaN (a server thread
    spinning) or a wait the server raised on. A very long wait is a large
    finite number; the server waits it out in slices."""
    number = _as_float(value)
    if number is not None and 0 <= number < math.inf:
        return number
    if number == math.inf:
        hint = ("infinity never comes: for a very long wait give a large number, such as 3600"
                " (the end of the test cuts it short)")
    elif isinstance(value, str) and _is_number(value):
        hint = f"write the number {float(value)!r}, not the text {value!r}"
    else:
        hint = otherwise
    raise ConfigurationError(f"{setting}={value!r}: {meaning}; {hint}.")


def _as_float(value: object) -> float | None:
    """``value`` as a float if it is a number (an int, a float, a
    ``Fraction``, a ``Decimal``, numpy's), not its text nor a bool."""
    if isinstance(value, (str, bytes, bytearray, bool)):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float waits as long as the largest
        return sys.float_info.max if value > 0 else None  # type: ignore[operator]
    except (TypeError, ValueError):
        return None


def whole(value: object) -> int | None:
    """``value`` as an int if it is a whole number (an int, numpy's, an
    ``IntEnum`` such as ``HTTPStatus``), not a bool nor a float."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_path(path: object, *, where: str, takes_query: bool) -> None:
    """Refuse a path no request can have: a request's path starts with
    ``/`` and holds no query (that is matched apart), so ``"feed"`` or
    ``"/feed?token=abc"`` would never match. ``"*"``, the target of
    ``OPTIONS *``, is a path an HTTP request (not a handshake) can have.
    ``takes_query``: whether ``where`` matches a query with ``query=``."""
    if isinstance(path, re.Pattern) and isinstance(path.pattern, bytes):
        # Paths are matched as text: each request raised a TypeError in the server.
        raise ConfigurationError(
            f"{where}({path!r}): paths are text: compile a str pattern, such as re.compile(r'/orders/\\d+')."
        )
    if isinstance(path, re.Pattern) or (path == "*" and takes_query):
        return
    if not isinstance(path, str):
        raise ConfigurationError(f"{where}({path!r}): a path is a str or a compiled regular expression.")
    base, question_mark, query = path.partition("?")
    if not path.startswith("/"):
        if path in ("", "*") or "://" in path:
            fix = f'give the path alone, such as {where}("/feed")'
        else:
            fix = _fix("/" + base, query, where=where, takes_query=takes_query)
        raise ConfigurationError(f'{where}({path!r}): a request\'s path starts with "/", so this one would'
                                 f" never match; {fix}.")
    if question_mark:
        raise ConfigurationError(
            f"{where}({path!r}): a path is matched without its query, so this one would never match;"
            f" {_fix(base, query, where=where, takes_query=takes_query)}."
            " A question mark that is part of the path is sent encoded: write it %3F."
        )


def _fix(base: str, query: str, *, where: str, takes_query: bool) -> str:
    """What to write for ``base`` with ``query``: the query's fields as
    ``query=``, decoded as a request's are matched, a repeated one as a list."""
    if not takes_query:
        if not query:
            return f"write {where}({base!r})"
        return f"write {where}({base!r}), which serves it whatever the query (http_requests records the query)"
    fields = urllib.parse.parse_qs(query, keep_blank_values=True)
    if not fields:
        return f"write {where}({base!r})"
    pairs = {name: values[0] if len(values) == 1 else values for name, values in fields.items()}
    return f"write {where}({base!r}, query={pairs!r})"
