"""Kernel benchmarks of single backends (`paged-attn bench NAME`), timed through lab.timing."""
