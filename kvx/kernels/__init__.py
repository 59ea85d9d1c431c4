"""Attention ops. ``reference.py`` holds the pure-torch version of every op (the CPU path and the
ground truth for kernels); Triton kernels go in ``triton/`` with one launcher per op here."""
