"""Where the fast scan's backward spends its time on a GPU, kernel by kernel, at the mmMamba
shape (16 heads, P = N = 128, bf16, dt raw with dt_bias), and the same with other launch
settings. Whole calls: medians of triton.testing.do_bench, ms; kernels: the mean time of each
Triton kernel over 20 backward calls under torch.profiler. Then the Triton backward on fp32
inputs against float64. Raw output of this and earlier versions: docs/h200/bwd_parts*.log
(docs/kernel_log.md says which version wrote which).

    python docs/h200/bwd_parts.py

Per shape: the forward and the whole backward, then each backward kernel (_state_kernel and
_pass_kernel twice: forward states and state gradients; the gradient kernels). Then the backward
at 8 x 2048 and 4 x 8192 with other chunks, tiles, warps and state dtypes (scan_fast.BWD_CONFIG)."""
import collections
import os
import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import scan_fast as sf                                          # noqa: E402

H, P, N = 16, 128, 128


def parts(b, l, Q=128, kernels=True):
    ins = sf._random_inputs(b, l, H, P, N, torch.bfloat16, "cuda")
    x, dt, A, B, C, bias = (ins[k] for k in ("x", "dt", "A", "B", "C", "dt_bias"))
    dy = torch.randn_like(x)

    def bwd():
        return sf._ssd_bwd_triton(dy, None, x, dt, A, B, C, bias, None, Q)
    out = {"fwd": do_bench(lambda: sf._ssd_fwd_triton(x, dt, A, B, C, bias, None, 128)),
           "bwd": do_bench(bwd)}
    if kernels:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                bwd()
            torch.cuda.synchronize()
        per = collections.defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith("_"):
                per[e.name] += e.device_time_total / 1e3 / 20                 # us -> ms per call
        out.update(per)
    return out


for b, l in ((16, 1024), (8, 2048), (4, 8192), (1, 65536)):
    r = parts(b, l)
    print(f"{b}x{l}", "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
keep = dict(sf.BWD_CONFIG)
SWEEP = ([dict(Q=q, num_warps=w, BN=bn, BP=bp) for q, w in ((128, 8), (64, 4))
          for bn, bp in ((128, 128), (64, 128), (128, 64), (64, 64))]
         + [dict(Q=128, num_warps=8, BN=128, BP=128, low_states=False)])
for shape in ((8, 2048), (4, 8192)):
    for cfg in map(dict, SWEEP):
        Q = cfg.pop("Q")
        sf.BWD_CONFIG = dict(keep, **cfg)
        name = f"{shape[0]}x{shape[1]} Q {Q} " + " ".join(f"{k} {v}" for k, v in cfg.items())
        try:
            r = parts(*shape, Q, kernels=True)
        except Exception as e:                                          # out of shared memory
            print(f"{name}: {str(e)[:80]}", flush=True)
            continue
        kern = "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("_"))
        print(f"{name} bwd {r['bwd']:.3f}  {kern}", flush=True)
sf.BWD_CONFIG = keep


def fp32_errors(Q, **cfg):
    """The Triton backward on fp32 inputs (tf32 products; before v7 they went to PyTorch: the
    whole tiles did not fit shared memory) against float64 autograd through ssd_chunked."""
    sf.BWD_CONFIG = dict(keep, **cfg)
    ins = sf._random_inputs(2, 1024 + 77, H, P, N, torch.float32, "cuda")
    dy = torch.randn_like(ins["x"])
    got = sf._ssd_bwd_triton(dy, None, ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"],
                             ins["dt_bias"], None, Q)
    ref = {k: v.double().requires_grad_() for k, v in ins.items()}
    y, _ = sf.ssd_chunked(**ref, chunk_size=Q)
    want = torch.autograd.grad((y * dy.double()).sum(), [ref[k] for k in
                                                          ("x", "dt", "A", "B", "C", "dt_bias")])
    names = ("dx", "ddt", "dA", "dB", "dC", "ddt_bias")
    return {k: (g.double() - w).norm().item() / w.norm().item()
            for k, g, w in zip(names, got[:6], want)}


for Q, cfg in ((64, dict(BN=64, BP=64, num_warps=4)), (64, dict(BN=64, BP=64, num_warps=8)),
               (64, dict(BN=128, BP=128, num_warps=8)), (32, dict(BN=128, BP=128, num_warps=4))):
    try:
        err = fp32_errors(Q, **cfg)
        print(f"fp32 Q {Q} {cfg}:", " ".join(f"{k} {v:.1e}" for k, v in err.items()), flush=True)
    except Exception as e:
        print(f"fp32 Q {Q} {cfg}: {str(e)[:100]}", flush=True)
sf.BWD_CONFIG = keep
