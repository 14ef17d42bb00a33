"""The MLX kernels' shared bodies (shaders/mlx/*.body) run on the CPU, for tests.

target_cpu.h is a third target prologue, test-only: it defines the names target_cuda.h does,
so g++ compiles the very bodies the GPU targets compile (the #defines of each form included,
kernel_source.py), each GPU thread a fiber switched at the threadgroup's barriers and warp
shuffles. `run_plan` launches a fused.DecodePlan's kernels the way DecodePlan does (its
template, grid, step array, inputs in signature order, decode then reduce under split-K), so a
kernel's logic is checked against the float64 reference on machines without a GPU. Loads,
NVRTC/Metal compilation and speed remain the GPU runs' to check.
"""
from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from paged_attention.backends.mlx import kernel_source as ks

PROLOGUE = Path(__file__).with_name("target_cpu.h")
CPU_TYPES = {"float16": "_Float16", "bfloat16": "pa_bf16", "float32": "float", "int32": "int32_t",
             "uint32": "uint32_t", "uint8": "uint8_t"}
# numpy storage of each dtype (bfloat16 as its bits)
NP_TYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32,
            "int32": np.int32, "uint32": np.uint32, "uint8": np.uint8}


def dtype_name(d) -> str:
    return d if isinstance(d, str) else str(d).rsplit(".", 1)[-1]


