"""Backends, one subpackage each; see paged_attention.registry for how they are found."""
