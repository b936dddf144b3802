"""bpfree-bench: a Lightning suite for benchmarking backprop-free credit-assignment rules."""

__version__ = "0.1.0"
