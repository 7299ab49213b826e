"""Triton kernels of unetpp-fast (installed as `unetpp_fast.kernels`)."""
