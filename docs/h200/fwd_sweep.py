"""The fast forward's launch settings (scan_fast.FWD_CONFIG) swept on a GPU, each setting in a
process of its own (a fault or an out-of-resources error stays there): the forward at 4 x 8192,
1 x 65536 and 8 x 2048 (mmMamba shape, bf16), ms, and its error against the current settings.

    python docs/h200/fwd_sweep.py                   # the sweep (5 minutes on an H200)
    python docs/h200/fwd_sweep.py Q BP WARPS STAGES PROGRAMS_PER_SM     # one setting

Raw output: docs/h200/fwd_sweep2_14.log (v14; docs/kernel_log.md)."""
import itertools
import os
import subprocess
import sys
if len(sys.argv) > 1:
    Q, BP, w, st, pps = map(int, sys.argv[1:])
    sys.path.insert(0, os.getcwd())
    import torch
    import scan_fast as sf
    from triton.testing import do_bench
    keep = dict(sf.FWD_CONFIG)
    out = []
    for b, l in ((4, 8192), (1, 65536), (8, 2048)):
        torch.manual_seed(0)
        ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda")
        args = [ins[k] for k in ("x", "dt", "A", "B", "C")]
        ref = sf.ssd_triton(*args, dt_bias=ins["dt_bias"])[0].float()
        sf.FWD_CONFIG.update(Q=Q, BP=BP, num_warps=w, num_stages=st, programs_per_sm=pps)
        y = sf.ssd_triton(*args, dt_bias=ins["dt_bias"])[0].float()
        err = ((y - ref).norm() / ref.norm()).item()
        ms = do_bench(lambda: sf.ssd_triton(*args, dt_bias=ins["dt_bias"]), warmup=10, rep=50)
        out.append(f"{b}x{l} {ms:.4f} ({err:.0e})")
        sf.FWD_CONFIG.update(keep)
    print("RESULT " + " | ".join(out))
    sys.exit(0)
grid = [(64, 64, 4, 2, 2), (64, 64, 4, 2, 4), (64, 64, 4, 2, 1)] + \
    [c for c in itertools.product((64, 128), (64, 128), (4, 8), (1, 2, 3), (2,))
     if c != (64, 64, 4, 2, 2)]
for cfg in grid:
    r = subprocess.run([sys.executable, __file__, *map(str, cfg)], capture_output=True, text=True)
    last = [x for x in (r.stdout + r.stderr).strip().splitlines() if x.strip()]
    print("Q BP warps stages pps", cfg, last[-1][:200] if last else r.returncode, flush=True)
