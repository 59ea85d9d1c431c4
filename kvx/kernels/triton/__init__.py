"""``@triton.jit`` kernels only; their launchers live one level up, in ``kvx/kernels/``."""
