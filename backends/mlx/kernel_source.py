"""Assembles the MLX custom-kernel sources from one shared body per kernel plus a per-target
prologue (shaders/mlx/). Pure text: importable and testable without MLX or a GPU.

    header = target prologue (header part) + common.h        -> `header=` of the MLX kernel
    body   = [#defines] + target prologue (body part) + <kernel>.body -> `source=`

The #defines select the kernel's form: PA_SPLIT (decode: partials for split-K), the
attention variants of ADR 0010 (PA_SOFTCAP, PA_ALIBI, PA_SINKS, PA_LSE) and, for the decode
kernel, the quantized KV format it reads (PA_KV, ADR 0011), each of which may add an input or an
output, so every form is its own MLX kernel object with its own name.

The prologues (target_cuda.h, target_metal.h) define the same names (PA_* macros, pa_* helpers,
thread/threadgroup indices); the bodies and common.h use nothing else target-specific, so the
logic validated on CUDA is the logic Metal compiles.
"""
from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from pathlib import Path

# Package data (paged_attention.shaders), so installed wheels find their kernels too.
SHADER_DIR = Path(str(resources.files("paged_attention.shaders") / "mlx"))
TARGETS = ("cuda", "metal")
KERNELS = {"decode": "paged_decode.body", "reduce": "paged_reduce.body",
           "stream_read": "stream_read.body"}

# Kernel signatures of the plain forms (the MLX wrappers generate the function head from these
# names); `inputs`/`outputs` add what the variants need.
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

# Attention variants (validation.Variant.features() names, plus "sinks") -> the #define that
# compiles each in. The soft-cap value and the ALiBi slopes ride in the step's int array
# (pa_step); the sinks are a per-layer input, the LSE an output.
FEATURE_DEFINES = {"soft_cap": "PA_SOFTCAP", "alibi_slopes": "PA_ALIBI", "sinks": "PA_SINKS",
                   "return_lse": "PA_LSE", "append": "PA_APPEND"}
# Not an attention variant: "append" is the decode kernel's store of the step's new K/V rows
# (inputs k_new, v_new after pa_step), fused.DecodePlan.append; plain pools only.
# Which kernel form implements which: with split-K, the decode kernel's partitions see the cap
# and the bias, and the reduce, which sees each query once, adds the sinks and writes the LSE.
KERNEL_FEATURES = {
    ("decode", False): frozenset(FEATURE_DEFINES),
    ("decode", True): frozenset({"soft_cap", "alibi_slopes", "append"}),
    ("reduce", False): frozenset({"sinks", "return_lse"}),
    ("stream_read", False): frozenset(),
}
_SHORT = {"soft_cap": "cap", "alibi_slopes": "alibi", "sinks": "sinks", "return_lse": "lse",
          "append": "append"}

# Quantized KV formats (create_pool's kv_dtype, paged_attention/kv_formats.py) -> PA_KV of the
# decode kernel (0: a plain pool) and the short name in the kernel's name. Only the decode
# kernel reads pools: its split partials are float32 whatever the format, so the reduce is one.
KV_DEFINES = {"int8": 1, "int4": 2, "float8_e4m3": 3}
_KV_SHORT = {"int8": "int8", "int4": "int4", "float8_e4m3": "fp8"}
# The affine formats' per-group scales and biases: inputs after pa_step (fp8's two per-pool
# scales ride in pa_step).
AFFINE_INPUTS = ["k_scales", "k_biases", "v_scales", "v_biases"]


def _kv(kernel: str, kv: str | None) -> str | None:
    if kv is not None and (kernel != "decode" or kv not in KV_DEFINES):
        raise ValueError(f"kv format {kv!r}: only the decode kernel reads quantized pools, in "
                         f"the formats {sorted(KV_DEFINES)}")
    return kv


def _features(kernel: str, split: bool, features) -> tuple[str, ...]:
    """`features` checked against what this kernel form implements, in canonical order."""
    features = frozenset(features)
    allowed = KERNEL_FEATURES.get((kernel, split), frozenset())
    if not features <= allowed:
        raise ValueError(f"kernel {kernel!r}{' (split)' if split else ''} does not implement "
                         f"{sorted(features - allowed)}; it implements {sorted(allowed)}")
    return tuple(f for f in FEATURE_DEFINES if f in features)


