"""What a persistent decoder kernel would pay instead of kernel boundaries: one grid-wide barrier
(every program adds to a counter, then waits until all have) against one boundary between two
kernels launched back to back in a CUDA graph, with and without programmatic dependent launch
(PDL), as fused_decode launches them. Nothing moves but the counter: these are the bare costs
that docs/bench_log.md's "~2 us a kernel boundary" estimate is about.

    python docs/decode_study/grid_barrier.py        # on a GPU (Hopper for PDL)
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _barriers(count_ptr, out_ptr, K, NPROG):
    """K grid barriers in a row: each program adds 1 to the counter (release), then spins until
    it reads (i + 1) * NPROG (acquire). Every program must be resident at once (grid <= what
    fits), or this never ends."""
    seen = tl.program_id(0) * 0
    for i in range(K):
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        while seen < (i + 1) * NPROG:
            seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    tl.store(out_ptr + tl.program_id(0), seen)


@triton.jit
def _step(out_ptr, PDL: tl.constexpr):
    """One empty kernel of a chain: it waits for the one before (under PDL) and writes a word."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tl.store(out_ptr + tl.program_id(0), tl.program_id(0))


def graph(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.zeros(4 * sms, dtype=torch.int32, device="cuda")
    K = 200
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, triton {triton.__version__}; us each, "
          f"medians of do_bench over graphs of {K}")
    for per_sm in (1, 2, 4):
        nprog = per_sm * sms

        def barriers():
            count.zero_()
            _barriers[(nprog,)](count, out, K, nprog, num_warps=4)
        g = graph(barriers)
        assert out[:nprog].min().item() == K * nprog, "the barrier let a program through early"
        ms = do_bench(g.replay, return_mode="median")
        print(f"grid barrier, {nprog} programs ({per_sm} an SM): {ms * 1e3 / K:.2f}")
        for pdl in (False, True):
            opts = dict(launch_pdl=True) if pdl else {}

            def chain():
                for _ in range(K):
                    _step[(nprog,)](out, PDL=pdl, num_warps=4, **opts)
            g = graph(chain)
            ms = do_bench(g.replay, return_mode="median")
            print(f"kernel boundary{' under PDL' if pdl else ''}, {nprog} programs: "
                  f"{ms * 1e3 / K:.2f}")


if __name__ == "__main__":
    main()
