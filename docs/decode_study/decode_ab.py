"""The fused decode step of fused_decode.py beside a variant file of it (the paper preset, bf16,
batch 1), each step in a CUDA graph, five alternating rounds of 60 replays, medians. First every
column's logits on equal caches against main's (a change of schedule must not move a bit).
SETTINGS (optional, one column each) set module constants on a fresh copy of the variant, such
as PF_WAIT=1,STEP_PF=1; without them the variant is one column as it is. CASES picks the models
and contexts. Logs: docs/decode_study/kv_early_16.log (v10, the older output of this script:
"main" there is `git show 440a687:fused_decode.py`, "kv early" what was kept),
l2_prefetch_17.log (v11), combine_merged_17.log (v12), fuse_step_19.log and matvec_19.log (v13),
hoist_20.log and hoist_long_20.log (v14), noscale_20.log and ss_20.log (v15).

    python docs/decode_study/decode_ab.py VARIANT.py [SETTINGS ...]    # on a GPU, repo root
    CASES="linear:1024 teacher:4096" python docs/decode_study/decode_ab.py VARIANT.py
"""
import importlib.util
import os
import sys
import time
import traceback
sys.path[:0] = [".", "tests"]
import torch
import bench
import fused_decode as fd
from mmmamba import PRESETS
from test_fused_decode import random_caches

CASES = os.environ.get("CASES", "teacher:1024 teacher:4096 teacher:8192 teacher:16384 "
                       "hybrid:1024 hybrid:8192")


def variant(path, name, settings):
    """A fresh module from path with settings ("A=1,B=0") applied to its constants."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for item in filter(None, settings.split(",")):
        key, value = item.split("=")
        old = getattr(mod, key)
        setattr(mod, key, bool(int(value)) if isinstance(old, bool) else type(old)(value))
    return mod


def graph_of(mod, model, context, tok):
    """mod's decode step at `context`, captured in a CUDA graph, with the decoder and cache it
    reads (the graph holds raw pointers: they must outlive it)."""
    dec = mod.Decoder(model)
    cache = random_caches([model], context + 1, context)[0]

    def step():
        cache.pos = context
        return dec.step(tok, cache)
    return bench.capture(step)[0], dec, cache


def main():
    path, settings = sys.argv[1], sys.argv[2:] or [""]
    columns = [("main", fd)] + [(s or "variant", variant(path, f"variant_{i}", s))
                                for i, s in enumerate(settings)]
    cfg, dev = PRESETS["paper"], torch.device("cuda")
    bw = bench.copy_bandwidth(dev)
    tok = torch.tensor([[11]], device=dev)
    cases = [(kind, int(context)) for kind, context in (c.split(":") for c in CASES.split())]
    for kind in dict.fromkeys(k for k, _ in cases):
        model = bench.build(cfg, kind, dev, torch.bfloat16)
        caches = random_caches([model] * len(columns), 1025, 1024)
        ok, ref = [], None
        for (name, mod), cache in zip(columns, caches):
            t0 = time.time()
            try:
                logits = mod.Decoder(model).step(tok, cache).float()
            except Exception:
                print(f"{kind} {name}: FAILED\n{traceback.format_exc()[-3000:]}", flush=True)
                continue
            ref = logits if ref is None else ref
            print(f"{kind} {name}: logits rel {((logits - ref).norm() / ref.norm()).item():.2e} "
                  f"(first step {time.time() - t0:.1f} s)", flush=True)
            ok.append((name, mod))
        for context in (c for k, c in cases if k == kind):
            floor = (bench.weight_bytes(model) + bench.state_bytes(model, context)) / bw * 1e3
            graphs = [graph_of(mod, model, context, tok) for _, mod in ok]
            times = [[] for _ in graphs]
            for _ in range(5):
                for (g, _, _), t in zip(graphs, times):
                    t.append(bench.median_ms(g.replay, 60, True))
            for (name, _), t in zip(ok, times):
                m = sorted(t)[2]
                print(f"{kind} {context} {name:40s} {m:.4f} ms {m / floor:.3f}x  "
                      f"spread {min(t):.4f}-{max(t):.4f}", flush=True)
            del graphs
        del model, caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
