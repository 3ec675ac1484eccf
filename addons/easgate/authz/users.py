"""How a user written in a policy matches the user a client sent (the policy's "User matching").

Its own module because the policy file and its command rules (authz/commands.py, which the policy
file may hold) both match users, and the policy imports the command rules.
"""

from __future__ import annotations

__all__ = ["split_user", "user_matches"]


def split_user(user: str) -> tuple[str, str, bool]:
    """``(full, bare, has_domain)``, lower-cased.

    ``CONTOSO\\Alice`` -> ``("contoso\\alice", "alice", True)``;
    ``Alice@Contoso.com`` -> ``("alice@contoso.com", "alice", True)``;
    ``alice`` -> ``("alice", "alice", False)``.
    """
    full = user.strip().lower()
    bare = full
    has_domain = False
    if "\\" in bare:
        bare = bare.rpartition("\\")[2]  # the account follows the last backslash
        has_domain = True
    if "@" in bare:
        bare = bare.rpartition("@")[0]
        has_domain = True
    return full, bare, has_domain


def user_matches(entry: str, user: str) -> bool:
    """Does the policy ``entry`` match the ``user`` a client sent? (See authz/policy.py, "User matching".)"""
    e_full, e_bare, e_dom = split_user(entry)
    u_full, u_bare, _ = split_user(user)
    return e_full == u_full if e_dom else e_bare == u_bare
