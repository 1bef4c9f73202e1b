"""Suite-wide set-up. Triton runs kernels on a CPU only in its interpreter, and TRITON_INTERPRET must be set
before triton is first imported (megatron-core 0.19 imports it), so it is decided here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
