"""The outcome of an access check: may this user on this device reach Exchange?

A :class:`Decision` is immutable and cheap, so the same object can be cached,
shared between concurrent requests and logged. ``reason`` is always one line:
control characters (which could come from attacker-supplied DeviceIds or user
names) are escaped when the decision is built, so logging it cannot forge log
lines.

``source`` (a :class:`Source`) says which layer decided; its value is what the audit log,
mitmweb and the connector's answers show:

=============  ==============================================================
``identity``   the request's identity could not be established, or is outside
               MS-ASHTTP's alphabet and lengths
``filter``     a request filter (e.g. an unsupported command) decided
``policy``     the allow/deny lists of the policy file
``block``      an operator blocked the device (``easgate devices block``)
``inventory``  the inventory (the MDM's list of managed devices)
``connector``  a live query to the device-management connector
``mode``       nothing matched; the policy mode (block/permit) decided
``cache``      a cached decision (re-tagged with :meth:`Decision.with_source`)
``fail-mode``  the connector failed; the configured fail mode decided
``audit``      the request would be allowed, but its audit line cannot be written
``revoked``    an operator's revocation (authz/revocations.py)
``command``    a command-level rule of an allowed device (authz/commands.py)
``rate-limit`` a per-device request-rate limit (authz/commands.py)
``internal``   deciding raised an error: always a deny, reason ``internal error``
=============  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache

__all__ = ["SOURCES", "Decision", "Source", "one_line"]


class Source(StrEnum):
    IDENTITY = "identity"
    FILTER = "filter"
    POLICY = "policy"
    BLOCK = "block"
    INVENTORY = "inventory"
    CONNECTOR = "connector"
    MODE = "mode"
    CACHE = "cache"
    FAIL_MODE = "fail-mode"
    AUDIT = "audit"
    INTERNAL = "internal"
    REVOKED = "revoked"
    COMMAND = "command"
    RATE_LIMIT = "rate-limit"


SOURCES: frozenset[str] = frozenset(s.value for s in Source)


def one_line(text: object, limit: int = 500) -> str:
    """``text`` as a single printable line of at most ``limit`` characters.

    Non-printable characters (CR, LF, NUL, ESC, ...) are shown as Python escapes.
    """
    s = str(text)
    if not s.isprintable():
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    reason: str  # one line, e.g. "device ApplF17ABC not managed", "user mallory on deny list"
    source: Source  # a plain string is converted (ValueError if it names no Source)

    def __post_init__(self) -> None:
        if type(self.source) is not Source:
            object.__setattr__(self, "source", Source(self.source))
        clean = one_line(self.reason)
        if clean is not self.reason:
            object.__setattr__(self, "reason", clean)

    def with_source(self, source: Source) -> Decision:
        """The same verdict and reason, attributed to ``source`` (e.g. ``Source.CACHE``)."""
        if source == self.source:
            return self
        return _with_source(self, Source(source))

    @property
    def verdict(self) -> str:
        return "allow" if self.allow else "deny"

    def __str__(self) -> str:
        return f"{self.verdict} ({self.source}): {self.reason}"


#: Every error raised while deciding becomes this decision (audited and counted by the gateway).
INTERNAL_ERROR = Decision(False, "internal error", Source.INTERNAL)


@lru_cache(maxsize=4096)
def _with_source(d: Decision, source: Source) -> Decision:
    # Every cache hit re-tags its decision: the same few decisions, again and again (an equal
    # Decision is interchangeable: frozen, compared by value).
    return replace(d, source=source)
