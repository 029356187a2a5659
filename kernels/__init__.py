"""Triton device code, one file per op; installed as `sdclr_fast.kernels`."""
