"""Experiment runner: schema errors, the artefacts of a tiny run, comparison of runs."""
from __future__ import annotations

import csv
import json
import os

import pytest
import yaml

from paged_attention.lab import cli
from paged_attention.lab.experiments import config
from paged_attention.devices import peak_bandwidth

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = {
    "name": "tiny",
    "backends": ["numpy", "mlx"],
    "paths": "all",
    "grid": {"batch": [1, 2], "context": [40, 80], "num_q_heads": 4, "num_kv_heads": 2,
             "head_dim": 16, "block_size": 8, "layers": 2},
    "measure": {"warmup": 1, "iterations": 2, "pools": 2},
    "check": {"rms_tolerance": 0.01, "sequences": 2},
    "quick": {"grid": {"context": [40]}, "measure": {"iterations": 1}},
}


def write(tmp_path, data, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def run_cli(capsys, argv):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# -- schema errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(colour="blue"), "colour: unknown key"),
    (lambda d: d["grid"].update(batchsize=[1]), "grid.batchsize: unknown key"),
    (lambda d: d["grid"].update(batch=["four"]), "grid.batch[0]: expected a positive int"),
    (lambda d: d["grid"].update(dtype="float8"), "grid.dtype: expected one of"),
    (lambda d: d["measure"].update(iterations=1.5), "measure.iterations: expected a positive int"),
    (lambda d: d.update(backends=["cuda"]), "backends[0]: expected"),
    (lambda d: d.update(calibrate="yes"), "calibrate: expected true or false"),
    (lambda d: d["grid"].update(num_q_heads=3, num_kv_heads=2), "grid: expected at least one point"),
])
def test_schema_error_exit_2_one_line(tmp_path, capsys, mutate, needle):
    data = json.loads(json.dumps(TINY))
    mutate(data)
    path = write(tmp_path, data)
    code, out, err = run_cli(capsys, ["run", path, "--out", str(tmp_path / "run")])
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert path in err and needle in err, err


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["run", str(tmp_path / "nope.yaml")])
    assert code == 2 and err.count("\n") == 1 and "no such experiment file" in err
    path = write(tmp_path, "grid: [1, 2\nname: x\n")
    code, _, err = run_cli(capsys, ["run", path])
    assert code == 2 and err.count("\n") == 1 and "invalid YAML at line" in err, err
    path = write(tmp_path, "- just\n- a list\n")
    code, _, err = run_cli(capsys, ["run", path])
    assert code == 2 and "expected a mapping" in err
    code, _, err = run_cli(capsys, ["run", write(tmp_path, TINY), "--backend", "tpu"])
    assert code == 2 and "--backend" in err


def test_quick_applies_overrides(tmp_path):
    exp = config.load(write(tmp_path, TINY), quick=True)
    assert exp.grid["context"] == [40] and exp.measure["iterations"] == 1 and exp.is_quick
    full = config.load(write(tmp_path, TINY))
    assert len(full.points()) == 2 * len(exp.points())


def test_shipped_experiments_validate():
    names = sorted(f for f in os.listdir(os.path.join(REPO, "experiments")) if f.endswith(".yaml"))
    assert {"smoke.yaml", "decode_sweep.yaml", "block_size.yaml", "fragmentation.yaml",
            "prefix_sharing.yaml", "selector_calibration.yaml"} <= set(names)
    for n in names:
        for quick in (False, True):
            exp = config.load(os.path.join(REPO, "experiments", n), quick=quick)
            assert exp.options if exp.kind == "bench" else exp.points(), n


# -- a tiny run --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("matplotlib")   # the experiments extra (plots)
    tmp = tmp_path_factory.mktemp("exp")
    path = write(tmp, TINY)
    out = tmp / "run"
    code = cli.main(["run", path, "--out", str(out), "--no-progress"])
    return code, out


def test_tiny_run_writes_every_artefact(tiny_run):
    code, out = tiny_run
    assert code == 0
    for f in ("config.yaml", "env.json", "results.jsonl", "results.csv", "summary.md",
              "latency.png", "gbs.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    env = json.loads((out / "env.json").read_text())
    assert {"devices", "python", "versions", "git_commit", "hostname", "platform"} <= set(env)
    assert "numpy" in env["devices"]
    snap = yaml.safe_load((out / "config.yaml").read_text())
    assert snap["name"] == "tiny" and snap["grid"]["context"] == [40, 80]

    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["backend"], r["path"]) for r in ok} >= {("numpy", "reference"), ("numpy", "dense")}
    assert len({(r["batch"], r["context"]) for r in ok}) == 4
    for r in ok:
        assert r["gbs"] > 0 and r["us_median"] > 0 and r["us_p10"] <= r["us_p90"]
        assert r["rms"] is not None and r["rms"] < 1e-2 and r["rms_ok"] is True
        assert r["kv_bytes"] == 2 * r["batch"] * r["context"] * 2 * 16 * 2
    ref = [r for r in ok if r["path"] == "reference"]
    assert all(r["vs_dense"] and r["vs_dense"] > 0 for r in ref)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    summary = (out / "summary.md").read_text()
    assert "| backend | path |" in summary and "latency.png" in summary


