import os

import torch

# Triton kernels run on the CPU through the interpreter, which must be chosen before any
# kernel is defined (so before fused_opt's Triton module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Small chunks, so that the matrix's sizes (1, 7, 1023, 4097) cross chunk boundaries.
os.environ.setdefault("FUSED_OPT_CHUNK_SIZE", "1024")
