"""Where the fast scan's backward spends its time on a GPU, kernel by kernel, at the mmMamba
shape (16 heads, P = N = 128, bf16, dt raw with dt_bias), beside an earlier version of
scan_fast.py in the same process, and the state-gradient kernel under other launch settings.
Whole calls: medians of triton.testing.do_bench, ms, old and new alternating; kernels: the mean
time of each Triton kernel over 20 calls under torch.profiler ("other": PyTorch's kernels and
copies; "sum": all, against the whole call's time). Then the accuracy of both
against float64 (bf16, three draws; fp32 once). Raw output of this and earlier versions:
docs/h200/bwd_parts*.log (docs/kernel_log.md says which version wrote which).

    git show <commit>:scan_fast.py > .sweep/scan_fast_v7.py      # optional: versions to beat
    python docs/h200/bwd_parts.py [.sweep/scan_fast_v7.py ...] [--quick]

--quick: no sweep, one accuracy draw. Each version is named by its file name after "scan_fast_"."""
import collections
import importlib.util
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import scan_fast as sf                                          # noqa: E402

H, P, N = 16, 128, 128
MODS = {"new": sf}
for path in (a for a in sys.argv[1:] if not a.startswith("--")):       # versions to compare
    name = os.path.basename(path).removesuffix(".py").removeprefix("scan_fast_")
    spec = importlib.util.spec_from_file_location("scan_fast_" + name, path)
    MODS[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(MODS[name])


def inputs(b, l, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    ins = sf._random_inputs(b, l, H, P, N, dtype, "cuda", requires_grad=True)
    return ins, torch.randn_like(ins["x"])


def per_kernel(fn, calls=20):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:             # ours by name, then
            key = e.name if e.name.startswith("_") else "other"         # PyTorch's and copies
            per[key] += e.device_time_total / 1e3 / calls               # us -> ms per call
    per["sum"] = sum(per.values())
    return dict(per)


def fwd_bwd(mod, ins, dy):
    def run():
        y, _ = mod.ssd_triton(**ins)
        return torch.autograd.grad(y, list(ins.values()), dy)
    return run


def fwd(mod, ins):
    def run():
        with torch.no_grad():
            return mod.ssd_triton(**ins)
    return run


for b, l in ((16, 1024), (8, 2048), (4, 8192), (2, 16384), (1, 65536)):
    ins, dy = inputs(b, l)
    times = collections.defaultdict(list)
    for _ in range(3):                                                  # alternate old, new
        for name, mod in MODS.items():
            times[name + " fwd"].append(do_bench(fwd(mod, ins)))
            times[name + " fwd+bwd"].append(do_bench(fwd_bwd(mod, ins, dy)))
    print(f"{b}x{l}", "  ".join(f"{k} {sorted(v)[1]:.3f}" for k, v in times.items()), flush=True)
    for name, mod in MODS.items():
        kern = per_kernel(fwd_bwd(mod, ins, dy))
        print(f"  {name} kernels:", "  ".join(f"{k} {v:.3f}" for k, v in kern.items()),
              flush=True)
    del ins, dy
QUICK = "--quick" in sys.argv

# the state gradients alone (_chunk_states, reverse) under other tiles, warps, stages and
# programs per SM (which set the segments)
keep, keep_wide = dict(sf.STATES_CONFIG), sf.STATES_WIDE
SWEEP = [dict(BP=bp, BN=bn, num_warps=w, num_stages=s, programs_per_sm=pps)
         for bp, bn, w, s in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (64, 64, 8, 3),
                              (32, 64, 4, 3), (128, 128, 8, 2)) for pps in (1, 2, 4)]
for b, l in () if QUICK else ((8, 2048), (4, 8192), (1, 65536)):
    ins, dy = inputs(b, l)
    args = (dy, ins["C"], ins["dt"], ins["A"], ins["dt_bias"], None, 128, True, torch.bfloat16)
    line = [f"{b}x{l} state gradients:"]
    for name, mod in MODS.items():
        line.append(f"{name} {do_bench(lambda: mod._chunk_states(*args)):.3f}")
    sf.STATES_WIDE = None                                               # the sweep's tiles alone
    for cfg in SWEEP:
        sf.STATES_CONFIG = cfg
        name = "[" + ",".join(str(v) for v in cfg.values()) + "]"
        try:
            line.append(f"{name} {do_bench(lambda: sf._chunk_states(*args)):.3f}")
        except Exception as e:                                          # out of shared memory
            line.append(f"{name} {str(e)[:40]}")
    sf.STATES_CONFIG, sf.STATES_WIDE = keep, keep_wide
    print("  ".join(line), flush=True)
    del ins, dy


def errors(mod, dtype, seed, l=2048 + 77):
    """Every gradient of mod's scan, an initial state's and the final state's included, against
    float64 autograd through ssd_chunked (scan_fast.validate's measure)."""
    ins, dy = inputs(2, l, dtype, seed)
    ins["initial_state"] = torch.randn(2, H, P, N, device="cuda", requires_grad=True)
    y, f = mod.ssd_triton(**ins)
    ref = {k: v.detach().double().requires_grad_() for k, v in ins.items()}
    yr, fr = sf.ssd_chunked(**ref)
    gf = torch.randn_like(fr)
    got = torch.autograd.grad((y.double() * dy).sum() + (f.double() * gf).sum(),
                              list(ins.values()))
    want = torch.autograd.grad((yr * dy.double()).sum() + (fr * gf).sum(), list(ref.values()))
    return {"d" + k: (g.double() - w).norm().item() / w.norm().item()
            for k, g, w in zip(ins, got, want)}


for seed in range(1 if QUICK else 3):
    for name, mod in MODS.items():
        err = errors(mod, torch.bfloat16, seed)
        print(f"bf16 seed {seed} {name}:", " ".join(f"{k} {v:.1e}" for k, v in err.items()),
              flush=True)
for name, mod in MODS.items():
    err = errors(mod, torch.float32, 0, 1024 + 77)
    print(f"fp32 {name}:", " ".join(f"{k} {v:.1e}" for k, v in err.items()), flush=True)
