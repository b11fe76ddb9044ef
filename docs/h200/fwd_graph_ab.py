"""The fast scan's forward (no grad) beside variant files of it, each replayed from a CUDA
graph (so the host's launch cost is out, as in training's graphs), at every benchmark shape:
five alternating rounds of do_bench over the replay, medians, against the byte floor of
scan_fast.py's benchmark; each variant's y checked against the current one's. Log:
docs/h200/fwd_graph_ab_17.log (docs/kernel_log.md, v20; run before this file's code was put
into functions, for fwd_ab.py to share the loader).

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


def main():
    mods = {"current": sf} | variants(sys.argv[1:])
    bw = sf._copy_bandwidth()
    for b, l in sf.SHAPES:
        torch.manual_seed(0)
        ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda")
        floor_ms = sf._floor_bytes(b, l)[0] / bw * 1e3
        graphs, outs, times = {}, {}, {k: [] for k in mods}
        for name, m in mods.items():
            with torch.no_grad():
                for _ in range(2):                                  # compile, then warm
                    m.ssd_triton(**ins)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    outs[name] = m.ssd_triton(**ins)[0]
            graphs[name] = g
        for _ in range(5):
            for name, g in graphs.items():
                times[name].append(do_bench(g.replay, return_mode="median"))
        ref = outs["current"].float()
        print(f"{b}x{l} floor {floor_ms:.4f} ms:", "  ".join(
            f"{k} {sorted(t)[2]:.4f} ({sorted(t)[2] / floor_ms:.2f}x, y rel "
            f"{((outs[k].float() - ref).norm() / ref.norm()).item():.1e})"
            for k, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
