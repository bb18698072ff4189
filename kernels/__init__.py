"""Triton kernels of dni_fast, installed as ``dni_fast.kernels``.

``synth_ref`` holds the fp32 pure-PyTorch twins that every fast backend
(triton, cpp, cuda) is validated against.
"""
