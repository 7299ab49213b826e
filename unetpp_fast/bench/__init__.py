"""Measuring tools: the one timing implementation, memory figures, roofline, plots.

timing.py    timing of operator and model cases (used by the CLI and the benchmark suites)
memory.py    machine-independent training-memory figures (unique storages saved for backward)
roofline.py  FLOPs and bytes of each convolution of the model
plots.py     the figures the CLI writes
"""
