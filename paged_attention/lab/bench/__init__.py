"""Benchmarks (`paged-attn bench NAME`), timed through lab.timing; each is registered in
lab.benches, which says how it is configured and what its records hold."""
