"""The segment-state kernel (scan_fast._state_kernel: what a segment of G chunks adds to the
state; the forward runs it on x, B, the backward's state gradients on dy, C) under other tiles,
warps, stages, TMA and program orders, alone, at the long shapes where the scan has segments.
Each launch is as scan_fast makes it (segments from _pick_segment, two chunks a step); ms are
do_bench medians; "TB/s" counts x (or dy) and B (or C) read once, so a program pair that
re-reads B shows as less than the copy bandwidth. Every variant's result is checked against
the kept setting's.

    python docs/h200/state_sweep.py          # on a GPU, from the repository root
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import scan_fast as sf                                                  # noqa: E402

os.makedirs(".sweep", exist_ok=True)
src = open("scan_fast.py").read()
old = "g, bh, pt = tl.program_id(0) + REVERSE, tl.program_id(1), tl.program_id(2)"
assert old in src, "scan_fast._state_kernel's program ids moved: update this script"
path = ".sweep/scan_fast_ptfirst.py"                                   # p-tiles adjacent
open(path, "w").write(src.replace(old, "pt, g, bh = tl.program_id(0), tl.program_id(1) + "
                                  "REVERSE, tl.program_id(2)"))
import importlib.util                                                   # noqa: E402
spec = importlib.util.spec_from_file_location("scan_fast_ptfirst", path)
ptfirst = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ptfirst)

H, P, N, Q = 16, 128, 128, 64
VARIANTS = [dict(BP=64, warps=4, stages=2, tma=True, order="seg"),    # kept (FWD_CONFIG)
            dict(BP=64, warps=4, stages=3, tma=True, order="seg"),
            dict(BP=64, warps=4, stages=2, tma=False, order="seg"),
            dict(BP=64, warps=4, stages=2, tma=True, order="ptfirst"),
            dict(BP=64, warps=4, stages=2, tma=False, order="ptfirst"),
            dict(BP=128, warps=8, stages=2, tma=True, order="seg"),
            dict(BP=128, warps=8, stages=2, tma=False, order="seg"),
            dict(BP=128, warps=4, stages=2, tma=True, order="seg"),
            dict(BP=32, warps=4, stages=2, tma=True, order="seg")]


def launch(var, u, v, dt, bias, A, nseg, G, reverse):
    b, l, h, p = u.shape
    n, BP = v.shape[-1], var["BP"]
    out = torch.empty(b, nseg, h, p, n, device=u.device, dtype=torch.float32)
    seg = torch.empty(b, h, nseg, device=u.device, dtype=torch.float32)
    QS = 2 * Q
    views = sf._tma_views((u, v), ((QS, BP), (QS, n))) if var["tma"] else None
    mod, tiles = (ptfirst, (p // BP, nseg - 1, b * h)) if var["order"] == "ptfirst" else \
        (sf, (nseg - 1, b * h, p // BP))
    mod._state_kernel[tiles](
        *(views or (u, v)), dt, bias, A, out, seg, l, h, p, n, nseg, G * Q // QS, Q=QS, BP=BP,
        BN=n, REVERSE=reverse, HAS_BIAS=True, TMA=views is not None, num_warps=var["warps"],
        num_stages=var["stages"])
    return out[:, 1:] if reverse else out[:, :-1]


bw = sf._copy_bandwidth()
print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
for b, l in ((4, 8192), (2, 16384), (1, 65536)):
    ins = sf._random_inputs(b, l, H, P, N, torch.bfloat16, "cuda")
    dy = torch.randn_like(ins["x"])
    nchunks = l // Q
    G = sf._pick_segment(b, H, nchunks, P // 64, ins["x"].device)
    nseg = -(-nchunks // G)
    for reverse, (u, v) in ((False, (ins["x"], ins["B"])), (True, (dy, ins["C"]))):
        args = (u, v, ins["dt"], ins["dt_bias"], ins["A"], nseg, G, reverse)
        want = launch(VARIANTS[0], *args)
        nbytes = (u.numel() + v.numel()) * 2 * (nseg - 1) / nseg
        line = [f"{b}x{l} {'reverse' if reverse else 'forward'} nseg {nseg} G {G}:"]
        for var in VARIANTS:
            name = f"BP{var['BP']}w{var['warps']}s{var['stages']}" \
                   f"{'tma' if var['tma'] else ''}{'-pt' if var['order'] == 'ptfirst' else ''}"
            try:
                err = ((launch(var, *args) - want).norm() / want.norm()).item()
                ms = do_bench(lambda: launch(var, *args), return_mode="median")
                line.append(f"{name} {ms:.4f} ({nbytes / ms / 1e9:.2f} TB/s, err {err:.0e})")
            except Exception as e:                                   # e.g. shared memory
                line.append(f"{name} failed {str(e).splitlines()[0][:50]}")
        print("\n  ".join(line), flush=True)
