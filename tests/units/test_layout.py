"""The layout rules of ADR 0006: settings read once under one prefix, one device table, experiment
names from the registry, no backend-name comparisons outside the registry, import contracts."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from paged_attention import devices, registry, settings
from paged_attention.errors import InvalidInput
from paged_attention.lab.experiments import config
from paged_attention.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _declare_every_backend():
    """Import each registered backend package: each declares its settings on import."""
    import importlib
    for module in registry.BACKENDS.values():
        importlib.import_module(module)


def test_settings_read_under_one_prefix():
    _declare_every_backend()
    s = Settings.load({"PAGED_ATTENTION_PATH": "gather", "PAGED_ATTENTION_VK_CUS": "7",
                       "PAGED_ATTENTION_MLX_SPLITK": "off", "PA_MLX_SPLITK": "4",
                       "PAGED_ATTENTION_VK_PROBE_TIMEOUT": "2.5"})
    assert (s.path, s.vk_compute_units, s.mlx_splitk, s.vk_probe_timeout_s) == ("gather", 7, "off", 2.5)
    assert Settings.load({}) == Settings()
    with pytest.raises(InvalidInput, match="PAGED_ATTENTION_VK_CUS"):
        Settings.load({"PAGED_ATTENTION_VK_CUS": "many"})


def test_settings_override_restores_and_names_unknown_knobs():
    _declare_every_backend()
    before = settings.get()
    with settings.override(vk_chunk=1024) as s:
        assert settings.get() is s and s.vk_chunk == 1024
        assert s.vk_tpt == before.vk_tpt   # the others are kept
    assert settings.get() is before
    with pytest.raises(InvalidInput, match="vk_chunks"):
        with settings.override(vk_chunks=1024):
            pass
    assert settings.get() is before


def test_a_knob_declared_after_loading_reads_the_same_environment():
    """A backend imported after the settings were loaded still sees the environment they were
    loaded from (not a later one), and a bad value names its variable."""
    knob = settings.Knob("test_late_knob", "TEST_LATE_KNOB", int, 3, "test only")
    s = Settings.load({"PAGED_ATTENTION_TEST_LATE_KNOB": "5"})
    bad = Settings.load({"PAGED_ATTENTION_TEST_LATE_KNOB": "five"})
    try:
        settings.declare(knob)
        assert s.test_late_knob == 5 and Settings.load({}).test_late_knob == 3
        with pytest.raises(InvalidInput, match="PAGED_ATTENTION_TEST_LATE_KNOB"):
            bad.test_late_knob
        with pytest.raises(ValueError, match="clashes"):
            settings.declare(settings.Knob("test_late_knob", "TEST_OTHER", int, 3, "test only"))
    finally:
        settings._KNOBS.pop("test_late_knob", None)


def test_readme_settings_table_matches_the_declarations():
    """Every declared knob has its README row as `Knob.readme_row` renders it, and the README
    lists no PAGED_ATTENTION_ variable that nothing declares (tests' own variables aside)."""
    _declare_every_backend()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Settings"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    rows = {line for line in section.splitlines() if line.startswith("| `PAGED_ATTENTION_")
            and "PAGED_ATTENTION_TEST_" not in line}
    want = set(settings.readme_table().splitlines())
    assert rows == want, ("README rows that no declaration renders:\n" + "\n".join(sorted(rows - want))
                          + "\n\nrows the declarations need (paste into the README):\n"
                          + "\n".join(sorted(want - rows)))
    owners = {k.field.split("_")[0] for k in settings.declared()}
    assert {"vk", "mlx"} <= owners   # the backends' declarations were found


def test_the_core_names_no_backend_setting():
    """settings.py declares only the core's knobs; host_arrays imports no backend library."""
    core = (ROOT / "paged_attention" / "settings.py").read_text()
    assert not re.search(r"\b(vk|mlx)_\w+|VK_|MLX_", core)
    host = (ROOT / "paged_attention" / "host_arrays.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(mlx|kp)\b", host, re.M)


# Variables other programs define and set (the XDG base directories; mlx.launch's rendezvous),
# read where they are used: they are not this package's settings.
# Other programs' variables; MLX_PTX_CACHE_DIR: where `bench coldstart` counts MLX's CUDA
# binaries, and sets them and the drivers' caches for its processes.
FOREIGN_ENV = ("XDG_CACHE_HOME", "MLX_HOSTFILE", "NCCL_HOST_IP", "MLX_PTX_CACHE_DIR")


def test_every_env_read_goes_through_settings():
    """No module of the package reads os.environ itself (other programs' variables aside)."""
    offenders = []
    for folder in ("paged_attention", "backends", "shaders"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "settings.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"os\.environ|getenv", line) and not any(v in line for v in FOREIGN_ENV):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_device_table_whole_words_first_match():
    assert devices.lookup("NVIDIA H100 80GB HBM3").compute_units == 132
    assert devices.lookup("NVIDIA H100 PCIe").peak_bytes_per_s == 2.0e12
    assert devices.lookup("NVIDIA GH200 480GB").key == "GH200"
    assert devices.lookup("NVIDIA A100-SXM4-40GB").key == "A100"
    assert devices.lookup("NVIDIA A10").key == "A10"
    assert devices.lookup("Apple M2 Max").compute_units == 32
    assert devices.lookup("llvmpipe (LLVM 15.0.6, 256 bits)") is devices.UNKNOWN
    assert devices.peak_bandwidth("HBM2e thing") is None     # "M2" is not a whole word here


def test_measured_ceilings_belong_to_table_rows():
    """A measured ceiling is keyed by a row of the device table, never above its peak, and is
    only reported for devices that were measured (no guess for the rest)."""
    keys = {row[0]: row[1] for row in devices.DEVICES}
    for key, (bps, source) in devices.CEILINGS.items():
        assert key in keys and source
        assert keys[key] is None or 0 < bps <= keys[key]
    assert devices.ceiling_bandwidth("NVIDIA H100 80GB HBM3") == devices.CEILINGS["H100"][0]
    assert devices.ceiling_bandwidth("NVIDIA H100 PCIe") is None   # another row, not measured
    assert devices.ceiling_bandwidth("llvmpipe (LLVM 15.0.6, 256 bits)") is None


def test_experiment_names_come_from_the_registry(monkeypatch):
    base = {"name": "t", "backends": ["numpy"], "paths": ["reference", "dense"]}
    assert config.parse(base, "t").backends == ["numpy"]
    with pytest.raises(config.ConfigError, match="backends"):
        config.parse({**base, "backends": ["cuda-magic"]}, "t")
    monkeypatch.setitem(registry.BACKENDS, "cuda-magic", "paged_attention.backends.numpy_backend")
    assert config.parse({**base, "backends": ["cuda-magic"]}, "t").backends == ["cuda-magic"]
    for name in ("numpy", "mlx", "vulkan"):
        assert registry.known_paths(name), name
    if registry.unavailable_reason("numpy") is None:
        assert registry.known_paths("numpy") == registry.get_backend("numpy").known_paths


def test_no_backend_name_comparisons_outside_the_registry():
    pattern = re.compile(r'''(==|!=)\s*["'](numpy|mlx|vulkan)["']|\.name\s*(==|!=|in)\s|backend_name\s*(==|!=)''')
    offenders = []
    for path in (ROOT / "paged_attention").rglob("*.py"):
        if path.name == "registry.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


LINT_IMPORTS = ROOT / ".venv" / "bin" / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "scripts" / "lint_imports.sh")], capture_output=True,
                          text=True, timeout=300, cwd=root)


def _contract_names() -> list[str]:
    import tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        return [c["name"] for c in tomllib.load(f)["tool"]["importlinter"]["contracts"]]


@pytest.mark.skipif(not LINT_IMPORTS.exists(),
                    reason="import-linter is not installed in .venv (the dev extra)")
def test_import_contracts_hold_and_catch_a_violation(tmp_path):
    """Every contract of pyproject.toml is checked and kept on this tree; on a copy of the tree
    where a runtime module imports the lab, lint-imports fails, naming the contracts it breaks
    (the check is live, not a count of contracts printed by a tool that saw nothing)."""
    names = _contract_names()
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"{len(names)} kept, 0 broken" in r.stdout, r.stdout[-3000:]

    for item in ("paged_attention", "backends", "shaders", "scripts", "pyproject.toml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(
            src, tmp_path / item, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                     if src.is_dir() else {}))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    devices_py = tmp_path / "paged_attention" / "devices.py"
    devices_py.write_text(devices_py.read_text() + "\nfrom .lab import timing  # planted\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout[-3000:]
    # devices -> lab breaks at least the forbidden contract (runtime -> lab) and the layers
    # (an upward import); every contract is still checked.
    kept, broken = map(int, re.search(r"(\d+) kept, (\d+) broken", r.stdout).groups())
    assert kept + broken == len(names) and broken >= 2, r.stdout[-3000:]
    assert "paged_attention.devices -> paged_attention.lab.timing" in r.stdout, r.stdout[-3000:]