def input_names(kernel: str, split: bool = False, features=(), kv: str | None = None) -> list[str]:
    """Input names of a kernel form, in the order they are passed."""
    affine = _kv(kernel, kv) in ("int8", "int4")
    on = _features(kernel, split, features)
    if "append" in on and kv is not None:
        raise ValueError("the append form reads plain pools only")
    return INPUTS[kernel] + (["k_new", "v_new"] if "append" in on else []) + \
        (AFFINE_INPUTS if affine else []) + (["pa_sinks"] if "sinks" in on else [])


def output_names(kernel: str, split: bool = False, features=()) -> list[str]:
    """Output names of a kernel form, in the order MLX returns them."""
    return OUTPUTS[(kernel, split)] + \
        (["lse"] if "return_lse" in _features(kernel, split, features) else [])


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


def kernel_source(api: str, kernel: str, split: bool = False, features=(),
                  kv: str | None = None) -> tuple[str, str]:
    """(header, body) to hand to mx.fast.{metal,cuda}_kernel for `kernel` on target `api`;
    `features`: the attention variants compiled in (KERNEL_FEATURES says which form takes which);
    `kv`: the quantized KV format the decode kernel reads (None: a plain pool)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
    if split and kernel != "decode":
        raise ValueError("only the decode kernel has a split (partials) variant")
    on = _features(kernel, split, features)
    head, body_prologue = prologue(api)
    header = f"// ---- target prologue: {api}\n{head}\n// ---- common.h\n{_read('common.h')}"
    kv = _kv(kernel, kv)
    defines = f"#define PA_SPLIT {int(split)}\n" if kernel == "decode" else ""
    if kernel == "decode":
        defines += f"#define PA_KV {KV_DEFINES.get(kv, 0)}\n"
    if kernel != "stream_read":
        defines += "".join(f"#define {FEATURE_DEFINES[f]} {int(f in on)}\n"
                           for f in FEATURE_DEFINES)
    body = f"{defines}{body_prologue}\n{shared_body(kernel)}"
    return header, body


def kernel_name(kernel: str, split: bool = False, features=(), kv: str | None = None) -> str:
    """The kernel's name; each form (variants, KV format) has its own (MLX caches compiled code
    by name)."""
    suffix = "".join(f"_{_SHORT[f]}" for f in _features(kernel, split, features))
    fmt = "" if _kv(kernel, kv) is None else f"_{_KV_SHORT[kv]}"
    return f"pa_paged_{kernel}{'_split' if split else ''}{fmt}{suffix}"


def binary_name(api: str, kernel: str, split: bool = False, features=(),
                kv: str | None = None) -> str:
    """The name the kernel is compiled under: `kernel_name` plus a digest of its assembled
    source. MLX's CUDA backend caches compiled kernels on disk across processes under their
    name ($MLX_PTX_CACHE_DIR; ADR 0009, "Cold start"), so a kernel whose source changed (a new
    release, an edited body) must get a new name, or a process would load the old binary."""
    header, body = kernel_source(api, kernel, split, features, kv)
    digest = hashlib.sha1((header + "\0" + body).encode()).hexdigest()[:12]
    return f"{kernel_name(kernel, split, features, kv)}_{digest}"


# ---- whole translation units, assembled the way MLX 0.32 does (for offline checks) ----------
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "int32": "int32_t",
              "uint32": "uint32_t", "uint8": "uint8_t"}
METAL_TYPES = {"float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float", "int32": "int32_t",
               "uint32": "uint32_t", "uint8": "uint8_t"}
# MLX's CUDA default header includes mlx/backend/cuda/device/utils.cuh; offline we stand in
# the CUDA headers that file brings.
CUDA_STANDIN_HEADER = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cooperative_groups.h>
#include <cuda/std/limits>
#define inf cuda::std::numeric_limits<float>::infinity()
"""
METAL_ATTRIBUTES = (("simdgroup_index_in_threadgroup", "uint"), ("thread_index_in_simdgroup", "uint"),
                    ("thread_position_in_threadgroup", "uint3"), ("threadgroup_position_in_grid", "uint3"))


