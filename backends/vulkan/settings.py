"""The Vulkan backend's PAGED_ATTENTION_VK_* knobs (README, "Settings" table); read them with
`paged_attention.settings.get().vk_<name>`."""
from __future__ import annotations

from paged_attention.settings import Knob, declare

declare(
    Knob("vk_device", "VK_DEVICE", int, 0, "Vulkan physical device index"),
    Knob("vk_probe_timeout_s", "VK_PROBE_TIMEOUT", float, 60.0,
         "seconds the Vulkan probe subprocess may take", shown="`60`"),
    Knob("vk_spirv_cache", "VK_SPIRV_CACHE", str, None,
         "directory of compiled SPIR-V shared by every process (`off`: each process compiles "
         "in memory; ADR 0008)", shown="`${XDG_CACHE_HOME:-~/.cache}/paged-attention/spirv`"),
    Knob("vk_compute_units", "VK_CUS", int, None,
         "compute units the Vulkan split-K geometry assumes", shown="from `devices.py`"),
    Knob("vk_chunk", "VK_CHUNK", int, None, "Vulkan split-K tokens per split",
         shown="heuristic (tuning table)"),
    Knob("vk_tpt", "VK_TPT", int, None, "Vulkan decode threads per token",
         shown="tuning table, else heuristic"),
    Knob("vk_wg", "VK_WG", int, None, "Vulkan decode workgroup size",
         shown="tuning table, else 512 (64 on subgroups < 32)"),
    Knob("vk_unroll", "VK_U", int, None, "Vulkan decode token-loop unroll",
         shown="tuning table, else heuristic"),
    Knob("vk_query_tile", "VK_QT", int, None,
         "Vulkan prefill queries per workgroup of `prefill.comp`, lowered to fit 48 KiB of shared "
         "memory (1: the per-query decode kernel)", shown="`max(2, 32 // G)`"),
    Knob("vk_prefill", "VK_PREFILL", str, "auto",
         "Vulkan prefill kernel: `coop` (`prefill_coop.comp`, tensor cores through "
         "VK_NV_cooperative_matrix; an error where the device or the step cannot run it), `flash` "
         "(`prefill.comp`), `auto`: `coop` where it can run (ADR 0008)"),
    Knob("vk_split_occupancy", "VK_SPLIT_OCC", float, None,
         "Vulkan split-K workgroups per compute unit when B x Hkv fills under a quarter of them",
         shown="tuning table, else `2`"),
    Knob("vk_stock_barriers", "VK_STOCK_BARRIERS", int, 0,
         "`1`: record Kompute's per-tensor barriers even with the patched build (A/B)"),
    Knob("vk_host_io", "VK_HOST_IO", int, 1,
         "`0`: attention sequences copy q, new k/v and the output through device buffers instead "
         "of binding host-memory buffers to the shaders (patched Kompute; A/B, ADR 0008)"),
    Knob("vk_spin_us", "VK_SPIN_US", int, 2000,
         "microseconds a Vulkan submission polls its fence before a blocking wait (patched "
         "Kompute level 4, ADR 0008; `0`: Kompute's own eval)"),
)
