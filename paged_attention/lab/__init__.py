"""Lab code (CLI commands, benchmarks): never imported by the runtime."""
