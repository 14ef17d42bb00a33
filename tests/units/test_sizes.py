"""Size limits of the runtime (issue 24): no class over ~300 lines, no function over ~60, so a
module stays readable in one sitting. Over paged_attention/ (the lab aside: its bench drivers
are long scripts today) and backends/. The few runtime exceptions that predate the limit are
listed with today's size as their ceiling: they may shrink, never grow."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_CLASS, MAX_FUNCTION = 300, 60
KNOWN = {  # "path:qualified name": ceiling in lines (split them when next touched)
    "paged_attention/interface.py:PagedAttention": 475,
}


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
    found, seen = [], set()
    for folder in ("paged_attention", "backends"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("paged_attention/lab/"):
                continue
            for name, lines, limit in oversized(path):
                key = f"{rel}:{name}"
                seen.add(key)
                if lines > KNOWN.get(key, limit):
                    found.append(f"{key}: {lines} lines (limit {KNOWN.get(key, limit)})")
    assert not found, "\n".join(found)
    stale = set(KNOWN) - seen
    assert not stale, f"within the limit now: drop from KNOWN {sorted(stale)}"


def test_the_size_check_measures_nested_definitions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("class A:\n    def f(self):\n" + "        x = 1\n" * 70 + "\n")
    assert oversized(f) == [("A.f", 71, MAX_FUNCTION)]
