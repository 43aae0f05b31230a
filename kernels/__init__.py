"""Fused Triton kernels for fastkd (installed as ``fastkd.kernels``).

Importing this package defines the Triton kernels; under ``TRITON_INTERPRET=1`` (set before
the import) they run on CPU tensors in Triton's interpreter, otherwise on CUDA tensors.
"""
from .kd_softmax_kl import KDSoftmaxKLFunction, LaunchConfig, fused_distill

__all__ = ["fused_distill", "KDSoftmaxKLFunction", "LaunchConfig"]
