"""What the fast scan costs the host (CPU) per call, beside mamba_ssm's: at a tiny shape the GPU
work is negligible, so the loop's time is the Python and launch cost; at 16 x 1024 it shows
whether the host keeps ahead of the GPU. Then the pieces called directly (without autograd),
the forward alone (no grad) and forward + backward at every benchmark shape, eager and replayed
from a CUDA graph (as train_fast.py runs the training step), against the byte floor of
scan_fast.py's benchmark, and where the host time goes (cProfile, 50 calls). Raw output:
docs/h200/host_probe_12*.log, host_probe_14.log, host_probe_16.log (the forward alone from 16).

    python docs/h200/host_probe.py [.peers]          # on a GPU, from the repository root
"""
import cProfile
import os
import pstats
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.getcwd())
import scan_fast as sf                                                  # noqa: E402
from scan_kernel import ssd                                             # noqa: E402

peers = sf.load_peers(sys.argv[1]) if len(sys.argv) > 1 else {}
mamba = peers.get("mamba_ssm")


def calls(b, l):
    ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda", requires_grad=True)
    dy = torch.randn_like(ins["x"])
    out = {}

    def ours():
        y, _ = ssd(**ins, chunk_size=128, backend="triton")
        y.backward(dy)
    out["ours fwd+bwd"] = ours

    def ours_fwd():
        with torch.no_grad():
            ssd(**ins, chunk_size=128, backend="triton")
    out["ours fwd"] = ours_fwd
    if callable(mamba):
        def theirs():
            y, _ = mamba(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], chunk_size=128,
                         dt_bias=ins["dt_bias"], dt_softplus=True, return_final_states=True)
            y.backward(dy)
        out["mamba_ssm fwd+bwd"] = theirs
    return ins, out


for b, l in ((1, 128), (16, 1024)):
    ins, fns = calls(b, l)
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            for t in ins.values():
                t.grad = None
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{b} x {l} {name}: host {(t1 - t0) / 50 * 1e6:.0f} us a call, "
              f"with the GPU {(t2 - t0) / 50 * 1e6:.0f} us", flush=True)


def host_us(fn, n=200):
    """Host time of fn, us a call (the GPU work queued, not waited for)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


# the pieces: the same work called directly, without scan_kernel.ssd and autograd
for b, l in ((1, 128), (16, 1024)):
    ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda")
    x, dt, A, B, C, bias = (ins[k] for k in ("x", "dt", "A", "B", "C", "dt_bias"))
    dy = torch.randn_like(x)
    _, _, S = sf._ssd_fwd_triton(x, dt, A, B, C, bias, None, 128, 64)
    y = torch.empty_like(x)
    buf, seg = torch.zeros(16 * 128 * 128, device="cuda"), torch.zeros(16, device="cuda")
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    pieces = {
        "torch.empty": lambda: torch.empty(16, device="cuda"),
        "_sms": lambda: sf._sms(x.device),
        "_tma_views (4)": lambda: sf._tma_views((x, B, C, y), ((64, 64), (64, 128), (64, 128),
                                                               (64, 64))),
        "_pass_kernel launch": lambda: sf._pass_kernel[(16, 32)](
            buf, seg, buf, 16, 128 * 128, 1, BLOCK=512, REVERSE=False, HAS_INIT=False),
        "_ssd_fwd_triton, grad": lambda: sf._ssd_fwd_triton(x, dt, A, B, C, bias, None, 128, 64),
        "_ssd_fwd_triton, no grad": lambda: sf._ssd_fwd_triton(x, dt, A, B, C, bias, None, 128),
        "_ssd_bwd_triton": lambda: sf._ssd_bwd_triton(dy, None, x, dt, A, B, C, bias, None, 64,
                                                      S),
        "_chunk_states reverse": lambda: sf._chunk_states(dy, C, dt, A, bias, None, 64, True,
                                                          x.dtype),
        "ssd_triton forward, grad": lambda: sf.ssd_triton(**leaves),
    }
    for name, fn in pieces.items():
        print(f"{b} x {l} {name}: host {host_us(fn):.1f} us a call", flush=True)

bw = sf._copy_bandwidth()
# forward + backward replayed from a CUDA graph (as train_fast runs the training step): the
# GPU's time without the host's
for b, l in sf.SHAPES:
    ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda", requires_grad=True)
    dy = torch.randn_like(ins["x"])

    def step():
        y, _ = ssd(**ins, chunk_size=128, backend="triton")
        return torch.autograd.grad(y, list(ins.values()), dy)

    @torch.no_grad()
    def forward():
        return ssd(**ins, chunk_size=128, backend="triton")
    for part, fn, floor_bytes in (("fwd", forward, sf._floor_bytes(b, l)[0]),
                                  ("fwd+bwd", step, sf._floor_bytes(b, l)[1])):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        eager, replay = [], []
        for _ in range(3):                                      # alternating, medians
            eager.append(do_bench(fn, grad_to_none=list(ins.values()), return_mode="median"))
            replay.append(do_bench(graph.replay, return_mode="median"))
        floor = floor_bytes / bw * 1e3
        print(f"{b} x {l} {part}: eager {sorted(eager)[1]:.3f} ms ({sorted(eager)[1] / floor:.2f}x"
              f" the floor), replayed from a CUDA graph {sorted(replay)[1]:.3f} ms "
              f"({sorted(replay)[1] / floor:.2f}x)", flush=True)
        del graph
    del ins, dy

ins, fns = calls(1, 128)
prof = cProfile.Profile()
prof.enable()
for _ in range(50):
    for t in ins.values():
        t.grad = None
    fns["ours fwd+bwd"]()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(30)
