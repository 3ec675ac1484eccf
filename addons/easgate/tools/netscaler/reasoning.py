"""Which requests reach a route, and does a condition hold for all, none or some of them?"""

from __future__ import annotations

import functools

from .expressions import And, Atom, Const, Not, Or, atoms_of, simplify


def _prefix_ok(a: Atom, va: bool, b: Atom, vb: bool) -> bool:
    """Can the URL tests a (= va) and b (= vb) hold together? Prefix facts between URL STARTSWITH
    tests are the only relations between conditions that matter for routing."""
    for (x, vx), (y, vy) in (((a, va), (b, vb)), ((b, vb), (a, va))):
        if not vx:
            continue
        kx, ky = (x.value.lower(), y.value.lower()) if (x.icase or y.icase) else (x.value, y.value)
        if vy and not (kx.startswith(ky) or ky.startswith(kx)):
            return False  # the URL cannot start with both
        if not vy and kx.startswith(ky) and (y.icase or not x.icase):
            return False  # x implies y
    return True


def _is_prefix(a: Atom) -> bool:
    return a.kind in ("url", "path") and a.op == "startswith" and "?" not in a.value


def _eval3(e, env: dict[Atom, bool]) -> bool | None:
    """e under a partial assignment: True, False, or None (depends on unassigned tests)."""
    if isinstance(e, Atom):
        return env.get(e)
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Not):
        v = _eval3(e.x, env)
        return None if v is None else not v
    is_and, unknown = isinstance(e, And), False
    for x in e.xs:
        v = _eval3(x, env)
        if v is None:
            unknown = True
        elif v != is_and:
            return v  # a False in AND, a True in OR decides
    return None if unknown else is_and


def satisfiable(e) -> bool:
    """Is there a request for which e holds? A backtracking search over the tests of e that stops
    at the first contradiction (three-valued evaluation, prefix facts checked as tests are set)."""
    return _search(e, list(dict.fromkeys(atoms_of(e))), {}, [], 0)


def _search(e, atoms: list[Atom], env: dict[Atom, bool], prefixes: list[Atom], i: int) -> bool:
    v = _eval3(e, env)
    if v is False:
        return False
    if i == len(atoms):
        return v is True
    a = atoms[i]
    is_prefix = _is_prefix(a)
    for val in (False, True):
        if is_prefix and not all(_prefix_ok(a, val, b, env[b]) for b in prefixes):
            continue
        env[a] = val
        if is_prefix:
            prefixes.append(a)
        ok = _search(e, atoms, env, prefixes, i + 1)
        if is_prefix:
            prefixes.pop()
        del env[a]
        if ok:
            return True
    return False


MAX_ATOMS = 24


@functools.lru_cache(maxsize=65536)
def decide(premise, question) -> bool | None:
    """True if every request satisfying premise satisfies question, False if none does,
    None if it depends (or there are too many tests to tell). An unsatisfiable premise: False."""
    if len(set(atoms_of(premise)) | set(atoms_of(question))) > MAX_ATOMS:
        return None
    if not satisfiable(simplify(And((premise, question)))):
        return False
    if not satisfiable(simplify(And((premise, Not(question))))):
        return True
    return None


def with_cert(e, present: bool = True):
    """The rule with every client-certificate test replaced by a constant."""
    if isinstance(e, Atom) and e.kind == "cert":
        return Const(present)
    if isinstance(e, Not):
        return Not(with_cert(e.x, present))
    if isinstance(e, (And, Or)):
        return type(e)(tuple(with_cert(x, present) for x in e.xs))
    return e


def assume(e, true_atoms: set):
    """The expression with the given atoms replaced by true (to show what is left of a condition)."""
    if isinstance(e, Atom):
        return Const(True) if e in true_atoms else e
    if isinstance(e, Not):
        return Not(assume(e.x, true_atoms))
    if isinstance(e, (And, Or)):
        return type(e)(tuple(assume(x, true_atoms) for x in e.xs))
    return e


def independent_dropped(premise, question):
    """The premise without the top-level conjuncts that share no test with the rest (and are no URL
    prefix tests): they can be chosen freely, so they never change what decide() answers, and
    without them the same few (premise, question) pairs repeat (decide is memoized)."""
    conj = list(premise.xs) if isinstance(premise, And) else [premise]
    if len(conj) == 1 and not atoms_of(premise):
        return premise
    seen: dict[Atom, int] = {}
    for a in atoms_of(question):
        seen[a] = 2
    per = [set(atoms_of(c)) for c in conj]
    for atoms in per:
        for a in atoms:
            seen[a] = seen.get(a, 0) + 1
    keep = [c for c, atoms in zip(conj, per)
            if not atoms or any(seen[a] > 1 or _is_prefix(a) for a in atoms)
            or not (isinstance(c, Atom) or isinstance(c, Not) and isinstance(c.x, Atom) or satisfiable(c))]
    return simplify(And(tuple(keep))) if keep else Const(True)


def implies_activesync(e) -> bool:
    """Does every request matching e start with /Microsoft-Server-ActiveSync (any case)?"""
    probe = Atom("url", "startswith", "/Microsoft-Server-ActiveSync", icase=True)
    return decide(simplify(e), probe) is True
