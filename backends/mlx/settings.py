"""The MLX backend's PAGED_ATTENTION_MLX_* knobs (README, "Settings" table); read them with
`paged_attention.settings.get().mlx_<name>`."""
from __future__ import annotations

from paged_attention.settings import Knob, declare

declare(
    Knob("mlx_compute_units", "MLX_COMPUTE_UNITS", int, None,
         "SMs / GPU cores the MLX split-K heuristic assumes", shown="from `devices.py`"),
    Knob("mlx_variant", "MLX_VARIANT", str, "",
         "MLX fused kernel variant, e.g. `pf1i4` (bench `--variants` syntax)",
         shown="tuning table, else built-in"),
    Knob("mlx_splitk", "MLX_SPLITK", str, "", "`off` or a partition count for the MLX fused kernel",
         shown="heuristic (tuning table)"),
    Knob("mlx_gather_dtype", "MLX_GATHER_DTYPE", str, "auto",
         "dtype of the MLX gather path's copies and SDPA: `auto` (the pool's where MLX runs a "
         "fused SDPA kernel for the call, else float32), `float32` or `pool` (ADR 0002)"),
    Knob("mlx_fused_append", "MLX_FUSED_APPEND", str, "off",
         "`auto`: the MLX fused decode kernel stores a decode step's new K/V itself where each "
         "slot is the sequence's next position, instead of a scatter before it; off until a GPU "
         "run has checked it (ADR 0004, \"Append in the kernel\")"),
)
