"""The layout rules of docs/architecture.md that import-linter does not check.

import-linter (run by `make test`, contracts in .importlinter) checks the direction between the
sub-packages. These tests check the rest: easgate modules are imported at the top of a module
(never inside a function, where a cycle hides), no module imports another one's private
(`_name`) names, and no part of the gateway keeps or uses the `Gateway` that owns it (what the
parts share is handed to each one: docs/architecture.md, "How the gateway's parts share state").
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from easgate.gateway.addon import Gateway
from easgate.gateway.chain import make_addons

PACKAGE = Path(__file__).resolve().parents[1] / "addons" / "easgate"
ASSEMBLY = "chain.py"  # the one place the gateway and its parts are put together


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def easgate_imports(tree: ast.AST):
    """(node, names) of every import of an easgate module: relative, or absolute `easgate...`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("easgate")):
            yield node, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("easgate")]
            if names:
                yield node, names


def top_level_nodes(tree: ast.Module) -> set[int]:
    """ids of import nodes at module level (also inside a module-level if/try)."""
    out: set[int] = set()

    def visit(body):
        for n in body:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                out.add(id(n))
            elif isinstance(n, (ast.If, ast.Try)):
                visit(n.body)
                visit(n.orelse)
                for h in getattr(n, "handlers", []):
                    visit(h.body)
                visit(getattr(n, "finalbody", []))

    visit(tree.body)
    return out


def test_easgate_modules_are_imported_at_the_top():
    hidden = []
    for path in modules():
        tree = ast.parse(path.read_text(), str(path))
        top = top_level_nodes(tree)
        for node, names in easgate_imports(tree):
            if id(node) not in top:
                hidden.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {', '.join(names)}")
    assert hidden == [], "imports of easgate modules inside functions (move them to the top):\n" + "\n".join(hidden)


def test_no_private_names_cross_modules():
    crossing = []
    for path in modules():
        tree = ast.parse(path.read_text(), str(path))
        for node, names in easgate_imports(tree):
            if isinstance(node, ast.ImportFrom):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    crossing.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {', '.join(private)}")
    assert crossing == [], "private names imported from another module:\n" + "\n".join(crossing)


def test_the_rules_see_a_violation(tmp_path):
    """The checks above find what they look for (a function-level import, a private name)."""
    tree = ast.parse("from .x import public\n\ndef f():\n    from .y import _private\n")
    top = top_level_nodes(tree)
    found = [(names, id(node) in top) for node, names in easgate_imports(tree)]
    assert sorted(found) == [(["_private"], False), (["public"], True)]


def names_gateway(annotation: ast.expr | None) -> bool:
    """`Gateway`, `addon.Gateway`, `"Gateway"`, `Gateway | None`, ... (not `GatewayConfig`)."""
    return annotation is not None and any(
        (isinstance(n, ast.Name) and n.id == "Gateway") or (isinstance(n, ast.Attribute) and n.attr == "Gateway")
        or (isinstance(n, ast.Constant) and isinstance(n.value, str) and "Gateway" in re.findall(r"\w+", n.value))
        for n in ast.walk(annotation))


def reaches_the_parent(tree: ast.AST) -> list[str]:
    """Where a part of the gateway (any class but `Gateway` itself) keeps or uses its parent: an
    attribute `.gw`, a parameter `gw` or annotated `Gateway`, or an import of `Gateway`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and "Gateway" in [a.name for a in node.names]:
            found.append(f"{node.lineno}: imports Gateway")
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef) or cls.name == "Gateway":
            continue
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and node.attr == "gw":
                found.append(f"{node.lineno}: {cls.name} uses .gw")
            elif isinstance(node, ast.arg) and (node.arg == "gw" or names_gateway(node.annotation)):
                found.append(f"{node.lineno}: {cls.name} takes the Gateway ({node.arg})")
    return found


def test_gateway_parts_do_not_reach_through_the_parent():
    """A sub-addon gets the objects it shares (config holder, ledger, audit trail, TLS state, content
    switch) at construction; none holds the Gateway to reach a sibling through it."""
    found = []
    for path in sorted((PACKAGE / "gateway").glob("*.py")):
        if path.name == ASSEMBLY:
            continue
        found += [f"gateway/{path.name}:{w}" for w in reaches_the_parent(ast.parse(path.read_text(), str(path)))]
    assert found == [], "gateway parts that keep or use the Gateway (hand them what they share):\n" + "\n".join(found)


def test_no_assembled_part_holds_the_gateway():
    """The same rule on the chain as `easgate run` builds it, whatever a part names its attributes."""
    gw, final = make_addons()
    for part in [*gw.addons, final]:
        held = [k for k, v in vars(part).items() if isinstance(v, Gateway)]
        assert held == [], f"{type(part).__name__}.{held[0]} holds the Gateway"


def test_the_parent_rule_sees_a_violation():
    tree = ast.parse("from .addon import Gateway\n"
                     "class Part:\n"
                     "    def __init__(self, owner: Gateway, gw=None, cfg: GatewayConfig = None, o: 'Gateway | None' = None):\n"
                     "        self.owner = owner\n"
                     "    def hook(self, flow):\n"
                     "        return self.gw.switch.counts\n"
                     "class Gateway:\n"
                     "    def __init__(self):\n"
                     "        self.gw = self\n")
    assert reaches_the_parent(tree) == ["1: imports Gateway", "3: Part takes the Gateway (owner)",
                                        "3: Part takes the Gateway (gw)", "3: Part takes the Gateway (o)",
                                        "6: Part uses .gw"]
