"""The forward's segment pre-pass alone (scan_fast._segments: _state_kernel, then _pass_kernel),
forward (x, B) and reverse (dy, C, as the backward runs it), beside variant files of
scan_fast.py, at the shapes with segments: each replayed from a CUDA graph, five alternating
rounds of do_bench, medians; "TB/s" counts the bytes of x (dy) and B (C) it reads, (nseg - 1) /
nseg of them; each variant's states checked against the current ones. Variants may take the
decays precomputed (`_segments(u, v, dc, ...)`, v23) or raw (`_segments(u, v, dt, dt_bias, A,
...)`). Logs: docs/h200/prepass_18d.log (docs/kernel_log.md, v23); prepass_18b.log and 18c.log
came from a first version that let the dc variants' decays be freed before their graphs
replayed, so their 1 x 65536 rows' errors are that script's, not the kernel's (`keep` here).

    python docs/h200/prepass_ab.py VARIANT.py ...     # on a GPU, from the repository root
"""
import inspect
import os
import sys
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from triton.testing import do_bench
import scan_fast as sf
from fwd_graph_ab import variants                                      # noqa: E402


def main():
    mods = {"current": sf} | variants(sys.argv[1:])
    for b, l in ((4, 8192), (2, 16384), (1, 65536)):
        torch.manual_seed(0)
        ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, "cuda")
        dy = torch.randn_like(ins["x"])
        Q, nchunks = 64, l // 64
        G = sf._pick_segment(b, 16, nchunks, 2, ins["x"].device)
        nseg = -(-nchunks // G)
        bias, A = ins["dt_bias"].float(), ins["A"].float()
        for rev, (u, v) in ((False, (ins["x"], ins["B"])), (True, (dy, ins["C"]))):
            nbytes = (u.numel() + v.numel()) * 2 * (nseg - 1) / nseg
            graphs, outs, keep, times = {}, {}, [], {k: [] for k in mods}
            for k, m in mods.items():
                if "dc" in inspect.signature(m._segments).parameters:
                    dc = m._decays(ins["dt"], bias, A, Q)
                    keep.append(dc)                     # the graph reads it: keep it alive
                    args = (u, v, dc, None, nseg, G, Q, rev)
                else:
                    args = (u, v, ins["dt"], bias, A, None, nseg, G, Q, rev)
                m._segments(*args)
                torch.cuda.synchronize()
                graphs[k] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graphs[k]):
                    outs[k] = m._segments(*args)
            for _ in range(5):
                for k, g in graphs.items():
                    times[k].append(do_bench(g.replay, return_mode="median"))
            ref = outs["current"]
            print(f"{b}x{l} {'reverse' if rev else 'forward'} nseg {nseg}:", "  ".join(
                f"{k} {sorted(t)[2] * 1e3:.1f} us ({nbytes / sorted(t)[2] / 1e9:.2f} TB/s, rel "
                f"{((outs[k] - ref).norm() / ref.norm()).item():.0e})" for k, t in times.items()),
                flush=True)


if __name__ == "__main__":
    main()
