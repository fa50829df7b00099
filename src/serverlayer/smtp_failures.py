"""Mail failures on demand: what the SMTP layer's server does instead of
its normal reply at each stage of a conversation, and what each
connection's client saw.

A test arranges failures on the ``smtpd`` resource:

>>> from serverlayer import smtp
>>> with smtp.Layer() as mail:
...     smtpd = mail["smtpd"]
...     retry = smtpd.fail("rcpt", 451, times=2)  # try again later, twice; then accept
...     spam = smtpd.fail("mail", 553, match="spam@example.org")
...     cut = smtpd.drop("message", after_bytes=1000)  # the connection ends mid-DATA
...     late = smtpd.delay("data", 5.0)  # 354 comes late: the client times out
>>> retry.times, retry.used  # each arrangement counts what it was used for
(2, 0)

Stages, in the order of a conversation:

=============  ==============================================================
``connect``    the greeting: a failure replaces ``220`` and ends the
               connection; ``drop`` closes it before any greeting
``helo``       EHLO and HELO, or LMTP's LHLO (``match``: the client's
               host name)
``auth``       AUTH (``match``: the mechanism)
``mail``       MAIL FROM (``match``: the sender)
``rcpt``       RCPT TO, per recipient (``match``: the recipient)
``data``       the DATA command: a failure means ``354`` never comes
``message``    the reply after the message's body (``match``: the sender;
               over LMTP, each recipient, which gets a reply of its own);
               ``drop(after_bytes=N)`` ends the connection after N bytes
               of the body
``quit``       QUIT
=============  ==============================================================

Each arrangement holds for the rest of the test, for its next ``times``
matching commands, or for the first ``connections`` connections that send
one; the first one that still applies wins. ``match`` is an
address (any case), a compiled regular expression (matching the whole
address), or a function. Every
arrangement ends with the test.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable
from typing import Any

from serverlayer.errors import ConfigurationError, ScriptError

STAGES = ("connect", "helo", "auth", "mail", "rcpt", "data", "message", "quit")
#: The stages whose command has nothing for ``match`` to look at.
UNMATCHED_STAGES = ("connect", "data", "quit")
#: The commands of each stage.
COMMAND_STAGES = {"EHLO": "helo", "HELO": "helo", "LHLO": "helo", "AUTH": "auth", "MAIL": "mail", "RCPT": "rcpt",
                  "DATA": "data", "QUIT": "quit"}
#: What a failing reply says when the test gives only its code.
DEFAULT_TEXTS = {
    421: "4.3.2 Service not available, closing transmission channel",
    450: "4.2.1 Mailbox unavailable, try again later",
    451: "4.3.0 Local error in processing, try again later",
    452: "4.3.1 Insufficient system storage",
    454: "4.7.0 Temporary authentication failure",
    535: "5.7.8 Authentication credentials invalid",
    550: "5.1.1 Mailbox unavailable",
    551: "5.1.6 User not local",
    552: "5.3.4 Message size exceeds fixed maximum message size",
    553: "5.1.3 Mailbox name not allowed",
    554: "5.3.0 Transaction failed",
}

Match = str | re.Pattern[str] | Callable[[str], bool] | None

_ADDRESS = re.compile(r"<([^>]*)>")


def command_subject(command: str, argument: str | None) -> str:
    """What ``match`` looks at for a command: the address of MAIL and RCPT,
    the host name of EHLO and HELO, the mechanism of AUTH."""
    argument = (argument or "").strip()
    if command in ("MAIL", "RCPT"):
        found = _ADDRESS.search(argument)
        return found.group(1) if found else argument.partition(":")[2].strip()
    return argument.partition(" ")[0]


@dataclasses.dataclass(kw_only=True)
class Arrangement:
    """What the server does at ``stage`` instead of its normal reply."""

    stage: str
    #: The reply instead of the normal one ("451 4.3.0 ..."), or None.
    reply: str | None = None
    #: Close the connection instead of replying.
    drop: bool = False
    #: For the ``message`` stage: close after this many bytes of the body.
    after_bytes: int | None = None
    #: Seconds to wait before replying (or dropping).
    delay: float
    #: Send the reply in two writes, this many seconds apart.
    split: float | None = None
    match: Match = None
    times: int | None = None
    connections: int | None = None
    #: How many commands it applied to so far.
    used: int = 0
    #: The connections (their transcripts' ids) it applied to.
    _met: set[int] = dataclasses.field(default_factory=set)

    def applies(self, subject: str, connection: int) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if self.connections is not None and connection not in self._met and len(self._met) >= self.connections:
            return False
        match = self.match
        if match is None:
            return True
        if isinstance(match, str):
            return subject.lower() == match.lower()
        if isinstance(match, re.Pattern):
            return match.fullmatch(subject) is not None
        try:
            return bool(match(subject))
        except Exception as error:  # the test's own code, not the server's
            raise ScriptError(
                f"the match= function {getattr(match, '__qualname__', match)!r} of an arrangement for the"
                f" {self.stage!r} stage raised {type(error).__name__} on {subject!r}"
            ) from error


class Arrangements:
    """The failures arranged for the current test; safe to change from the
    test's thread while the server's thread consults them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Read it without the lock only to see whether it is empty: the
        #: server's fast path, with nothing arranged, as for most tests.
        self.active: list[Arrangement] = []

    def add(self, arrangement: Arrangement) -> Arrangement:
        if arrangement.stage not in STAGES:
            raise ConfigurationError(
                f"{arrangement.stage!r} is no stage of an SMTP conversation; use one of {', '.join(STAGES)}."
            )
        for setting, value in (("times", arrangement.times), ("connections", arrangement.connections)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(
                    f"{setting}={value!r} must be a whole number of at least 1, or None for the rest of the test."
                )
        for setting, seconds in (("delay", arrangement.delay), ("split", arrangement.split)):
            if (seconds is None and setting == "split") or (
                isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0
            ):
                continue
            raise ConfigurationError(f"{setting}={seconds!r} must be a number of seconds, 0 or more.")
        if arrangement.after_bytes is not None and arrangement.stage != "message":
            raise ConfigurationError(
                f"after_bytes= cuts a message's body, so it belongs to the 'message' stage, not {arrangement.stage!r}."
            )
        match = arrangement.match
        if match is not None and not isinstance(match, (str, re.Pattern)) and not callable(match):
            raise ConfigurationError(
                f"match={match!r} must be an address, a compiled regular expression or a function."
            )
        if isinstance(match, re.Pattern) and not isinstance(match.pattern, str):
            raise ConfigurationError(
                f"match={match!r} is a bytes pattern; what it looks at is text: compile a str pattern."
            )
        if match is not None and arrangement.stage in UNMATCHED_STAGES:
            raise ConfigurationError(
                f"match= has nothing to look at in the {arrangement.stage!r} stage, whose command names no"
                " address: leave it out, or arrange the failure at 'mail' (the sender) or 'rcpt' (each"
                " recipient), which come before DATA."
            )
        if isinstance(match, str):
            arrangement.match = unbracketed(match)
        with self._lock:
            self.active.append(arrangement)
        return arrangement

    def take(
        self, stage: str, subject: str, *, connection: int, cuts: bool | None = None, count: bool = True
    ) -> Arrangement | None:
        """The first arrangement for ``stage`` that applies to ``subject``
        on ``connection``, counted as used unless ``count`` is false; with
        ``cuts``, only those that do (or do not) cut a message's body
        (``after_bytes``)."""
        with self._lock:
            for arrangement in self.active:
                if cuts is not None and (arrangement.after_bytes is not None) != cuts:
                    continue
                if arrangement.stage == stage and arrangement.applies(subject, connection):
                    if count:
                        arrangement.used += 1
                        arrangement._met.add(connection)
                    return arrangement
        return None

    def claim(self, arrangement: Arrangement, subject: str, *, connection: int) -> bool:
        """Count ``arrangement`` as used now, if it still applies to
        ``subject`` on ``connection`` (and the test has not ended)."""
        with self._lock:
            if all(each is not arrangement for each in self.active) or not arrangement.applies(subject, connection):
                return False
            arrangement.used += 1
            arrangement._met.add(connection)
            return True

    def clear(self) -> None:
        with self._lock:
            self.active.clear()


def unbracketed(address: str) -> str:
    """``address`` without the angle brackets SMTP puts around it."""
    address = address.strip()
    return address[1:-1].strip() if address.startswith("<") and address.endswith(">") else address


def reply(code: int, text: str) -> str:
    """``code`` and ``text`` as a reply: a line of text each, all but the
    last marked as continued (RFC 5321 section 4.2.1)."""
    lines = text.splitlines() or [""]
    return "\r\n".join(f"{code}{'-' if number < len(lines) - 1 else ' '}{line}" for number, line in enumerate(lines))


def failing_reply(code: int, text: str | None, stage: str) -> str:
    """``code`` and ``text`` as a reply, refusing what is no failure."""
    if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
        raise ConfigurationError(
            f"fail({stage!r}, {code!r}): a failure is an SMTP reply code from 400 to 599, such as 451 or 550."
        )
    if text is not None and not isinstance(text, str):
        raise ConfigurationError(f"fail({stage!r}, {code}, {text!r}): the text of a reply is a str.")
    return reply(code, text or DEFAULT_TEXTS.get(code, "Failed as the test arranged"))


@dataclasses.dataclass
class Transcript:
    """One connection as its client saw it: ``C:`` lines it sent (a
    message's body as its size; no AUTH secrets), ``S:`` lines the server
    replied, and how it ended."""

    peer: Any
    lines: list[str] = dataclasses.field(default_factory=list)
    #: Error replies the test did not arrange, each after the command it answered.
    refusals: list[str] = dataclasses.field(default_factory=list)

    def client(self, line: str) -> None:
        self.lines.append(f"C: {line}")

    def server(self, line: str, *, arranged: bool) -> None:
        """A reply; one the test did not arrange that refuses is a refusal."""
        if not arranged and line[:1] in ("4", "5"):
            commands = self.commands
            self.refusals.append(f"{commands[-1] if commands else '(connecting)'} -> {line}")
        self.lines.append(f"S: {line}")

    def closed(self) -> None:
        self.lines.append("S: <connection closed>")

    @property
    def replies(self) -> list[str]:
        return [line[3:] for line in self.lines if line.startswith("S: ")]

    @property
    def commands(self) -> list[str]:
        return [line[3:] for line in self.lines if line.startswith("C: ")]

    def __str__(self) -> str:
        return "\n".join(self.lines)


__all__ = ["STAGES", "Arrangement", "Arrangements", "Transcript"]
