"""Run the documentation's code blocks the way a reader pastes them.

A ```python block runs as a script in a fresh directory. A ```sh block runs top to bottom in a
fresh directory through bash, with `.venv/bin` and bare `paged-attn` pointing at this
interpreter's install; a line whose command needs a GPU, minutes or a checkout (SKIPPED_COMMANDS
says which and why) is left out of the run, and every `paged-attn ...` command, run or not, is
parsed by the CLI's own parsers. A block that names a model directory `tiny-model` gets one
(random weights, a tiny tokenizer) written by tests/model_dir.py before it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
TINY_MODEL = "tiny-model"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_OPERATORS = {"&&", "||", ";", "|"}


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int            # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path, lang: str) -> list[Block]:
    """The fenced blocks of one language in a Markdown file, in order."""
    text = path.read_text()
    return [Block(path, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
            for m in _FENCE.finditer(text) if m.group(1) == lang]


# -- sh blocks: logical lines, commands, what is skipped ---------------------------------------

def logical_lines(text: str) -> list[str]:
    """The command lines: backslash continuations joined, blank and comment lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ; and |; comments dropped)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds, cur = [], []
    for tok in lex:
        if tok in _OPERATORS:
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    return [c for c in cmds if c]


def is_paged_attn(argv: list[str]) -> bool:
    return bool(argv) and (argv[0] == "paged-attn" or argv[0].endswith("/paged-attn"))


def _option(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def launched(argv: list[str]) -> list[str]:
    """The command an `mlx.launch [options] -- COMMAND` line runs on every rank (argv itself
    for any other command)."""
    if Path(argv[0]).name == "mlx.launch" and "--" in argv:
        return argv[argv.index("--") + 1:]
    return argv


def skip_reason(argv: list[str]) -> str | None:
    """Why a command is parsed but not run here (None: it runs). Everything else runs, so a new
    README command that needs more than a CPU and seconds fails until it is listed here."""
    if launched(argv) is not argv:
        backend = _option(argv, "--backend")
        if backend != "ring":
            return f"mlx.launch --backend {backend}: several GPUs (NCCL) or an MPI install"
        return skip_reason(launched(argv))
    prog = argv[0]
    if prog == "make":
        return ("make targets set the machine up first (scripts/setup.sh): CI runs `make test`, "
                "and `make demo` is the `paged-attn run smoke` run below")
    if prog == "pip":
        return "builds and installs the wheel: `make wheel-check` proves that in a fresh venv"
    python_m = len(argv) > 2 and Path(prog).name.startswith("python") and argv[1] == "-m"
    module = argv[2] if python_m else ""
    if Path(prog).name.startswith("mlx_lm.") or module.startswith("mlx_lm"):
        return "mlx_lm's own tools download from the Hugging Face hub"
    if not is_paged_attn(argv):
        return None
    sub = argv[1] if len(argv) > 1 else ""
    if sub == "bench":
        return "a benchmark: minutes, most of them on a GPU (Metal, CUDA or a Vulkan GPU)"
    if sub == "tune":
        return "measures every candidate kernel configuration on a GPU: minutes"
    if sub == "calibrate":
        return "the selector calibration sweep takes minutes"
    if sub == "soak":
        return "a soak runs thousands of steps (tests/reliability/test_soak.py runs a short one)"
    if sub == "run" and (len(argv) < 3 or argv[2] != "smoke"):
        return "experiments other than smoke take minutes on a CPU"
    if sub == "generate" and _option(argv, "--model") not in (None, TINY_MODEL):
        return "needs a local mlx-lm model directory"
    return None


@dataclasses.dataclass
class ShPlan:
    script: str                               # what runs: the block minus the skipped lines
    ran: list[list[str]]                      # the commands that run
    skipped: list[tuple[list[str], str]]      # (command, reason): its whole line is left out

    def skipped_summary(self) -> str:
        by_reason: dict[str, list[str]] = {}
        for argv, why in self.skipped:
            by_reason.setdefault(why, []).append(shlex.join(argv))
        return "; ".join(f"{why}: {', '.join(cmds)}" for why, cmds in by_reason.items())


def plan_sh(text: str) -> ShPlan:
    kept, ran, skipped = [], [], []
    for line in logical_lines(text):
        cmds = commands(line)
        why = [(argv, r) for argv, r in zip(cmds, map(skip_reason, cmds)) if r]
        if why:
            skipped += why
        else:
            kept.append(line)
            ran += cmds
    return ShPlan("\n".join(kept) + "\n", ran, skipped)


# -- parsing a paged-attn command with the CLI's own parsers -----------------------------------

class CommandError(AssertionError):
    pass


def _parse(parse, what: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse()
    except SystemExit as e:
        msg = err.getvalue().strip()
        raise CommandError(f"{what}: does not parse (exit {e.code}): {msg}") from None


def parse_command(argv: list[str]) -> argparse.Namespace:
    """Parse `paged-attn ...` (argv[0] is the program) as the CLI would, without running it.
    `bench NAME ARGS` also parses ARGS with that benchmark's own parser (the one its CLI front
    end and its YAML experiments share)."""
    from paged_attention.lab import benches, cli
    line = shlex.join(argv)
    args = _parse(lambda: cli.build_parser().parse_args(argv[1:]), line)
    if args.command == "bench":
        args.bench_namespace = _parse(
            lambda: benches.parser(args.backend).parse_args(list(args.bench_args)), line)
    return args


# -- running blocks -----------------------------------------------------------------------------

def model_dir_writer():
    """tests/model_dir.py's write_model_dir (a tiny random-weight mlx-lm model directory)."""
    spec = importlib.util.spec_from_file_location("_readme_model_dir", TESTS / "model_dir.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_model_dir


def prepare(cwd: Path, text: str) -> None:
    """What a block expects to find in its directory."""
    if TINY_MODEL in text:
        model_dir_writer()(cwd / TINY_MODEL)


def _tail(s: str, n: int = 3000) -> str:
    return s if len(s) <= n else "..." + s[-n:]


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}\n--- stdout\n{_tail(proc.stdout)}"
                             f"\n--- stderr\n{_tail(proc.stderr)}")
    return proc


def run_python(block: Block, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    prepare(cwd, block.text)
    script = cwd / "block.py"
    script.write_text(block.text)
    env = dict(os.environ, MPLBACKEND="Agg")
    return _check(subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, text=True,
                                 capture_output=True, timeout=timeout), f"{block.id} (python)")


def run_sh(block: Block, cwd: Path,
           timeout: float) -> tuple[ShPlan, subprocess.CompletedProcess | None]:
    """Run the block's unskipped lines in order in cwd (None: every line is skipped)."""
    plan = plan_sh(block.text)
    if not plan.ran:
        return plan, None
    prepare(cwd, block.text)
    scripts = Path(sysconfig.get_path("scripts"))
    (cwd / ".venv").symlink_to(scripts.parent, target_is_directory=True)
    env = dict(os.environ, PATH=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
               MPLBACKEND="Agg")
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", plan.script], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=timeout)
    return plan, _check(proc, f"{block.id} (sh)\n{plan.script}")
