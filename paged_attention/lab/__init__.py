"""The lab: benchmarks, measurement harnesses and CLI commands. The runtime never imports it."""
