"""Device-side: compile every kernel (bf16 and fp32) and print registers, spills, shared memory
and which matrix instructions the PTX holds. python docs/kernel_versions/probe.py"""
import sys

import torch

sys.path.insert(0, ".")
import scan_kernel as sk  # noqa: E402

for dtype in (torch.bfloat16, torch.float32):
    ins = sk._random_inputs(1, 1024, 2, 128, 128, dtype, "cuda", requires_grad=True)
    try:
        y, f = sk.ssd(**ins, backend="triton")
        (y.float().sum() + f.sum()).backward()
        torch.cuda.synchronize()
        print(dtype, "fwd+bwd ran")
    except Exception as e:  # noqa: BLE001
        print(dtype, "FAILED", type(e).__name__, str(e)[:160])
for fn in (sk._state_kernel, sk._pass_kernel, sk._scan_kernel, sk._scan_bwd_kernel):
    for dev, caches in fn.device_caches.items():
        for key, ck in caches[0].items():
            ptx = ck.asm.get("ptx", "")
            print(f"{fn.fn.__name__:18s} regs {getattr(ck, "n_regs", -1):4d} spills {getattr(ck, "n_spills", -1):5d} smem {ck.metadata.shared:7d} "
                  f"warps {ck.metadata.num_warps} wgmma {ptx.count('wgmma.mma_async'):3d} "
                  f"mma.sync {ptx.count('mma.sync'):4d} local {ptx.count('ld.local') + ptx.count('st.local'):4d} "
                  f"key {str(key)[:120]}")
