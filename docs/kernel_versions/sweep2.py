"""Device-side sweep, round 2: G and stages for the S^T scan (v2) against v1; pass-kernel blocks."""
import importlib.util
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, ".")
import scan_kernel as sk  # noqa: E402

spec = importlib.util.spec_from_file_location("v1", "docs/kernel_versions/scan_kernel_v1.py")
v1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(v1)
h, p, n, Q = 16, 128, 128, 128


def med(fn):
    return do_bench(fn, warmup=25, rep=80, return_mode="median")


for b, l in [(8, 2048), (4, 8192), (1, 65536)]:
    ins = sk._random_inputs(b, l, h, p, n, torch.bfloat16, "cuda")
    x, dt, A, B, C, bias = (ins[k] for k in ("x", "dt", "A", "B", "C", "dt_bias"))
    nch = l // Q
    for mod, name in ((v1, "v1"), (sk, "v2")):
        mod.FWD_CONFIG = dict(BP=128, num_warps=8, num_stages=2)
        for ns in (1, 2):
            mod.FWD_CONFIG["num_stages"] = ns
            row = []
            for G in (8, 16, 32, 64):
                if G > nch:
                    continue
                mod.SEGMENT_CHUNKS = G
                with torch.no_grad():
                    row.append(f"G={G}:{med(lambda: mod.ssd(**ins, backend='triton')):.3f}")
            print(f"fwd {name} {b}x{l} stages {ns} " + " ".join(row), flush=True)
    sk.FWD_CONFIG = dict(BP=128, num_warps=8, num_stages=2)
    sk.SEGMENT_CHUNKS = None
    for blk in (256, 512, 2048):
        sk.PASS_BLOCK = blk
        t_states = med(lambda: sk._chunk_states(x, B, dt, A, bias, None, Q, reverse=False))
        print(f"bwd {b}x{l} PASS_BLOCK {blk} chunk states (BP=128) {t_states:.3f}", flush=True)
    sk.PASS_BLOCK = 512
    del ins
    torch.cuda.empty_cache()
