"""Device-side, round 3: forward with 16 warps vs 8 at the picked G; pass-kernel timing alone."""
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, ".")
import scan_kernel as sk  # noqa: E402

for b, l in [(8, 2048), (4, 8192), (1, 65536)]:
    ins = sk._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda")
    row = []
    for cfg in (dict(BP=128, num_warps=8, num_stages=2), dict(BP=128, num_warps=16, num_stages=2)):
        sk.FWD_CONFIG = cfg
        with torch.no_grad():
            row.append(f"warps {cfg['num_warps']}: {do_bench(lambda: sk.ssd(**ins, backend='triton'), return_mode='median'):.3f}")
    sk.FWD_CONFIG = dict(BP=128, num_warps=8, num_stages=2)
    x, dt, A, B, bias = (ins[k] for k in ("x", "dt", "A", "B", "dt_bias"))
    t = [do_bench(lambda: sk._chunk_states(x, B, dt, A, bias, None, 128, reverse=False), return_mode="median")
         for _ in range(2)]
    print(f"{b}x{l} fwd " + ", ".join(row) + f" | chunk states (state+pass) {t[0]:.3f} {t[1]:.3f}", flush=True)
