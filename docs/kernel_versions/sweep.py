"""Device-side sweep: GPU tests, then forward / backward timings over a small config list.
Run from the repo root on the GPU machine: PYTHONUNBUFFERED=1 python docs/kernel_versions/sweep.py"""
import itertools
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, ".")
import scan_kernel as sk  # noqa: E402

SHAPES = [(8, 2048), (4, 8192), (1, 65536)]
h, p, n, Q = 16, 128, 128, 128
fwd_cfgs = [dict(BP=64, num_warps=8, num_stages=2), dict(BP=64, num_warps=4, num_stages=2),
            dict(BP=32, num_warps=4, num_stages=2), dict(BP=128, num_warps=8, num_stages=2),
            dict(BP=64, num_warps=8, num_stages=3)]
only = sys.argv[1] if len(sys.argv) > 1 else "all"


def med(fn):
    return do_bench(fn, warmup=25, rep=80, return_mode="median")


for b, l in SHAPES:
    ins = sk._random_inputs(b, l, h, p, n, torch.bfloat16, "cuda")
    nchunks = l // Q
    if only in ("all", "fwd"):
        for cfg in fwd_cfgs:
            sk.FWD_CONFIG = cfg
            row = []
            for G in [1, 2, 4, 8, 16, 32, None, nchunks]:
                if G is not None and G > nchunks:
                    continue
                sk.SEGMENT_CHUNKS = G
                t0 = time.time()
                try:
                    with torch.no_grad():
                        t = med(lambda: sk.ssd(**ins, backend="triton"))
                    row.append(f"G={G}:{t:.3f}")
                except Exception as e:  # noqa: BLE001  (out of resources etc: report and go on)
                    row.append(f"G={G}:ERR {type(e).__name__} {str(e)[:80]}")
            sk.SEGMENT_CHUNKS = None
            print(f"fwd {b}x{l} {cfg} " + " ".join(row), flush=True)
    sk.FWD_CONFIG = dict(BP=64, num_warps=8, num_stages=2)
    if only in ("all", "bwd"):
        leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
        dy = torch.randn_like(ins["x"])
        x, dt, A, B, C, bias = (ins[k] for k in ("x", "dt", "A", "B", "C", "dt_bias"))
        t_states = med(lambda: sk._chunk_states(x, B, dt, A, bias, None, Q, reverse=False))
        t_dstates = med(lambda: sk._chunk_states(dy, C, dt, A, bias, None, Q, reverse=True))
        S, _ = sk._chunk_states(x, B, dt, A, bias, None, Q, reverse=False)
        for bw in [dict(num_warps=8, num_stages=1), dict(num_warps=4, num_stages=1), dict(num_warps=16, num_stages=1)]:
            sk.BWD_CONFIG = bw
            try:
                t_bwd = med(lambda: sk._ssd_bwd_triton(dy, None, x, dt, A, B, C, bias, None, Q))

                def fb():
                    y, _ = sk.ssd(**leaves, backend="triton")
                    y.backward(dy)
                t_fb = do_bench(fb, grad_to_none=list(leaves.values()), warmup=25, rep=80, return_mode="median")
                print(f"bwd {b}x{l} {bw} states {t_states:.3f} dstates {t_dstates:.3f} bwd-total {t_bwd:.3f} "
                      f"fwd+bwd {t_fb:.3f}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"bwd {b}x{l} {bw} ERR {type(e).__name__} {str(e)[:200]}", flush=True)
        sk.BWD_CONFIG = dict(num_warps=8, num_stages=1)
    del ins
    torch.cuda.empty_cache()
