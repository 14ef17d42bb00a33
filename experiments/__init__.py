"""The experiments shipped with the package (YAML files), found by name: `paged-attn run smoke`."""
