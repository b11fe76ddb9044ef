import os
import sys

import torch

# the scripts are flat files at the repository root: make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU (CI) the Triton kernels run in Triton's CPU interpreter. Triton reads the
# variable when it is imported and when @triton.jit decorates a function, so it is set here,
# before any test module imports triton, scan_kernel or fused_decode. With CUDA it is left
# alone: the interpreter tests skip and the GPU tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
