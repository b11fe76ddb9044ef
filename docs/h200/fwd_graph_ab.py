"""The fast scan's forward (no grad) beside variant files of it, each replayed from a CUDA
graph (so the host's launch cost is out, as in training's graphs), at every benchmark shape:
five alternating rounds of do_bench over the replay, medians, against the byte floor of
scan_fast.py's benchmark; each variant's y checked against the current one's. Log:
docs/h200/fwd_graph_ab_17.log (docs/kernel_log.md, v20; run before this file's code was put
into functions, for fwd_ab.py to share the loader). BWD=1: forward + backward (every input's
gradient for a random dy), against that floor; the gradients checked as y is. (Session 18's
BWD logs, fwd_bwd_graph_ab_18*.log, had the check's fp32 copy of every gradient inside the
graph: 0.5 ms more than the kernels at 16K tokens, 2.0 at 64K, the same in every column;
fwd_bwd_graph_ab_18d.log is this version's.)

    python docs/h200/fwd_graph_ab.py VARIANT.py ...       # on a GPU, from the repository root
"""
import importlib.util
import os
import sys
sys.path.insert(0, os.getcwd())
import torch
from triton.testing import do_bench
import scan_fast as sf


def variants(paths):
    """{name: module} for variant files of scan_fast.py, named by file (scan_fast_ dropped)."""
    mods = {}
    for path in paths:
        name = os.path.basename(path).removesuffix(".py").removeprefix("scan_fast_")
        spec = importlib.util.spec_from_file_location("scan_fast_" + name, path)
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods


def run(m, ins, dy):
    """The forward's y, or with dy the gradients of (y * dy).sum() w.r.t. every input."""
    if dy is None:
        with torch.no_grad():
            return m.ssd_triton(**ins)[0]
    return torch.autograd.grad(m.ssd_triton(**ins)[0], list(ins.values()), dy)


def flat(out):
    """y, or every gradient as one fp32 vector, for the comparison (outside the timed graph)."""
    return torch.cat([g.flatten().float() for g in out]) if isinstance(out, tuple) else out.float()


def main():
    mods = {"current": sf} | variants(sys.argv[1:])
    bwd = os.environ.get("BWD") == "1"
    bw = sf._copy_bandwidth()
    for b, l in sf.SHAPES:
        torch.manual_seed(0)
        ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda", requires_grad=bwd)
        dy = torch.randn_like(ins["x"]) if bwd else None
        floor_ms = sf._floor_bytes(b, l)[bwd] / bw * 1e3
        graphs, outs, times = {}, {}, {k: [] for k in mods}
        for name, m in mods.items():
            side = torch.cuda.Stream()                              # warm up off the capture's
            side.wait_stream(torch.cuda.current_stream())           # stream, as torch advises
            with torch.cuda.stream(side):
                for _ in range(2):                                  # compile, then warm
                    run(m, ins, dy)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs[name] = run(m, ins, dy)
            graphs[name] = g
        for _ in range(5):
            for name, g in graphs.items():
                times[name].append(do_bench(g.replay, return_mode="median"))
        ref = flat(outs["current"])
        print(f"{b}x{l} floor {floor_ms:.4f} ms:", "  ".join(
            f"{k} {sorted(t)[2]:.4f} ({sorted(t)[2] / floor_ms:.2f}x, rel "
            f"{((flat(outs[k]) - ref).norm() / ref.norm()).item():.1e})"
            for k, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