def _tmpl_value(value, types):
    # MLX writes a bool template argument with `<<`, so as 1 or 0 (metal/custom_kernel.cpp)
    return types[value] if isinstance(value, str) else str(int(value))


def _check_signature(kernel, split, features, ins, outs, kv=None):
    want_in = input_names(kernel, split, features, kv)
    want_out = output_names(kernel, split, features)
    if list(ins) != want_in or list(outs) != want_out:
        raise ValueError(f"{kernel_name(kernel, split, features, kv)} takes inputs {want_in} and "
                         f"outputs {want_out}; got {list(ins)} and {list(outs)}")


def cuda_translation_unit(kernel: str, split: bool, inputs: dict, outputs: dict,
                          template: list, features=(), kv: str | None = None) -> str:
    """The CUDA source MLX would compile (mx.fast.cuda_kernel: mlx/backend/cuda/custom_kernel.cpp,
    build_kernel). inputs/outputs: name -> dtype name ('float16', ...), in the kernel's order;
    template: [(name, dtype name, bool or int)]."""
    _check_signature(kernel, split, features, inputs, outputs, kv)
    header, body = kernel_source("cuda", kernel, split, features, kv)
    params = [f"    const {CUDA_TYPES[t]}* {n}" for n, t in inputs.items()]
    params += [f"    {CUDA_TYPES[t]}* {n}" for n, t in outputs.items()]
    consts = "".join(f"  using {n} = {CUDA_TYPES[v]};\n" if isinstance(v, str)
                     else f"  constexpr bool {n} = {str(v).lower()};\n" if isinstance(v, bool)
                     else f"  constexpr int {n} = {int(v)};\n" for n, v in template)
    return (f"{CUDA_STANDIN_HEADER}\n{header}\nnamespace mlx::core::cu {{\n"
            f"namespace cg = cooperative_groups;\n"
            f"__global__ void {kernel_name(kernel, split, features, kv)}(\n" + ",\n".join(params)
            + ") {\n"
            f"{consts}\n{body}\n}}\n}} // namespace mlx::core::cu\n")


def metal_translation_unit(kernel: str, split: bool, inputs: dict, outputs: dict,
                           template: list, features=(), small=(), kv: str | None = None) -> str:
    """The Metal source MLX would compile (mx.fast.metal_kernel: mlx/backend/metal/
    custom_kernel.cpp, write_signature; its utils preamble abbreviated). `small`: inputs of
    fewer than 8 elements, which MLX passes in the constant address space."""
    _check_signature(kernel, split, features, inputs, outputs, kv)
    header, body = kernel_source("metal", kernel, split, features, kv)
    params, index = [], 0
    for n, t in inputs.items():
        space = "constant" if n in small else "device"
        params.append(f"  const {space} {METAL_TYPES[t]}* {n} [[buffer({index})]]")
        index += 1
    for n, t in outputs.items():
        params.append(f"  device {METAL_TYPES[t]}* {n} [[buffer({index})]]")
        index += 1
    params += [f"  {ty} {a} [[{a}]]" for a, ty in METAL_ATTRIBUTES if a in body]
    tparams = ", ".join(f"typename {n}" if isinstance(v, str) else f"bool {n}"
                        if isinstance(v, bool) else f"int {n}" for n, v in template)
    targs = ", ".join(_tmpl_value(v, METAL_TYPES) for _, v in template)
    name = kernel_name(kernel, split, features, kv)
    return ("#include <metal_stdlib>\nusing namespace metal;\ntypedef half float16_t;\n"
            f"typedef bfloat bfloat16_t;\n{header}\ntemplate <{tparams}>\n[[kernel]] void {name}(\n"
            + ",\n".join(params) + f") {{\n{body}\n}}\n"
            f"template [[host_name(\"{name}_inst\")]] [[kernel]] decltype({name}<{targs}>) {name}<{targs}>;\n")
