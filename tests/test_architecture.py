"""The layout rules of docs/architecture.md that import-linter does not check.

import-linter (run by `make test`, contracts in .importlinter) checks the direction between the
sub-packages. These tests check the rest: easgate modules are imported at the top of a module
(never inside a function, where a cycle hides), and no module imports another one's private
(`_name`) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "addons" / "easgate"


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
