"""Test setup: Triton kernels run under the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined; rettn imports its
Triton module lazily, so setting it here, before the tests import rettn, is enough.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
