"""Kernel sources, shipped as package data: `mlx/` (one source for Metal and CUDA) and `vulkan/`
(GLSL compute shaders). Read through importlib.resources, so they are found in a checkout and in
an installed wheel alike."""
