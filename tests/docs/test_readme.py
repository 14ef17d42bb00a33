"""The README runs as written: every ```python block (README, ADRs, docs/) runs as a script, every
```sh block of the README runs top to bottom as pasted (less the lines readme_blocks.skip_reason
names, each with its reason), every `paged-attn ...` command in it parses, and the README's and
docs/' relative links point at files that exist."""
from __future__ import annotations

import re

import pytest

from readme_blocks import REPO, blocks, commands, is_paged_attn, launched, logical_lines
from readme_blocks import parse_command
from readme_blocks import plan_sh, run_python, run_sh

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "adr").glob("*.md")), *sorted((REPO / "docs").glob("*.md"))]
PYTHON_BLOCKS = [b for path in DOCS for b in blocks(path, "python")]
SH_BLOCKS = blocks(README, "sh")
PAGED_ATTN = [(b, launched(argv)) for b in SH_BLOCKS for line in logical_lines(b.text)
              for argv in commands(line) if is_paged_attn(launched(argv))]


def test_the_readme_has_examples():
    # The parametrized tests below are only as good as the extraction: an empty list would pass.
    assert PYTHON_BLOCKS and SH_BLOCKS and PAGED_ATTN


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block_runs(block, tmp_path):
    run_python(block, tmp_path, timeout=180)


@pytest.mark.parametrize("block", SH_BLOCKS, ids=lambda b: b.id)
def test_sh_block_runs(block, tmp_path):
    plan, _ = run_sh(block, tmp_path, timeout=300)
    if not plan.ran:
        pytest.skip(f"no line of this block runs here: {plan.skipped_summary()}")


@pytest.mark.parametrize("argv", [a for _, a in PAGED_ATTN],
                         ids=[f"{b.id}:{' '.join(a[1:])}" for b, a in PAGED_ATTN])
def test_paged_attn_command_parses(argv):
    try:
        parse_command(argv)
    except ImportError as e:  # a benchmark module needs its backend's package to import
        pytest.skip(f"{' '.join(argv)}: parsed by the CLI, but the benchmark's parser cannot be "
                    f"imported here: {e}")


def test_the_cheap_commands_run():
    """info, a smoke run and a generate on a random-config model are run by test_sh_block_runs,
    not only parsed (the first things a new user tries)."""
    ran = [argv[1:] for b in SH_BLOCKS for argv in plan_sh(b.text).ran if is_paged_attn(argv)]
    assert ["info"] in ran
    assert any(a[:2] == ["run", "smoke"] and "--quick" in a for a in ran)
    assert any(a[0] == "generate" and "--random-config" in a for a in ran)


@pytest.mark.parametrize("doc", [README, *sorted((REPO / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", doc.read_text())
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in local if not (doc.parent / t).exists()]
    assert local and not missing, f"{doc.name}: links to missing files {missing}"


def test_the_two_rank_launch_line_prints_rank_0s_tokens(tmp_path):
    """mlx.launch exits 0 when a rank fails, so its line passing in test_sh_block_runs proves
    little: the README's ring line, run as written, prints what the README says, once."""
    line = next(ln for b in SH_BLOCKS for ln in logical_lines(b.text)
                if "mlx.launch" in ln and "--backend ring" in ln and " generate " in ln)
    block = next(b for b in SH_BLOCKS if line in logical_lines(b.text))
    _, proc = run_sh(type(block)(block.path, block.line, "sh", line + "\n"), tmp_path, 120)
    assert proc.stdout.count("ninety-six ninety-seven ninety-eight ninety-nine") == 1, proc.stdout
    assert "per rank (2 ranks, tensor parallel)" in proc.stdout, proc.stdout + proc.stderr
