"""The fused decode step of fused_decode.py beside a variant file of it (the paper preset, bf16,
batch 1): teacher at 1K-16K keys, hybrid at 1K and 8K, each step in a CUDA graph, five
alternating rounds of 60 replays, medians; then both on two equal caches, their logits compared.
Log: docs/decode_study/kv_early_16.log (docs/bench_log.md v10: there "main" is
`git show 440a687:fused_decode.py` and "kv early", printed "variant" now, what was kept under
PDL).

    python docs/decode_study/decode_ab.py VARIANT.py        # on a GPU, from the repository root
"""
import importlib.util, sys
sys.path[:0] = [".", "tests"]
import torch
import bench
import fused_decode as fd
from mmmamba import PRESETS
from test_fused_decode import random_caches
spec = importlib.util.spec_from_file_location("fused_decode_variant", sys.argv[1])
pf = importlib.util.module_from_spec(spec); spec.loader.exec_module(pf)
cfg, dev = PRESETS["paper"], torch.device("cuda")
bw = bench.copy_bandwidth(dev)
tok = torch.tensor([[11]], device=dev)

def graph_of(mod, model, context):
    """mod's decode step at `context`, captured in a CUDA graph."""
    dec = mod.Decoder(model)
    cache = random_caches([model], context + 1, context)[0]
    def step():
        cache.pos = context
        return dec.step(tok, cache)
    return bench.capture(step)[0]

for kind, contexts in (("teacher", (1024, 4096, 8192, 16384)), ("hybrid", (1024, 8192))):
    model = bench.build(cfg, kind, dev, torch.bfloat16)
    for context in contexts:
        floor = (bench.weight_bytes(model) + bench.state_bytes(model, context)) / bw * 1e3
        ga, gb = graph_of(fd, model, context), graph_of(pf, model, context)
        ta, tb = [], []
        for _ in range(5):
            ta.append(bench.median_ms(ga.replay, 60, True))
            tb.append(bench.median_ms(gb.replay, 60, True))
        a, b = sorted(ta)[2], sorted(tb)[2]
        print(f"{kind} {context}: main {a:.4f} ms ({a / floor:.3f}x), variant {b:.4f} ms "
              f"({b / floor:.3f}x), floor {floor:.4f}; rounds {[round(x, 4) for x in ta]} "
              f"{[round(x, 4) for x in tb]}", flush=True)
        del ga, gb
    # the same step on two equal caches: how far the variant's logits are from main's
    ca, cb = random_caches([model, model], 1025, 1024)
    la = fd.Decoder(model).step(tok, ca).float()
    lb = pf.Decoder(model).step(tok, cb).float()
    print(f"{kind} logits, same cache: rel {((la - lb).norm() / la.norm()).item():.2e}",
          flush=True)
    del model
    torch.cuda.empty_cache()
