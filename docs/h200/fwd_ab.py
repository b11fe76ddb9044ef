"""The forward (no grad) of scan_fast.py beside variant files of it, at every benchmark shape,
alternating, medians of three do_bench rounds; each variant's y checked against the current
one's (relative error in brackets). With BWD=1 also forward + backward. Variants that fail to
compile are reported and skipped. Logs: docs/h200/fwd_ab_*.log (docs/kernel_log.md, v15-v19).

    BWD=1 python docs/h200/fwd_ab.py .sweep/scan_fast_v14.py ...   # on a GPU, repository root
"""
import os, sys
sys.path.insert(0, os.getcwd())
import torch
from triton.testing import do_bench
import scan_fast as sf
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fwd_graph_ab import variants                                      # noqa: E402
mods = {"new": sf} | variants(sys.argv[1:])
for b, l in sf.SHAPES:
    torch.manual_seed(0)
    ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda")
    ref = None
    times = {k: [] for k in mods}
    errs = {}
    for name, m in mods.items():
        try:
            with torch.no_grad():
                y = m.ssd_triton(**ins)[0].float()
            ref = y if ref is None else ref
            errs[name] = ((y - ref).norm() / ref.norm()).item()
        except Exception as e:
            errs[name] = str(e)[:80]
    ok = [k for k, v in errs.items() if isinstance(v, float)]
    for _ in range(3):
        for name in ok:
            with torch.no_grad():
                times[name].append(do_bench(lambda: mods[name].ssd_triton(**ins)))
    print(f"{b}x{l} fwd", "  ".join(f"{k} {sorted(times[k])[1]:.4f} ({errs[k]:.0e})" if k in ok
                               else f"{k} FAILED {errs[k]}" for k in mods), flush=True)
    if os.environ.get("BWD"):
        g = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
        dy = torch.randn_like(ins["x"])
        tb = {k: [] for k in ok}
        for _ in range(3):
            for name in tb:
                def run():
                    y, _ = mods[name].ssd_triton(**g)
                    return torch.autograd.grad(y, list(g.values()), dy)
                tb[name].append(do_bench(run))
        print(f"{b}x{l} fwd+bwd", "  ".join(f"{k} {sorted(v)[1]:.4f}" for k, v in tb.items()),
              flush=True)
