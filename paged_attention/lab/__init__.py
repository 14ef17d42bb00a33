"""The lab: benchmarks, experiments, soak, workload drivers and the `paged-attn` CLI.

It measures the runtime and may import any of it; nothing in the runtime imports the lab
(import contracts in pyproject.toml, checked by `lint-imports`).
"""
