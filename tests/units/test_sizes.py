"""Size limits of the runtime (issue 24): no class over ~300 lines, no function over ~60, so a
module stays readable in one sitting. Over paged_attention/ (the lab aside: its bench drivers
are long scripts today) and backends/. No exceptions: a class or function over its limit is
split (the engine's books went to integrations/scheduler.py, the prefix cache out of
BlockManager, PagedAttention's path resolution, hooks and lab capabilities to their own
modules)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_CLASS, MAX_FUNCTION = 300, 60


def oversized(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, lines, limit) of every class/function of the file over its limit."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lines = child.end_lineno - child.lineno + 1
                limit = MAX_CLASS if isinstance(child, ast.ClassDef) else MAX_FUNCTION
                if lines > limit:
                    out.append((name, lines, limit))
                visit(child, name + ".")
            else:
                visit(child, prefix)
    visit(ast.parse(path.read_text()), "")
    return out


def test_runtime_classes_and_functions_stay_small():
    found = []
    for folder in ("paged_attention", "backends"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("paged_attention/lab/"):
                continue
            found += [f"{rel}:{name}: {lines} lines (limit {limit})"
                      for name, lines, limit in oversized(path)]
    assert not found, "\n".join(found)


def test_the_size_check_measures_nested_definitions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("class A:\n    def f(self):\n" + "        x = 1\n" * 70 + "\n")
    assert oversized(f) == [("A.f", 71, MAX_FUNCTION)]
