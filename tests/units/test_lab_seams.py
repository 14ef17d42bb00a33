"""The lab (paged_attention/lab/) measures the runtime through public seams only (ADR 0006):
documented capabilities of `PagedAttention` (interface.py) and the bench hooks a backend package
registers (backends/<name>/bench_hooks.py), never a backend's or a plan's private members. Read
from the lab's source with `ast`, like the name-branch test of test_layout.py."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "paged_attention" / "lab"

# Underscored names that are no runtime seam: namedtuple's public API (underscored so as not
# to clash with field names) and the argparse parser's option list, which argparse exposes no
# other way (lab/benches.py reads each bench's options from it).
NOT_SEAMS = {"_replace", "_asdict", "_fields", "_make", "_field_defaults", "_actions"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ImportFrom reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_uses(source: str, module: str, is_package: bool = False) -> list[str]:
    """Where the code of `module` (a lab module) touches a private member of something that is
    not its own (`self`, `cls` or a lab module), or imports a private name of the runtime."""
    tree = ast.parse(source)
    own = {"self", "cls"}   # names bound to lab modules, or to modules outside the package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(module, node, is_package)
            for alias in node.names:
                if src.startswith("paged_attention.lab"):
                    own.add(alias.asname or alias.name)   # a lab module or a lab name
                elif src.startswith("paged_attention") and (
                        _private(alias.name) or any(_private(p) for p in src.split("."))):
                    found.append(f"{module}:{node.lineno}: imports {alias.name} from {src}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("paged_attention") and any(
                        _private(p) for p in alias.name.split(".")):
                    found.append(f"{module}:{node.lineno}: imports {alias.name}")
                if alias.name.startswith("paged_attention.lab") or \
                        not alias.name.startswith("paged_attention"):
                    own.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in NOT_SEAMS:
            if not (isinstance(node.value, ast.Name) and node.value.id in own):
                found.append(f"{module}:{node.lineno}: .{node.attr} on {ast.unparse(node.value)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("__setattr__", "__delattr__") \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "object":
            # Writing through a frozen dataclass (a Plan) behind its back.
            found.append(f"{module}:{node.lineno}: object.{node.func.attr} on "
                         f"{ast.unparse(node.args[0]) if node.args else '?'}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _private(node.args[1].value) \
                and not (isinstance(node.args[0], ast.Name) and node.args[0].id in own):
            found.append(f"{module}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_the_lab_touches_no_private_member_of_the_runtime():
    found = []
    for path in sorted(LAB.rglob("*.py")):
        found += private_uses(path.read_text(), _module_of(path), path.name == "__init__.py")
    assert not found, "the lab reaches past the public seams:\n" + "\n".join(found)


def test_the_check_sees_each_kind_of_private_access():
    """Each way the lab once reached into a backend or a plan is caught; the lab's own modules
    and objects are not."""
    bad = {
        "be._mgr.sequence()": "._mgr",
        "be._poll_ns = 0": "._poll_ns",
        "plan = be._prepare(plan)": "._prepare",
        "object.__setattr__(plan, 'device', None)": "object.__setattr__",
        "from paged_attention.backends.mlx.fused import _kernel": "imports _kernel",
        "import paged_attention.backends._private": "imports paged_attention.backends._private",
        "getattr(be, '_host_io')": "getattr(..., '_host_io')",
        "backend._auto_path(a, s)": "._auto_path",
    }
    for code, what in bad.items():
        got = private_uses(code, "paged_attention.lab.bench.x")
        assert len(got) == 1 and what in got[0], (code, got)
    ok = ["self._x = 1", "cls._y", "from ..timing import _helper\n_helper.x\ntiming = 1",
          "import argparse\nargparse._StoreTrueAction", "parser()._actions",
          "from .. import timing\ntiming._private()", "row._replace(a=1)", "be.run(plan, q, pool)",
          "from paged_attention.backends.vulkan import bench_hooks", "x.__class__"]
    for code in ok:
        assert private_uses(code, "paged_attention.lab.bench.x") == [], code
    # Relative imports resolve against the importing module: `..timing` is the lab's own.
    assert private_uses("from ..timing import _t", "paged_attention.lab.bench.x") == []
    assert private_uses("from ...settings import _t", "paged_attention.lab.bench.x") != []
