"""The lab: benchmarks and measurement harnesses. The runtime never imports it."""
