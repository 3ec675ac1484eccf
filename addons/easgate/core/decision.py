"""The outcome of an access check: may this user on this device reach Exchange?

A :class:`Decision` is immutable and cheap, so the same object can be cached,
shared between concurrent requests and logged. ``reason`` is always one line:
control characters (which could come from attacker-supplied DeviceIds or user
names) are escaped when the decision is built, so logging it cannot forge log
lines.

``source`` says which layer decided:

=============  ==============================================================
``policy``     the allow/deny lists of the policy file
``inventory``  the policy's inventory (the MDM's list of managed devices)
``connector``  a live query to the device-management connector
``mode``       nothing matched; the policy mode (block/permit) decided
``cache``      a cached decision (re-tagged with :meth:`Decision.with_source`)
``fail-mode``  the decision backend failed; the configured fail mode decided
``filter``     a request filter (e.g. an unsupported command) decided
``identity``   the request's identity could not be established
``audit``      the request would be allowed, but its audit line cannot be written
``revoked``    an operator's revocation (authz/revocations.py)
``command``    a command-level rule of an allowed device (authz/commands.py)
``rate-limit`` a per-device request-rate limit (authz/commands.py)
``internal``   an error while re-authorizing a held request
=============  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["SOURCES", "Decision", "one_line"]

SOURCES: frozenset[str] = frozenset(
    {"policy", "inventory", "connector", "mode", "cache", "fail-mode", "filter", "identity", "audit",
     "revoked", "command", "rate-limit", "internal"}
)


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
    source: str  # one of SOURCES

    def __post_init__(self) -> None:
        clean = one_line(self.reason)
        if clean is not self.reason:
            object.__setattr__(self, "reason", clean)

    def with_source(self, source: str) -> Decision:
        """The same verdict and reason, attributed to ``source`` (e.g. ``"cache"``)."""
        if source == self.source:
            return self
        return replace(self, source=source)

    @property
    def verdict(self) -> str:
        return "allow" if self.allow else "deny"

    def __str__(self) -> str:
        return f"{self.verdict} ({self.source}): {self.reason}"
