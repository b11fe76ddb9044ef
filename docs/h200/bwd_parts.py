"""Where the fast scan's backward spends its time on a GPU, kernel by kernel, at the mmMamba
shape (16 heads, P = N = 128, bf16, dt raw with dt_bias), and the same with other launch
settings. Medians of triton.testing.do_bench, ms. Raw output: docs/h200/bwd_parts.log.

    python docs/h200/bwd_parts.py

Per shape: the forward; _chunk_states forward (the state entering every chunk) and reverse
(the state gradient leaving every chunk), each a state kernel and a pass kernel; the gradient
kernels (_bwd_bc_kernel: dB and dC; _bwd_dx_kernel: dx, ddt, dA); the whole backward. Then the backward at 8 x 2048 with other
chunks, warps and stages."""
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import scan_fast as sf                                          # noqa: E402

H, P, N = 16, 128, 128


def parts(b, l, Q=128):
    ins = sf._random_inputs(b, l, H, P, N, torch.bfloat16, "cuda")
    x, dt, A, B, C, bias = (ins[k] for k in ("x", "dt", "A", "B", "C", "dt_bias"))
    dy, c = torch.randn_like(x), triton.cdiv(l, Q)
    S, _ = sf._chunk_states(x, B, dt, A, bias, None, Q, False)
    dS, _ = sf._chunk_states(dy, C, dt, A, bias, None, Q, True)
    dx, dB, dC = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
    ddt = torch.empty(b, l, H, device="cuda")
    dA = torch.empty(b, H, c, device="cuda")
    z = torch.empty(2, b, l, H, device="cuda")
    shapes = dict(Q=Q, BP=P, BN=N, HAS_BIAS=True, **sf.BWD_CONFIG)

    def bc():
        sf._bwd_bc_kernel[(c, b * H, 2)](x, dt, bias, A, B, C, dy, S, dS, dB, dC, *z, l, H, P, N,
                                         c, **shapes)

    def dx_kernel():
        sf._bwd_dx_kernel[(c, b * H)](x, dt, bias, A, B, C, dy, S, dS, *z, dx, ddt, dA, l, H, P,
                                      N, c, **shapes)
    return {"fwd": do_bench(lambda: sf._ssd_fwd_triton(x, dt, A, B, C, bias, None, 128)),
            "states": do_bench(lambda: sf._chunk_states(x, B, dt, A, bias, None, Q, False)),
            "dstates": do_bench(lambda: sf._chunk_states(dy, C, dt, A, bias, None, Q, True)),
            "dB dC kernel": do_bench(bc), "dx kernel": do_bench(dx_kernel),
            "bwd total": do_bench(lambda: sf._ssd_bwd_triton(dy, None, x, dt, A, B, C, bias,
                                                             None, Q))}


for b, l in ((16, 1024), (8, 2048), (4, 8192), (1, 65536)):
    r = parts(b, l)
    print(f"{b}x{l}", "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
bwd = dict(sf.BWD_CONFIG)
for Q in (64, 128):
    for warps in (4, 8):
        for stages in (1, 2):
            sf.BWD_CONFIG = dict(num_warps=warps, num_stages=stages)
            r = parts(8, 2048, Q)
            print(f"Q {Q} warps {warps} stages {stages} dB dC {r['dB dC kernel']:.3f} "
                  f"dx {r['dx kernel']:.3f} "
                  f"bwd {r['bwd total']:.3f}", flush=True)
sf.BWD_CONFIG = bwd
