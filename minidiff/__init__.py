"""minidiff: a small PyTorch library for the book "How diffusion models learn to sample fast"."""

__version__ = "0.1.0"
