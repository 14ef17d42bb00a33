"""The README harness itself: extraction, what runs and what is only parsed, failures that reach
the test, and the `tiny-model` directory a block gets (with a fake writer standing in for
tests/model_dir.py)."""
from __future__ import annotations

import json

import pytest

import readme_blocks as rb
from readme_blocks import REPO, Block


def block(lang: str, text: str) -> Block:
    return Block(REPO / "README.md", 1, lang, text)


def test_blocks_are_extracted_by_language(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("intro\n```python\nprint(1)\n```\n\n```sh\nls\n```\n```\nplain\n```\n")
    (py,), (sh,) = rb.blocks(md, "python"), rb.blocks(md, "sh")
    assert (py.line, py.text, sh.line, sh.text) == (2, "print(1)\n", 6, "ls\n")


def test_commands_split_at_operators_and_drop_comments():
    lines = rb.logical_lines("# a comment\n\npaged-attn info && paged-attn run smoke  # two\n"
                             "paged-attn generate --prompt \"1 5\" \\\n  --max-tokens 2\n")
    assert [rb.commands(ln) for ln in lines] == [
        [["paged-attn", "info"], ["paged-attn", "run", "smoke"]],
        [["paged-attn", "generate", "--prompt", "1 5", "--max-tokens", "2"]]]


def test_slow_lines_are_left_out_of_the_run_with_their_reason():
    plan = rb.plan_sh("make demo\n.venv/bin/paged-attn info\n"
                      "paged-attn bench e2e --preset h100 && paged-attn info\n"
                      "paged-attn run decode_sweep\npaged-attn run smoke --quick\n")
    assert plan.script == ".venv/bin/paged-attn info\npaged-attn run smoke --quick\n"
    assert [argv[1:] for argv in plan.ran] == [["info"], ["run", "smoke", "--quick"]]
    assert [argv[:2] for argv, _ in plan.skipped] == [
        ["make", "demo"], ["paged-attn", "bench"], ["paged-attn", "run"]]
    assert "benchmark" in plan.skipped_summary()


@pytest.mark.parametrize("argv", [["paged-attn", "info", "--verbose"],
                                  ["paged-attn", "run"],
                                  ["paged-attn", "bench", "e2e", "--presett", "h100"],
                                  ["paged-attn", "bench", "vulkan", "--preset", "h200"],
                                  ["paged-attn", "generate", "--prompt", "1"]])
def test_a_bad_command_does_not_parse(argv):
    with pytest.raises(rb.CommandError, match="does not parse"):
        rb.parse_command(argv)


def test_a_bench_command_is_parsed_by_the_benchmarks_own_parser_without_running():
    args = rb.parse_command(["paged-attn", "bench", "e2e", "--preset", "h100", "--host"])
    assert args.bench_namespace.preset == "h100" and args.bench_namespace.host


def test_a_failing_python_block_fails_with_its_output(tmp_path):
    with pytest.raises(AssertionError, match="(?s)exited 1.*NameError: name 'n_layers'"):
        rb.run_python(block("python", "print(n_layers)\n"), tmp_path, timeout=60)


def test_a_failing_sh_line_fails_the_block(tmp_path):
    # The block's cwd has .venv/bin and paged-attn on PATH; compare of missing runs exits 2.
    with pytest.raises(AssertionError, match="(?s)exited 2.*not a run directory"):
        rb.run_sh(block("sh", ".venv/bin/paged-attn info\npaged-attn compare runs/a runs/b\n"),
                  tmp_path, timeout=120)


@pytest.fixture
def fake_model_dir(monkeypatch):
    """Stands in for tests/model_dir.py's write_model_dir; records where it was asked to write."""
    calls = []

    def write_model_dir(path, **kw):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        calls.append(path)
        return path

    monkeypatch.setattr(rb, "model_dir_writer", lambda: write_model_dir)
    return calls


def test_a_python_block_naming_tiny_model_gets_the_directory(tmp_path, fake_model_dir):
    text = "import json\nprint(json.load(open('tiny-model/config.json'))['model_type'])\n"
    proc = rb.run_python(block("python", text), tmp_path, timeout=60)
    assert proc.stdout == "llama\n" and fake_model_dir == [tmp_path / "tiny-model"]


def test_an_sh_block_naming_tiny_model_gets_the_directory(tmp_path, fake_model_dir):
    _, proc = rb.run_sh(block("sh", "cat tiny-model/config.json\n"), tmp_path, timeout=60)
    assert json.loads(proc.stdout) == {"model_type": "llama"}
    assert fake_model_dir == [tmp_path / "tiny-model"]


def test_other_blocks_get_no_model_directory(tmp_path, fake_model_dir):
    rb.run_python(block("python", "print(1)\n"), tmp_path, timeout=60)
    assert fake_model_dir == [] and not (tmp_path / "tiny-model").exists()


def test_a_launch_line_runs_its_command_on_ring_and_is_skipped_on_gpu_backends():
    ring = ["mlx.launch", "-n", "2", "--backend", "ring", "--", "paged-attn", "generate",
            "--model", "tiny-model", "--prompt", "x"]
    assert rb.launched(ring) == ring[6:] and rb.skip_reason(ring) is None
    nccl = [".venv/bin/mlx.launch", "-n", "2", "--backend", "nccl", "--", "paged-attn", "info"]
    assert "NCCL" in rb.skip_reason(nccl)
    bench = ring[:6] + ["paged-attn", "bench", "generate", "--tp", "2"]
    assert "benchmark" in rb.skip_reason(bench)
    assert rb.launched(["ls"]) == ["ls"]
