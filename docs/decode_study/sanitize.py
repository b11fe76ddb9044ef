"""One fused decode step of the paper preset (bf16, batch 1, 1K keys), eagerly and then replayed
from a CUDA graph, to run under NVIDIA's compute-sanitizer: an out-of-bounds or misaligned
access in any of fused_decode's kernels is reported there (Triton's masks are not checked by
the tests' comparisons when a wrong load is masked to a harmless value). Log:
docs/h200/sanitizer_20.log (v14).

    compute-sanitizer --tool memcheck python docs/decode_study/sanitize.py hybrid   # on a GPU
"""
import sys
sys.path[:0] = [".", "tests"]
import torch
import bench
import fused_decode as fd
from mmmamba import PRESETS
from test_fused_decode import random_caches

kind = sys.argv[1] if len(sys.argv) > 1 else "hybrid"
model = bench.build(PRESETS["paper"], kind, torch.device("cuda"), torch.bfloat16)
cache = random_caches([model], 1025, 1024)[0]
tok = torch.tensor([[11]], device="cuda")
dec = fd.Decoder(model)


def step():
    cache.pos = 1024
    return dec.step(tok, cache)


for _ in range(2):
    step()
graph, _ = bench.capture(step)
for _ in range(5):
    graph.replay()
torch.cuda.synchronize()
print(kind, "ok")
