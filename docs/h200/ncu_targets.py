"""What docs/h200/ncu_profile.sh puts under Nsight Compute: three calls of the fast scan's
forward at one shape, or three fused decode steps of a paper-preset model (bf16, batch 1, 1K
keys). The script's kernel filter and launch counts pick the third call's kernels.

    python docs/h200/ncu_targets.py scan 1x65536          # from the repository root, on a GPU
    python docs/h200/ncu_targets.py decode linear         # or teacher, hybrid
"""
import os
import sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
import torch

what, arg = sys.argv[1], sys.argv[2]
dev = torch.device("cuda")
if what == "scan":
    import scan_fast as sf
    b, l = map(int, arg.split("x"))
    ins = sf._random_inputs(b, l, 16, 128, 128, torch.bfloat16, dev)
    with torch.no_grad():
        for _ in range(3):
            sf.ssd_triton(**ins)
else:
    import bench
    import fused_decode as fd
    from mmmamba import PRESETS
    from test_fused_decode import random_caches
    model = bench.build(PRESETS["paper"], arg, dev, torch.bfloat16)
    cache = random_caches([model], 1100, 1024)[0]
    dec, tok = fd.Decoder(model), torch.tensor([[11]], device=dev)
    for _ in range(3):
        cache.pos = 1024
        dec.step(tok, cache)
torch.cuda.synchronize()
