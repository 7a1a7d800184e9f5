"""Triton kernels of fused_gspo (installed as ``fused_gspo.kernels``); each module is named after what it computes."""
