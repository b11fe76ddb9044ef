"""One fused decode step of the paper preset (bf16, batch 1, 1K keys), eagerly (bench.capture's
warm-up runs) and then replayed from a CUDA graph, to run under NVIDIA's compute-sanitizer: an
out-of-bounds or misaligned access in any of fused_decode's kernels is reported there (the
tests' comparisons miss a wrong load that a mask turns into a harmless value). Log:
docs/h200/sanitizer_20.log (v14).

    compute-sanitizer --tool memcheck python docs/decode_study/sanitize.py hybrid   # on a GPU
"""
import sys
import torch
from decode_ab import bench, fd, graph_of, PRESETS

kind = sys.argv[1] if len(sys.argv) > 1 else "hybrid"
model = bench.build(PRESETS["paper"], kind, torch.device("cuda"), torch.bfloat16)
graph, _, _ = graph_of(fd, model, 1024, torch.tensor([[11]], device="cuda"))
for _ in range(5):
    graph.replay()
torch.cuda.synchronize()
print(kind, "ok")