def test_compare_prints_ratios(tiny_run, capsys):
    _, out = tiny_run
    code, text, _ = run_cli(capsys, ["compare", str(out), str(out)])
    assert code == 0
    assert "time B/A" in text and "| 1.000 |" in text and "only in A" in text
    code, _, err = run_cli(capsys, ["compare", str(out), str(out / "nothing")])
    assert code == 2 and err.count("\n") == 1


def test_prefix_sharing_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = {"name": "prefix", "kind": "prefix_sharing", "backends": ["numpy"], "paths": "all",
            "grid": {"batch": 4, "context": 64, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16,
                     "block_size": 8, "layers": 1, "shared_prefix": [0.0, 0.5, 0.9]},
            "measure": {"warmup": 0, "iterations": 1}, "plot": {"x": "shared_prefix"}}
    code, text, err = run_cli(capsys, ["run", write(tmp_path, data), "--out", str(tmp_path / "r"),
                                       "--no-progress"])
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    pre = {r["shared_prefix"]: r for r in rows if r["path"] == "prefill"}
    if not pre:
        pytest.skip("prefix caching API not available: " + text)
    assert pre[0.0]["memory_saved"] == 0 and pre[0.0]["prefix_hit_tokens"] == 0
    assert 0 < pre[0.5]["memory_saved"] < pre[0.9]["memory_saved"]
    assert pre[0.9]["tokens_written"] < pre[0.0]["tokens_written"]
    dec = [r for r in rows if r["path"] == "reference" and r["status"] == "ok"]
    assert dec and all(r["rms"] < 1e-2 for r in dec)


def test_peak_bandwidth_table():
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("Apple M2 Max (metal)") == 400e9
    assert peak_bandwidth("Some GPU with HBM2e") is None
    assert peak_bandwidth("llvmpipe (LLVM 15.0.6, 256 bits)") is None


def test_failing_path_is_recorded_and_exit_1(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from paged_attention.backends.numpy_backend import NumpyBackend

    def broken(self, plan, q, pool, k, v):
        raise RuntimeError("device lost")
    monkeypatch.setattr(NumpyBackend, "_run", broken)
    data = {**TINY, "backends": ["numpy"], "grid": {**TINY["grid"], "batch": 1, "context": 40}}
    code, _, err = run_cli(capsys, ["run", write(tmp_path, data), "--out", str(tmp_path / "r"),
                                    "--no-progress"])
    assert code == 1 and "device lost" in err and "Traceback" not in err
    rows = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert {r["path"]: r["status"] for r in rows} == {"reference": "error", "dense": "ok"}
    assert "Errors" in (tmp_path / "r" / "summary.md").read_text()


def test_experiment_paths_are_timed_over_serial_layers():
    """measure.time_paths runs a model's order: layer 0 reads its own q, every later layer the
    previous layer's output (what MLX on CUDA cannot overlap), for the paths and the dense
    baseline alike."""
    import numpy as np

    from paged_attention.lab.experiments import measure

    class Stub:
        def __init__(self):
            self.fed = []

        def decode(self, q, pool, tables, lens, window=None, path=None):
            self.fed.append(q)
            return ("out", len(self.fed))

        def dense_attention(self, q, k, v, scale):
            return self.decode(q, None, None, None)

    be = Stub()
    qs = [("q", i) for i in range(3)]
    s = measure.Setup({"window": None}, np.zeros((1, 1), np.int32), np.ones(1, np.int32),
                      [None], qs, None, 0, 0)
    dense = measure.Dense.__new__(measure.Dense)
    dense.backend, dense.kv, dense.qs, dense.scale = be, [(None, None)], qs, 1.0
    for one in (measure._one_layer(be, s, "fused", None),
                measure._one_layer(be, s, "dense", dense)):
        be.fed.clear()
        outs = [one(i) for i in range(3)]
        assert be.fed == [qs[0], outs[0], outs[1]]
