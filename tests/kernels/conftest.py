"""Kernel tests run on CUDA when there is a GPU, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before
kernels.triton_ops is imported, which is why it happens here at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
