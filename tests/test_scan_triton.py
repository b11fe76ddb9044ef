"""The Triton half of scan_kernel.py against float64 references.

CPU (CI): the kernels run in Triton's interpreter, fp32, on small shapes (h=2, p=n=16,
chunk 16), compared with ssd_quadratic / ssd_recurrent / ssd_step_reference in float64,
gradients included. GPU (skipped without CUDA): bf16 and fp32 at the mmMamba shape
(h=16, p=n=128, chunk 128), compiled kernels.

CPU-only machines run the kernels in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET before anything imports triton); with CUDA the interpreter tests are
skipped and the GPU tests run the same checks on the compiled kernels.
"""
import os

import pytest
import torch

import scan_kernel as sk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (INTERPRET and sk.HAS_TRITON),
                                       reason="interpreter tests: CPU-only machines with triton")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and sk.HAS_TRITON),
                                reason="needs a CUDA GPU and triton")
NAMES = ["x", "dt", "A", "B", "C", "dt_bias", "initial_state"]


def draw(b, l, h, p, n, strong=False, init=False, dtype=torch.float32, device="cpu"):
    """Random inputs (never zeros). strong: dt ~ softplus(2) ~ 2, A down to -8: the decay over
    one token is ~e^-17, where a positive exponent anywhere would overflow to inf."""
    g = torch.Generator().manual_seed(1000 * l + 10 * init + strong)
    r = lambda *s: torch.randn(*s, generator=g)
    ins = dict(x=r(b, l, h, p), dt=r(b, l, h) * 0.5 + (2.0 if strong else -1.0),
               A=-torch.rand(h, generator=g) * (8.0 if strong else 1.0) - 0.1,
               B=r(b, l, h, n), C=r(b, l, h, n), dt_bias=r(h) * 0.3,
               initial_state=r(b, h, p, n) if init else None)
    return {k: (v.to(device, dtype if k in ("x", "dt", "B", "C") else torch.float32)
                if v is not None else None) for k, v in ins.items()}


def rel(a, ref):
    """||a - ref|| / ||ref||; the absolute norm where ref is exactly 0 (dA at one token)."""
    d = (a.double() - ref.double()).norm().item()
    r = ref.double().norm().item()
    assert d == d, "NaN in the Triton result"
    return d / r if r > 0 else d


def fwd_bwd(mod, ins, ref_fn, chunk, backend="triton"):
    """Triton outputs and gradients vs float64 ones of ref_fn, for random output weights."""
    leaves = {k: v.clone().requires_grad_() for k, v in ins.items() if v is not None}
    y, f = mod.ssd(**{k: leaves.get(k) for k in NAMES}, chunk_size=chunk, backend=backend)
    refs = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    yr, fr = ref_fn(**{k: refs.get(k) for k in NAMES})
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    g = torch.autograd.grad((y.double() * gy).sum() + (f.double() * gf).sum(), list(leaves.values()))
    gr = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), list(refs.values()))
    err = {"y": rel(y, yr), "final_state": rel(f, fr)}
    err.update({"d" + k: rel(a, b) for k, a, b in zip(leaves, g, gr)})
    return err


# -----------------------------------------------------------------------------
# CPU: the interpreter, fp32 vs float64


@needs_interpreter
@pytest.mark.parametrize("l", [1, 15, 16, 17, 53])
@pytest.mark.parametrize("init", [False, True])
def test_triton_matches_float64(l, init, monkeypatch):
    # segments of 1 and 2 chunks exercise _state_kernel + _pass_kernel in the forward; None
    # picks one segment here (few programs), the scan alone
    monkeypatch.setattr(sk, "SEGMENT_CHUNKS", {1: None, 15: 1, 16: 2, 17: 1, 53: 2}[l])
    err = fwd_bwd(sk, draw(2, l, 2, 16, 16, init=init), sk.ssd_quadratic, chunk=16)
    bad = {k: v for k, v in err.items() if not v < 1e-5}
    assert not bad, f"Triton scan off the float64 reference at l={l}, init={init}: {bad}"


@needs_interpreter
@pytest.mark.parametrize("case", ["forced", "head-dim-24"])
def test_triton_pointer_path_matches_float64(case, monkeypatch):
    # tiles go through TMA descriptors where they can; plain pointers where a tile would straddle
    # two heads (head dim 24 with 32-wide tiles) or the memory is misaligned: test both ways
    monkeypatch.setattr(sk, "SEGMENT_CHUNKS", 2)
    real, used = sk._tma_views, []

    def spy(*a):
        used.append(None if case == "forced" else real(*a))
        return used[-1]

    monkeypatch.setattr(sk, "_tma_views", spy)
    p = 24 if case == "head-dim-24" else 16
    err = fwd_bwd(sk, draw(2, 53, 2, p, 16, init=True), sk.ssd_quadratic, chunk=16)
    assert used and all(v is None for v in used), "the pointer path was not taken"
    bad = {k: v for k, v in err.items() if not v < 1e-5}
    assert not bad, f"Triton scan (pointer path, {case}) off the float64 reference: {bad}"


