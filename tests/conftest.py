import os

import torch

# Triton kernels run on the CPU through the interpreter, which must be chosen before any
# kernel is defined (so before fused_opt's Triton module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
