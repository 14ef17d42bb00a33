"""Assembles the MLX custom-kernel sources from one shared body per kernel plus a per-target
prologue (shaders/mlx/). Pure text: importable and testable without MLX or a GPU.

    header = target prologue (header part) + common.h        -> `header=` of the MLX kernel
    body   = [#define PA_SPLIT n] + target prologue (body part) + <kernel>.body -> `source=`

The prologues (target_cuda.h, target_metal.h) define the same names (PA_* macros, pa_* helpers,
thread/threadgroup indices); the bodies and common.h use nothing else target-specific, so the
logic validated on CUDA is the logic Metal compiles.
"""
from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

# Package data (paged_attention.shaders), so installed wheels find their kernels too.
SHADER_DIR = Path(str(resources.files("paged_attention.shaders") / "mlx"))
TARGETS = ("cuda", "metal")
KERNELS = {"decode": "paged_decode.body", "reduce": "paged_reduce.body",
           "stream_read": "stream_read.body"}

# Kernel signatures (the MLX wrappers generate the function head from these names).
INPUTS = {
    "decode": ["q", "k_pool", "v_pool", "pa_step"],
    "reduce": ["o_part", "ml_part", "pa_step"],
}
INPUTS["stream_read"] = ["x", "pa_params"]  # the read-bandwidth probe (paged_attention/lab/bench/mlx_ceiling.py)
OUTPUTS = {
    ("decode", False): ["out"],
    ("decode", True): ["o_part", "ml_part"],
    ("reduce", False): ["out"],
}
OUTPUTS[("stream_read", False)] = ["out"]


@functools.cache
def _read(name: str) -> str:
    return (SHADER_DIR / name).read_text()


def prologue(api: str) -> tuple[str, str]:
    """(header part, body part) of target `api`'s prologue."""
    if api not in TARGETS:
        raise ValueError(f"unknown kernel target {api!r}; expected one of {TARGETS}")
    text = _read(f"target_{api}.h")
    m = re.search(r"^//@@ header\n(.*)^//@@ body\n(.*)\Z", text, re.S | re.M)
    if m is None:
        raise ValueError(f"target_{api}.h lacks its '//@@ header' / '//@@ body' sections")
    return m.group(1), m.group(2)


def shared_body(kernel: str) -> str:
    return _read(KERNELS[kernel])


def kernel_source(api: str, kernel: str, split: bool = False) -> tuple[str, str]:
    """(header, body) to hand to mx.fast.{metal,cuda}_kernel for `kernel` on target `api`."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
    if split and kernel != "decode":
        raise ValueError("only the decode kernel has a split (partials) variant")
    head, body_prologue = prologue(api)
    header = f"// ---- target prologue: {api}\n{head}\n// ---- common.h\n{_read('common.h')}"
    defines = f"#define PA_SPLIT {int(split)}\n" if kernel == "decode" else ""
    body = f"{defines}{body_prologue}\n{shared_body(kernel)}"
    return header, body


def kernel_name(kernel: str, split: bool = False) -> str:
    return f"pa_paged_{kernel}{'_split' if split else ''}"


# ---- whole translation units, assembled the way MLX 0.32 does (for offline checks) ----------
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "int32": "int32_t",
              "uint32": "uint32_t"}
METAL_TYPES = {"float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float", "int32": "int32_t",
               "uint32": "uint32_t"}
# MLX's CUDA default header includes mlx/backend/cuda/device/utils.cuh; offline we stand in
# the CUDA headers that file brings.
CUDA_STANDIN_HEADER = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cooperative_groups.h>
"""
METAL_ATTRIBUTES = (("simdgroup_index_in_threadgroup", "uint"), ("thread_index_in_simdgroup", "uint"),
                    ("thread_position_in_threadgroup", "uint3"), ("threadgroup_position_in_grid", "uint3"))


def _tmpl_value(value, types):
    return types[value] if isinstance(value, str) else str(int(value))


def cuda_translation_unit(kernel: str, split: bool, inputs: dict, outputs: dict,
                          template: list) -> str:
    """The CUDA source MLX would compile. inputs/outputs: name -> dtype name ('float16', ...);
    template: [(name, dtype name or int)]."""
    header, body = kernel_source("cuda", kernel, split)
    params = [f"    const {CUDA_TYPES[t]}* {n}" for n, t in inputs.items()]
    params += [f"    {CUDA_TYPES[t]}* {n}" for n, t in outputs.items()]
    consts = "".join(f"  using {n} = {CUDA_TYPES[v]};\n" if isinstance(v, str)
                     else f"  constexpr int {n} = {int(v)};\n" for n, v in template)
    return (f"{CUDA_STANDIN_HEADER}\n{header}\nnamespace mlx::core::cu {{\n"
            f"namespace cg = cooperative_groups;\n"
            f"__global__ void {kernel_name(kernel, split)}(\n" + ",\n".join(params) + ") {\n"
            f"{consts}\n{body}\n}}\n}} // namespace mlx::core::cu\n")


def metal_translation_unit(kernel: str, split: bool, inputs: dict, outputs: dict,
                           template: list) -> str:
    """The Metal source MLX would compile (its utils preamble abbreviated)."""
    header, body = kernel_source("metal", kernel, split)
    params, index = [], 0
    for n, t in inputs.items():
        params.append(f"  const device {METAL_TYPES[t]}* {n} [[buffer({index})]]")
        index += 1
    for n, t in outputs.items():
        params.append(f"  device {METAL_TYPES[t]}* {n} [[buffer({index})]]")
        index += 1
    params += [f"  {ty} {a} [[{a}]]" for a, ty in METAL_ATTRIBUTES if a in body]
    tparams = ", ".join(f"typename {n}" if isinstance(v, str) else f"int {n}" for n, v in template)
    targs = ", ".join(_tmpl_value(v, METAL_TYPES) for _, v in template)
    name = kernel_name(kernel, split)
    return ("#include <metal_stdlib>\nusing namespace metal;\ntypedef half float16_t;\n"
            f"typedef bfloat bfloat16_t;\n{header}\ntemplate <{tparams}>\n[[kernel]] void {name}(\n"
            + ",\n".join(params) + f") {{\n{body}\n}}\n"
            f"template [[host_name(\"{name}_inst\")]] [[kernel]] decltype({name}<{targs}>) {name}<{targs}>;\n")
