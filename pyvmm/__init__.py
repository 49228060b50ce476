"""pyvmm: a small full-system VMM in Python on Linux KVM."""

__version__ = "0.1.0"