@functools.cache
def unavailable_reason() -> str | None:
    """None when a C++20 compiler with <ucontext.h> and _Float16 builds the emulation, else why not."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return "no C++ compiler (g++/c++) to build the CPU emulation of the kernels"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cpp"
        src.write_text("#include <ucontext.h>\nint main(){ucontext_t c; getcontext(&c);"
                       "_Float16 h = (_Float16)1.5f; return (float)h == 1.5f ? 0 : 1;}\n")
        r = subprocess.run([cxx, "-std=c++20", "-o", str(Path(d) / "t"), str(src)],
                           capture_output=True, text=True)
        if r.returncode or subprocess.run([str(Path(d) / "t")]).returncode:
            return f"{cxx} lacks C++20, <ucontext.h> or _Float16: {r.stderr[-300:]}"
    return None


def _prologue() -> tuple[str, str]:
    m = re.search(r"^//@@ header\n(.*)^//@@ body\n(.*)\Z", PROLOGUE.read_text(), re.S | re.M)
    return m.group(1), m.group(2)


def translation_unit(kernel: str, split: bool, features, kv, inputs: dict, outputs: dict,
                     template: list, grid: tuple, threads: int, out_bytes: dict,
                     inout=()) -> str:
    """A program running one kernel form over `grid` threadgroups: it reads each input from
    DIR/<name>.bin and writes each output to DIR/<name>.out (DIR: its argument), and each input
    named in `inout` (written in place by the kernel) back to DIR/<name>.out."""
    _, body = ks.kernel_source("cuda", kernel, split, features, kv)
    _, cuda_body = ks.prologue("cuda")
    assert cuda_body in body
    head, cpu_body = _prologue()
    body = body.replace(cuda_body, cpu_body, 1)          # the same #defines, the CPU indices
    name = ks.kernel_name(kernel, split, features, kv)
    params = [f"const {CPU_TYPES[t]}* {n}" for n, t in inputs.items()] + \
        [f"{CPU_TYPES[t]}* {n}" for n, t in outputs.items()]
    consts = "".join(f"  using {n} = {CPU_TYPES[v]};\n" if isinstance(v, str)
                     else f"  constexpr bool {n} = {str(v).lower()};\n" if isinstance(v, bool)
                     else f"  constexpr int {n} = {int(v)};\n" for n, v in template)
    args = ", ".join([f"(const {CPU_TYPES[t]}*)in_{n}.data()" for n, t in inputs.items()] +
                     [f"({CPU_TYPES[t]}*)out_{n}.data()" for n, t in outputs.items()])
    return (f"{head}\n{ks._read('common.h')}\n#include <string>\n"
            f"void {name}({', '.join(params)}) {{\n{consts}\n{body}\n}}\n"
            "static std::vector<char> load(const char* dir, const char* n) {\n"
            "  FILE* f = fopen((std::string(dir) + \"/\" + n + \".bin\").c_str(), \"rb\");\n"
            "  if (!f) exit(2);\n"
            "  fseek(f, 0, SEEK_END); long s = ftell(f); fseek(f, 0, SEEK_SET);\n"
            "  std::vector<char> v(s + 16);\n"
            "  if (fread(v.data(), 1, s, f) != (size_t)s) exit(3);\n"
            "  fclose(f); return v;\n}\n"
            "static void save(const char* dir, const char* n, const std::vector<char>& v) {\n"
            "  FILE* f = fopen((std::string(dir) + \"/\" + n + \".out\").c_str(), \"wb\");\n"
            "  fwrite(v.data(), 1, v.size(), f); fclose(f);\n}\n"
            "int main(int argc, char** argv) {\n"
            + "".join(f'  auto in_{n} = load(argv[1], "{n}");\n' for n in inputs)
            + "".join(f"  std::vector<char> out_{n}({out_bytes[n]});\n" for n in outputs)
            + f"  pa_cpu_launch({grid[0]}, {grid[1]}, {grid[2]}, {threads}, [&] {{ {name}({args}); }});\n"
            + "".join(f'  save(argv[1], "{n}", out_{n});\n' for n in outputs)
            + "".join(f'  save(argv[1], "{n}", in_{n});\n' for n in inout)
            + "  return 0;\n}\n")


def run_kernel(workdir: Path, kernel: str, split: bool, features, kv, inputs: dict,
               outputs: dict, template: list, grid: tuple, threads: int, inout=()) -> dict:
    """inputs: name -> (numpy array, dtype name); outputs: name -> (shape, dtype name), both in
    the form's signature order; inout: inputs the kernel writes in place, returned too (their
    contents after the launch). Returns name -> numpy array (bfloat16 as its bits)."""
    out_bytes = {n: int(np.prod(s)) * np.dtype(NP_TYPES[t]).itemsize for n, (s, t) in outputs.items()}
    src = translation_unit(kernel, split, features, kv, {n: t for n, (_, t) in inputs.items()},
                           {n: t for n, (_, t) in outputs.items()}, template, grid, threads,
                           out_bytes, inout)
    exe = workdir / f"k{hashlib.sha1(src.encode()).hexdigest()[:16]}"
    if not exe.exists():     # forms repeat across tests: one build per source
        exe.with_suffix(".cpp").write_text(src)
        r = subprocess.run([shutil.which("g++") or "c++", "-std=c++20", "-O1", "-o",
                            str(exe), str(exe.with_suffix(".cpp"))], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
    data = Path(tempfile.mkdtemp(dir=workdir))
    for n, (a, t) in inputs.items():
        np.ascontiguousarray(a).astype(NP_TYPES[t], copy=False).tofile(data / f"{n}.bin")
    r = subprocess.run([str(exe), str(data)], capture_output=True, text=True)
    assert r.returncode == 0, f"{kernel}: exit {r.returncode}: {r.stderr[-2000:]}"
    got = {n: np.fromfile(data / f"{n}.out", NP_TYPES[t]).reshape(s)
           for n, (s, t) in outputs.items()}
    for n in inout:   # the program's input buffers carry 16 bytes of slack past the data
        a, t = inputs[n]
        got[n] = np.fromfile(data / f"{n}.out", NP_TYPES[t])[:a.size].reshape(a.shape)
    return got


def run_plan(workdir: Path, plan, q: np.ndarray, k, v, sinks=None, features=frozenset()):
    """A fused.DecodePlan's launch, emulated: q float16 or float32 [B, Hq, D] (the output's
    dtype too); k, v the pool arrays or a quantized pool's sources (MLXPool.sources()); sinks
    float32 [Hq] or None; features: the attention variants compiled in (as DecodePlan.with_lse).
    Returns (out float32 [B, Hq, D], lse float32 [B, Hq] or None)."""
    import mlx.core as mx

    from paged_attention.backends.mlx.fused import KERNEL_FEATURES, REDUCE_THREADS

    def host(a):   # an mx.array as (numpy, dtype name); bfloat16 as its bits
        if a.dtype == mx.bfloat16:
            return np.array(a.view(mx.uint16)), "bfloat16"
        return np.array(a), dtype_name(a.dtype)

    cfg, batch, hq, d, kv = plan.cfg, plan.batch, plan.num_q_heads, plan.cfg.head_dim, plan.cfg.kv
    qn = dtype_name(q.dtype)
    template = [(n, t if isinstance(t, (bool, int)) else dtype_name(t))
                for n, t in plan._template(k, getattr(mx, qn))]
    arrays = {"q": (q, qn), "pa_step": (np.array(plan.ints), "int32")}
    if kv is None:
        arrays["k_pool"], arrays["v_pool"] = host(k), host(v)
    else:
        arrays["k_pool"], arrays["v_pool"] = host(k.data), host(v.data)
        if cfg.affine:
            for n, a in zip(ks.AFFINE_INPUTS, (k.scales, k.biases, v.scales, v.biases)):
                arrays[n] = host(a)
    if sinks is not None:
        arrays["pa_sinks"] = (np.asarray(sinks, np.float32), "float32")
    split = plan.num_parts > 1
    lse = {"lse": ((batch, hq), "float32")} if "return_lse" in features else {}
    feats = frozenset(features) & KERNEL_FEATURES[("decode", split)]
    gx, gy, gz = cfg.grid(plan.num_parts, batch)
    grid = (gx // cfg.threads, gy, gz)
    ins = {n: arrays[n] for n in ks.input_names("decode", split, feats, kv)}
    if not split:
        r = run_kernel(workdir, "decode", False, feats, kv, ins, {"out": ((batch, hq, d), qn), **lse},
                       template, grid, cfg.threads)
        return r["out"].astype(np.float32), r.get("lse")
    parts = plan.num_parts
    r = run_kernel(workdir, "decode", True, feats, kv, ins,
                   {"o_part": ((batch, hq, parts, d), "float32"),
                    "ml_part": ((batch, hq, parts, 2), "float32")}, template, grid, cfg.threads)
    feats = frozenset(features) & KERNEL_FEATURES[("reduce", False)]
    arrays.update(o_part=(r["o_part"], "float32"), ml_part=(r["ml_part"], "float32"))
    r = run_kernel(workdir, "reduce", False, feats, None,
                   {n: arrays[n] for n in ks.input_names("reduce", False, feats)},
                   {"out": ((batch, hq, d), qn), **lse}, [("OutT", qn), ("D", d), ("HQ", hq)],
                   (1, hq, batch), REDUCE_THREADS)
    return r["out"].astype(np.float32), r.get("lse")


def run_append(workdir: Path, plan, q: np.ndarray, k, v, k_new, v_new):
    """A DecodePlan's append form (PA_APPEND: the kernel stores the step's new K/V rows, plain
    pools), emulated: k, v, k_new, v_new mx.arrays in the pool dtype. Returns (out float32
    [B, Hq, D], k pool after, v pool after) as numpy (bfloat16 as its bits)."""
    import mlx.core as mx

    from paged_attention.backends.mlx.fused import REDUCE_THREADS

    def host(a):
        if a.dtype == mx.bfloat16:
            return np.array(a.view(mx.uint16)), "bfloat16"
        return np.array(a), dtype_name(a.dtype)

    assert plan.appends
    cfg, batch, hq, d = plan.cfg, plan.batch, plan.num_q_heads, plan.cfg.head_dim
    qn = dtype_name(q.dtype)
    template = [(n, t if isinstance(t, (bool, int)) else dtype_name(t))
                for n, t in plan.cfg.template(k.dtype, getattr(mx, qn))]
    ins = {"q": (q, qn), "k_pool": host(k), "v_pool": host(v),
           "pa_step": (np.array(plan.ints), "int32"), "k_new": host(k_new), "v_new": host(v_new)}
    split = plan.num_parts > 1
    gx, gy, gz = cfg.grid(plan.num_parts, batch)
    grid = (gx // cfg.threads, gy, gz)
    outs = {"out": ((batch, hq, d), qn)} if not split else \
        {"o_part": ((batch, hq, plan.num_parts, d), "float32"),
         "ml_part": ((batch, hq, plan.num_parts, 2), "float32")}
    r = run_kernel(workdir, "decode", split, frozenset({"append"}), None, ins, outs, template,
                   grid, cfg.threads, inout=("k_pool", "v_pool"))
    if split:
        red = run_kernel(workdir, "reduce", False, frozenset(), None,
                         {"o_part": (r["o_part"], "float32"), "ml_part": (r["ml_part"], "float32"),
                          "pa_step": ins["pa_step"]},
                         {"out": ((batch, hq, d), qn)}, [("OutT", qn), ("D", d), ("HQ", hq)],
                         (1, hq, batch), REDUCE_THREADS)
        r["out"] = red["out"]
    return r["out"].astype(np.float32), r["k_pool"], r["v_pool"]
