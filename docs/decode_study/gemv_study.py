# Study for the fused decode step (docs/bench_log.md, "GEMV study"; docs/method.md §7): a
# Triton GEMV (one token, y = W x, W bf16 (N, K) row-major) against cuBLAS (F.linear at M = 1)
# at the paper preset's decode shapes, L2 flushed (do_bench).
# run on a GPU from the repository root: python docs/decode_study/gemv_study.py
import torch, triton, triton.language as tl, torch.nn.functional as F, json, os, itertools

@triton.jit
def gemv(W, x, y, N, K, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    pid, sid = tl.program_id(0), tl.program_id(1)
    rows = pid * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BK), tl.float32)
    kper = tl.cdiv(K, SPLIT * BK) * BK
    for k0 in range(sid * kper, min((sid + 1) * kper, K), BK):
        cols = k0 + tl.arange(0, BK)
        w = tl.load(W + rows[:, None].to(tl.int64) * K + cols[None, :],
                    mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)
        xv = tl.load(x + cols, mask=cols < K, other=0.0)
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(y + rows, out, mask=rows < N)
    else:
        tl.atomic_add(y + rows, out, mask=rows < N)

def run(W, x, BN, BK, SPLIT, warps, stages):
    N, K = W.shape
    y = (torch.zeros if SPLIT > 1 else torch.empty)(N, device=W.device, dtype=torch.float32)
    gemv[(triton.cdiv(N, BN), SPLIT)](W, x, y, N, K, BN=BN, BK=BK, SPLIT=SPLIT, num_warps=warps,
                                      num_stages=stages)
    return y

shapes = {"in_proj (x,B,C,dt,gate)": (8208, 2048), "o_proj": (2048, 2048),
          "mlp w1 or w3": (8192, 2048), "mlp w1+w3 packed": (16384, 2048), "mlp w2": (2048, 8192),
          "head": (92553, 2048)}
res = {}
for name, (N, K) in shapes.items():
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.double(), W.double())[0]
    t_cublas = triton.testing.do_bench(lambda: F.linear(x, W), warmup=50, rep=300)
    best = None
    for BN, BK, SPLIT, warps, stages in itertools.product([4, 8, 16], [512, 1024], [1, 4], [4, 8],
                                                          [3, 4]):
        if SPLIT > 1 and K < 4096: continue
        try:
            y = run(W, x[0], BN, BK, SPLIT, warps, stages)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            if err > 1e-2: continue
            t = triton.testing.do_bench(lambda: run(W, x[0], BN, BK, SPLIT, warps, stages),
                                        warmup=10, rep=50)
        except Exception as e:
            continue
        if best is None or t < best[0]:
            best = (t, dict(BN=BN, BK=BK, SPLIT=SPLIT, warps=warps, stages=stages), err)
    gb = N * K * 2 / 1e9
    res[name] = dict(N=N, K=K, MB=round(gb * 1e3, 1), cublas_us=round(t_cublas * 1e3, 2),
                     cublas_TBs=round(gb / t_cublas, 2), triton_us=round(best[0] * 1e3, 2),
                     triton_TBs=round(gb / best[0], 2), cfg=best[1], rel_err=best[2])
    print(name, json.dumps(res[name]), flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gemv_study.json"), "w"), indent=1)