@needs_interpreter
@pytest.mark.parametrize("segment", [None, 3])
def test_triton_strong_decay(segment, monkeypatch):
    monkeypatch.setattr(sk, "SEGMENT_CHUNKS", segment)
    ins = draw(1, 16 * 5 + 9, 2, 16, 16, strong=True, init=True)
    err = fwd_bwd(sk, ins, sk.ssd_recurrent, chunk=16)
    # dA is a sum of terms that nearly cancel when every token forgets everything: fp32 noise
    bad = {k: v for k, v in err.items() if not v < (1e-3 if k == "dA" else 1e-5)}
    assert not bad, f"Triton scan off the reference under strong decay: {bad}"


@needs_interpreter
def test_triton_segments_agree(monkeypatch):
    """The forward's segment length G changes the schedule, not the function."""
    ins = draw(1, 16 * 7 + 3, 2, 16, 16, init=True)
    outs = []
    for G in (1, 3, 8):
        monkeypatch.setattr(sk, "SEGMENT_CHUNKS", G)
        outs.append(sk.ssd(**ins, chunk_size=16, backend="triton"))
    for y, f in outs[1:]:
        assert rel(y, outs[0][0]) < 1e-6 and rel(f, outs[0][1]) < 1e-6, "segment length changed the result"


@needs_interpreter
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_step_matches_reference(inplace):
    ins = draw(3, 1, 2, 24, 16, init=True)                             # p = 24: a masked tile
    x, dt, B, C = (ins[k][:, 0] for k in ("x", "dt", "B", "C"))
    state = ins["initial_state"].clone()
    y_ref, s_ref = sk.ssd_step_reference(state.double(), x.double(), dt.double(), ins["A"].double(),
                                          B.double(), C.double(), ins["dt_bias"].double())
    y, s = sk.ssd_step(state, x, dt, ins["A"], B, C, ins["dt_bias"], inplace=inplace, backend="triton")
    assert rel(y, y_ref) < 1e-6 and rel(s, s_ref) < 1e-6, "Triton decode step off the reference"
    assert (s is state) == inplace, "inplace=True must return the state tensor it was given"


@needs_interpreter
def test_triton_input_checks():
    ins = draw(1, 8, 2, 16, 16)
    with pytest.raises(ValueError, match="power of two"):
        sk.ssd(**ins, chunk_size=24, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        sk.ssd(**{k: v.double() if v is not None else None for k, v in ins.items()}, backend="triton")


def test_auto_is_torch_on_cpu():
    """backend='auto' on CPU tensors is the PyTorch chunked code, exactly."""
    ins = draw(1, 20, 2, 16, 16, init=True)
    y, f = sk.ssd(**ins, chunk_size=16)
    y2, f2 = sk.ssd(**ins, chunk_size=16, backend="torch")
    assert torch.equal(y, y2) and torch.equal(f, f2)


# -----------------------------------------------------------------------------
# GPU: compiled kernels at the mmMamba shape


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
def test_gpu_mmmamba_shape(dtype, tol):
    """h=16, p=n=128, chunk 128, 2 x (2048 + 77) tokens (a remainder), realistic dt and A,
    an initial state; float64 reference on the GPU. fp32 inputs use tf32 tensor cores."""
    torch.manual_seed(0)
    ins = sk._random_inputs(2, 2048 + 77, 16, 128, 128, dtype, "cuda")
    ins["initial_state"] = torch.randn(2, 16, 128, 128, device="cuda")
    err = fwd_bwd(sk, ins, sk.ssd_chunked, chunk=128)
    print(dtype, " ".join(f"{k} {v:.1e}" for k, v in err.items()))
    bad = {k: v for k, v in err.items() if not v < tol}
    assert not bad, f"{dtype} Triton scan off the float64 reference: {bad}"


@needs_cuda
def test_gpu_strong_decay_long():
    """Long sequence, every token forgetting almost everything: finite and right."""
    torch.manual_seed(1)
    ins = draw(1, 8192 + 5, 4, 128, 128, strong=True, dtype=torch.bfloat16, device="cuda")
    y, f = sk.ssd(**ins)
    yr, fr = sk.ssd_chunked(**{k: v.double() if v is not None else None for k, v in ins.items()})
    assert torch.isfinite(y).all() and torch.isfinite(f).all(), "inf/NaN under strong decay"
    assert rel(y, yr) < 2e-2 and rel(f, fr) < 2e-2


@needs_cuda
def test_gpu_step_and_auto():
    torch.manual_seed(2)
    ins = sk._random_inputs(4, 1, 16, 128, 128, torch.bfloat16, "cuda")
    state = torch.randn(4, 16, 128, 128, device="cuda")
    x, dt, B, C = (ins[k][:, 0] for k in ("x", "dt", "B", "C"))
    y_ref, s_ref = sk.ssd_step_reference(state.double(), x, dt, ins["A"].double(), B, C, ins["dt_bias"].double())
    y, s = sk.ssd_step(state, x, dt, ins["A"], B, C, ins["dt_bias"], inplace=True)   # auto: triton
    assert s is state and rel(s, s_ref) < 1e-5 and rel(y, y_ref) < 1e-2
    y1, f1 = sk.ssd(**ins)
    y2, f2 = sk.ssd(**ins, backend="triton")
    assert torch.equal(y1, y2) and torch.equal(f1, f2), "backend='auto' on CUDA must be the Triton path"
