"""The Triton scans against float64 references: the simple kernel and the step kernel of
scan_kernel.py, and the fast kernels of scan_fast.py (forward and backward).

CPU (CI): the kernels run in Triton's interpreter, fp32, on small shapes (h=2, p=n=16,
chunk 16 unless a test says otherwise), compared with ssd_quadratic / ssd_recurrent /
ssd_step_reference in float64, gradients included. tests/conftest.py sets TRITON_INTERPRET
before anything imports triton. GPU (skipped without CUDA; `-k gpu`): bf16 and fp32 at the
mmMamba shape (h=16, p=n=128), compiled kernels; with CUDA the interpreter tests skip.
"""
import os

import pytest
import torch

import scan_fast as sf
import scan_kernel as sk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (INTERPRET and sk.HAS_TRITON),
                                       reason="interpreter tests: CPU-only machines with triton")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and sk.HAS_TRITON),
                                reason="needs a CUDA GPU and triton")
NAMES = ["x", "dt", "A", "B", "C", "dt_bias", "initial_state"]
Q = 16                                       # the chunk of the interpreter tests
LENGTHS = [1, Q - 1, Q, Q + 1, 3 * Q + 5]    # one token, one chunk and either side, a tail
CHUNK_SIZES = [16, 32, 64, 128, 256]


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


def rel(a, ref, size=None):
    """||a - ref|| / ||size|| (size = ref unless given); the absolute norm where that is
    exactly 0 (dA at one token)."""
    d = (a.double() - ref.double()).norm().item()
    r = (ref if size is None else size).double().norm().item()
    assert d == d, "NaN in the Triton result"
    return d / r if r > 0 else d


def fwd_bwd(ins, ref_fn, chunk, backend="triton"):
    """Triton outputs and gradients vs float64 ones of ref_fn, for random output weights.
    dA and ddt_bias sum a per-token gradient over the sequence, a sum that can cancel (under
    strong decay, nearly to zero): their errors are relative to the sum of the terms' sizes,
    the scale fp32 rounding works at (dA's terms where ref_fn is ssd_quadratic)."""
    leaves = {k: v.clone().requires_grad_() for k, v in ins.items() if v is not None}
    y, f = sk.ssd(**{k: leaves.get(k) for k in NAMES}, chunk_size=chunk, backend=backend)
    refs = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    per_token = ref_fn is sk.ssd_quadratic              # the others take one A per head
    if per_token:
        refs["A"] = refs["A"].detach().expand(ins["dt"].shape).clone().requires_grad_()
    yr, fr = ref_fn(**{k: refs.get(k) for k in NAMES})
    gen = torch.Generator().manual_seed(yr.numel())   # the same output weights on every run
    gy, gf = (torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in (yr, fr))
    g = torch.autograd.grad((y.double() * gy).sum() + (f.double() * gf).sum(),
                            list(leaves.values()))
    gr = dict(zip(refs, torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(),
                                            list(refs.values()))))
    sizes = {"dt_bias": gr["dt"].abs().sum((0, 1))}
    if per_token:
        sizes["A"], gr["A"] = gr["A"].abs().sum((0, 1)), gr["A"].sum((0, 1))
    err = {"y": rel(y, yr), "final_state": rel(f, fr)}
    for k, a in zip(leaves, g):
        err["d" + k] = rel(a, gr[k], sizes.get(k))
    return err


def forward_only(ins, ref_fn, chunk, backend="simple"):
    """Outputs and final state of a forward-only backend vs ref_fn in float64."""
    with torch.no_grad():
        y, f = sk.ssd(**ins, chunk_size=chunk, backend=backend)
    yr, fr = ref_fn(**{k: v.double() if v is not None else None for k, v in ins.items()})
    assert y.dtype == ins["x"].dtype and f.dtype == torch.float32
    return {"y": rel(y, yr), "final_state": rel(f, fr)}


def assert_close(err, tol, what):
    bad = {k: v for k, v in err.items() if not v < tol}
    assert not bad, f"{what} off the float64 reference: {bad} (all errors: {err})"


# -----------------------------------------------------------------------------
# CPU: the simple kernel (scan_kernel.py), the interpreter, fp32 vs float64


@needs_interpreter
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("init", [False, True])
def test_simple_matches_float64(l, init):
    err = forward_only(draw(2, l, 2, 16, 16, init=init), sk.ssd_quadratic, chunk=Q)
    assert_close(err, 1e-5, f"simple kernel at l={l}, init={init}")


@needs_interpreter
def test_simple_strong_decay_and_masked_tiles():
    # p = 24, n = 20: tiles of 32 with masked rows and columns; strong decay over 3 chunks + 9
    ins = draw(1, 3 * Q + 9, 2, 24, 20, strong=True, init=True)
    assert_close(forward_only(ins, sk.ssd_recurrent, chunk=Q), 1e-5, "simple kernel, strong decay")


@needs_interpreter
def test_simple_is_forward_only():
    ins = draw(1, 8, 2, 16, 16)
    ins["x"].requires_grad_()
    with pytest.raises(ValueError, match="forward only"):
        sk.ssd(**ins, chunk_size=Q, backend="simple")
    with torch.no_grad():                                               # allowed without grad
        y, _ = sk.ssd(**ins, chunk_size=Q, backend="simple")
    assert torch.isfinite(y).all()


# -----------------------------------------------------------------------------
# CPU: the fast kernels (scan_fast.py), forward and backward


@needs_interpreter
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("init", [False, True])
def test_fast_matches_float64(l, init, monkeypatch):
    # segments of 1 and 2 chunks exercise _state_kernel + _pass_kernel in the forward; None
    # picks one segment here (few programs), the scan alone
    monkeypatch.setattr(sf, "SEGMENT_CHUNKS", {1: None, 15: 1, 16: 2, 17: 1, 53: 2}[l])
    err = fwd_bwd(draw(2, l, 2, 16, 16, init=init), sk.ssd_quadratic, chunk=Q)
    assert_close(err, 1e-5, f"fast kernels at l={l}, init={init}")


@needs_interpreter
@pytest.mark.parametrize("case", ["forced", "head-dim-24"])
def test_fast_pointer_path_matches_float64(case, monkeypatch):
    # tiles go through TMA descriptors where they can; plain pointers where a tile would straddle
    # two heads (head dim 24 with 32-wide tiles) or the memory is misaligned: test both ways
    monkeypatch.setattr(sf, "SEGMENT_CHUNKS", 2)
    real, used = sf._tma_views, []

    def spy(*a):
        used.append(None if case == "forced" else real(*a))
        return used[-1]

    monkeypatch.setattr(sf, "_tma_views", spy)
    p = 24 if case == "head-dim-24" else 16
    err = fwd_bwd(draw(2, 53, 2, p, 16, init=True), sk.ssd_quadratic, chunk=Q)
    assert used and all(v is None for v in used), "the pointer path was not taken"
    assert_close(err, 1e-5, f"fast kernels (pointer path, {case})")


@needs_interpreter
@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("wide", [False, True])
def test_fast_backward_tiles_smaller_than_the_head(segments, wide, monkeypatch):
    # the backward can tile N (dB, dC) and P (dx), summing the log-decays' shares over the
    # tiles, and _states_kernel too: three tiles each way here, the last of N's with 4 of its 8
    # columns past the end (or, wide, 8 x 16 tiles, as STATES_WIDE's 64 x 128); the state
    # gradients in one sweep or in segments (of 2, 2, 1 chunks)
    monkeypatch.setattr(sf, "BWD_CONFIG", dict(sf.BWD_CONFIG, BN=8, BP=8))
    monkeypatch.setattr(sf, "STATES_CONFIG", dict(sf.STATES_CONFIG, BN=8, BP=8))
    monkeypatch.setattr(sf, "STATES_WIDE", dict(sf.STATES_WIDE, BN=16, BP=8) if wide else None)
    monkeypatch.setattr(sf, "SEGMENTS", segments)
    ins = draw(2, 4 * Q + 3, 2, 24, 20, init=True)
    assert_close(fwd_bwd(ins, sk.ssd_quadratic, chunk=Q), 1e-5, "fast, tiles of 8")


@needs_interpreter
@pytest.mark.parametrize("bwd_chunk,segments", [(16, 3), (32, 1), (32, 2), (64, 2)])
def test_states_for_the_backward(bwd_chunk, segments, monkeypatch):
    """The states entering each of the backward's chunks, as the forward stores them (every
    R-th of its chunks of 16, R = 1, 2, 4, across segments of 3 chunks) and as _chunk_states
    recomputes them (tiles of 8, the last partly past the end; in one sweep or in segments),
    against float64: the final state of the prefix before each chunk."""
    monkeypatch.setattr(sf, "FWD_CONFIG", dict(sf.FWD_CONFIG, Q=16))
    monkeypatch.setattr(sf, "SEGMENT_CHUNKS", 3)
    monkeypatch.setattr(sf, "STATES_CONFIG", dict(sf.STATES_CONFIG, BP=8, BN=8))
    monkeypatch.setattr(sf, "STATES_WIDE", None)
    monkeypatch.setattr(sf, "SEGMENTS", segments)
    ins = draw(2, 4 * 16 * 2 + 7, 2, 24, 20, init=True)
    x, dt, A, B, C, bias, init = (ins[k] for k in NAMES)
    _, _, saved = sf._ssd_fwd_triton(x, dt, A, B, C, bias, init, 16, bwd_chunk)
    again, _ = sf._chunk_states(x, B, dt, A, bias, init, bwd_chunk, False, torch.float32)
    d = {k: v.double() for k, v in ins.items()}
    want = torch.stack([d["initial_state"]] + [
        sk.ssd_chunked(**{k: d[k][:, :s] for k in ("x", "dt", "B", "C")}, A=d["A"],
                       dt_bias=d["dt_bias"], initial_state=d["initial_state"], chunk_size=16)[1]
        for s in range(bwd_chunk, x.shape[1], bwd_chunk)], dim=1)
    assert saved.shape == want.shape == again.shape
    assert rel(saved, want) < 1e-5 and rel(again, want) < 1e-5, (rel(saved, want),
                                                                   rel(again, want))


@needs_interpreter
@pytest.mark.parametrize("segments", [2, 3])
def test_state_gradients_two_chunks_a_step(segments, monkeypatch):
    """In 16-bit inputs the backward's segment kernel (_state_kernel in reverse) steps two
    chunks at a time where a segment has an even number (12 chunks of 16 in 2 or 3 segments):
    the state gradients of fp32 on the same values, which step one chunk at a time."""
    monkeypatch.setattr(sf, "STATES_CONFIG", dict(sf.STATES_CONFIG, BP=8, BN=8))
    monkeypatch.setattr(sf, "STATES_WIDE", None)
    monkeypatch.setattr(sf, "SEGMENTS", segments)
    ins = draw(2, 16 * 11 + 5, 2, 24, 20, init=True)
    dy, C, dt = (t.half() for t in (torch.randn_like(ins["x"]), ins["C"], ins["dt"]))
    args = ins["A"], ins["dt_bias"], ins["initial_state"], 16, True, torch.float32
    half = sf._chunk_states(dy, C, dt, *args)
    full = sf._chunk_states(dy.float(), C.float(), dt.float(), *args)
    errs = [rel(a, b) for a, b in zip(half, full)]
    assert all(e < 3e-3 for e in errs), errs    # fp16 rounds u * decay before each product


@needs_interpreter
@pytest.mark.parametrize("segment", [None, 3])
def test_fast_strong_decay(segment, monkeypatch):
    monkeypatch.setattr(sf, "SEGMENT_CHUNKS", segment)
    ins = draw(1, Q * 5 + 9, 2, 16, 16, strong=True, init=True)
    err = fwd_bwd(ins, sk.ssd_recurrent, chunk=Q)
    # dA is a sum of terms that nearly cancel when every token forgets everything: fp32 noise
    bad = {k: v for k, v in err.items() if not v < (1e-3 if k == "dA" else 1e-5)}
    assert not bad, f"fast kernels off the reference under strong decay: {bad}"


@needs_interpreter
@pytest.mark.parametrize("used", ["y", "final_state"])
def test_fast_gradients_of_one_output(used):
    """Only y, or only the final state, reaches the loss: the other output's gradient comes as
    None (the Function does not ask autograd to fill it with zeros), every gradient still right,
    the initial state's and dt_bias's (summed in the dt kernel) included."""
    ins = draw(2, 2 * Q + 3, 2, 16, 16, init=True)
    leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
    refs = {k: v.detach().double().requires_grad_() for k, v in ins.items()}
    out = dict(zip(("y", "final_state"), sk.ssd(**leaves, chunk_size=Q, backend="triton")))
    ref = dict(zip(("y", "final_state"), sk.ssd_chunked(**refs, chunk_size=Q)))
    w = torch.randn(ref[used].shape, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad((out[used] * w).sum(), list(leaves.values()))
    want = torch.autograd.grad((ref[used] * w.double()).sum(), list(refs.values()),
                               allow_unused=True)               # the final state has no C
    for name, g, r in zip(leaves, got, want):
        r = torch.zeros_like(refs[name]) if r is None else r
        assert rel(g, r) < 1e-4, f"d{name} with only {used} used: {rel(g, r):.1e}"


@needs_interpreter
def test_fast_segments_agree(monkeypatch):
    """The forward's segment length G changes the schedule, not the function."""
    ins = draw(1, Q * 7 + 3, 2, 16, 16, init=True)
    outs = []
    for G in (1, 3, 8):
        monkeypatch.setattr(sf, "SEGMENT_CHUNKS", G)
        outs.append(sk.ssd(**ins, chunk_size=Q, backend="triton"))
    for y, f in outs[1:]:
        assert rel(y, outs[0][0]) < 1e-6 and rel(f, outs[0][1]) < 1e-6, \
            "segment length changed the result"


@needs_interpreter
@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_every_chunk_size(chunk):
    """Any power-of-two chunk_size from 16 to 256 gives the same function, forward and
    backward: the kernels run chunks of at most chunk_size (FWD_CONFIG, BWD_CHUNK). p = 40,
    n = 24: masked tiles (and the pointer path: a 64-wide tile would straddle two heads)."""
    ins = draw(1, 2 * min(chunk, 64) + 5, 2, 40, 24, init=True)
    assert_close(fwd_bwd(ins, sk.ssd_quadratic, chunk=chunk), 1e-5, f"fast, chunk_size={chunk}")
    assert_close(forward_only(ins, sk.ssd_quadratic, chunk=chunk), 1e-5,
                 f"simple, chunk_size={chunk}")


@needs_interpreter
def test_chunk_256_at_head_dim_128():
    """The largest chunk at the largest head dim (the mmMamba layer's P = N = 128)."""
    ins = draw(1, 70, 1, 128, 128, init=True)
    assert_close(fwd_bwd(ins, sk.ssd_quadratic, chunk=256), 1e-5, "fast, chunk 256, P=N=128")
    assert_close(forward_only(ins, sk.ssd_quadratic, chunk=256), 1e-5,
                 "simple, chunk 256, P=N=128")


# -----------------------------------------------------------------------------
# CPU: the step kernel, checks, dispatch


@needs_interpreter
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("strong", [False, True])
def test_triton_step_matches_reference(inplace, strong):
    ins = draw(3, 1, 2, 24, 16, init=True, strong=strong)              # p = 24: a masked tile
    x, dt, B, C = (ins[k][:, 0] for k in ("x", "dt", "B", "C"))
    state = ins["initial_state"].clone()
    y_ref, s_ref = sk.ssd_step_reference(state.double(), x.double(), dt.double(),
                                          ins["A"].double(), B.double(), C.double(),
                                          ins["dt_bias"].double())
    y, s = sk.ssd_step(state, x, dt, ins["A"], B, C, ins["dt_bias"], inplace=inplace,
                       backend="triton")
    assert rel(y, y_ref) < 1e-6 and rel(s, s_ref) < 1e-6, "Triton decode step off the reference"
    assert (s is state) == inplace, "inplace=True must return the state tensor it was given"


@needs_interpreter
def test_step_kernel_decodes_a_sequence():
    """Steps of _step_kernel, token by token, == the simple kernel and the fast one over the
    whole sequence (the decoding form against the two chunked forms)."""
    ins = draw(1, Q + 3, 2, 16, 16, init=True)
    state = ins["initial_state"].clone()
    ys = []
    for t in range(Q + 3):
        y, state = sk.ssd_step(state, *(ins[k][:, t] for k in ("x", "dt")), ins["A"],
                               *(ins[k][:, t] for k in ("B", "C")), ins["dt_bias"],
                               inplace=True, backend="triton")
        ys.append(y)
    for backend in ("simple", "triton"):
        y, f = sk.ssd(**ins, chunk_size=Q, backend=backend)
        assert rel(torch.stack(ys, 1), y) < 1e-5 and rel(state, f) < 1e-5, backend


@needs_interpreter
def test_triton_input_checks():
    ins = draw(1, 8, 2, 16, 16)
    for backend in ("triton", "simple"):
        with pytest.raises(ValueError, match="power of two"):
            sk.ssd(**ins, chunk_size=24, backend=backend)
        with pytest.raises(ValueError, match="float64"):
            sk.ssd(**{k: v.double() if v is not None else None for k, v in ins.items()},
                   backend=backend)
    with pytest.raises(ValueError, match="unknown scan backend"):
        sk.ssd(**ins, backend="cuda")


def test_auto_is_torch_on_cpu():
    """backend='auto' on CPU tensors is the PyTorch chunked code, exactly."""
    ins = draw(1, 20, 2, 16, 16, init=True)
    y, f = sk.ssd(**ins, chunk_size=16)
    y2, f2 = sk.ssd(**ins, chunk_size=16, backend="torch")
    assert torch.equal(y, y2) and torch.equal(f, f2)


def test_benchmark_flags_parse():
    assert sf.parse_shapes("16x1024,1X65536") == ((16, 1024), (1, 65536))
    for bad in ("16x", "0x5", "abc", "2x3x4"):
        with pytest.raises(sf.InputError, match="--shapes"):
            sf.parse_shapes(bad)
    assert sf.parse_only("fast,mamba_ssm") == ["fast", "mamba_ssm"]
    for bad in ("", "fast,cuda"):
        with pytest.raises(sf.InputError, match="--only"):
            sf.parse_only(bad)


# -----------------------------------------------------------------------------
# GPU: compiled kernels at the mmMamba shape


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
def test_gpu_mmmamba_shape(dtype, tol):
    """h=16, p=n=128, chunk 128, 2 x (2048 + 77) tokens (a remainder), realistic dt and A,
    an initial state; float64 reference on the GPU. fp32 inputs use tf32 tensor cores."""
    torch.manual_seed(0)
    ins = sf._random_inputs(2, 2048 + 77, 16, 128, 128, dtype, "cuda")
    ins["initial_state"] = torch.randn(2, 16, 128, 128, device="cuda")
    assert_close(fwd_bwd(ins, sk.ssd_chunked, chunk=128), tol, f"{dtype} fast kernels")


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 2e-2)])
def test_gpu_simple_kernel(dtype, tol):
    torch.manual_seed(3)
    ins = sf._random_inputs(2, 2048 + 77, 16, 128, 128, dtype, "cuda")
    ins["initial_state"] = torch.randn(2, 16, 128, 128, device="cuda")
    assert_close(forward_only(ins, sk.ssd_chunked, chunk=128), tol, f"{dtype} simple kernel")


@needs_cuda
@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_gpu_every_chunk_size(chunk):
    """bf16 at P = N = 128, forward and backward, every chunk size (256 once needed more
    shared memory in the backward than an H100 or H200 has)."""
    torch.manual_seed(chunk)
    ins = sf._random_inputs(1, 1024 + 77, 4, 128, 128, torch.bfloat16, "cuda")
    ins["initial_state"] = torch.randn(1, 4, 128, 128, device="cuda")
    assert_close(fwd_bwd(ins, sk.ssd_chunked, chunk=chunk), 2e-2, f"bf16, chunk_size={chunk}")
    if chunk == 256:                                                    # fp32 too, once
        ins = {k: v.float() for k, v in ins.items()}
        assert_close(fwd_bwd(ins, sk.ssd_chunked, chunk=chunk), 5e-3, "fp32, chunk_size=256")


@needs_cuda
def test_gpu_state_gradients_two_chunks_a_step(monkeypatch):
    """test_state_gradients_two_chunks_a_step compiled, bf16 at the mmMamba shape: 12 chunks of
    64 in 3 segments (4 chunks each, two a step) against fp32 on the same values."""
    monkeypatch.setattr(sf, "SEGMENTS", 3)
    ins = sf._random_inputs(2, 64 * 11 + 5, 16, 128, 128, torch.bfloat16, "cuda")
    dy = torch.randn_like(ins["x"])
    args = ins["A"], ins["dt_bias"], None, 64, True, torch.float32
    half = sf._chunk_states(dy, ins["C"], ins["dt"], *args)
    full = sf._chunk_states(dy.float(), ins["C"].float(), ins["dt"].float(), *args)
    errs = [rel(a, b) for a, b in zip(half, full)]
    assert all(e < 1e-2 for e in errs), errs


@needs_cuda
def test_gpu_strong_decay_long():
    """Long sequence, every token forgetting almost everything: finite and right."""
    torch.manual_seed(1)
    ins = draw(1, 8192 + 5, 4, 128, 128, strong=True, dtype=torch.bfloat16, device="cuda")
    ref = sk.ssd_chunked(**{k: v.double() if v is not None else None for k, v in ins.items()})
    for backend in ("triton", "simple"):
        with torch.no_grad():
            y, f = sk.ssd(**ins, backend=backend)
        assert torch.isfinite(y).all() and torch.isfinite(f).all(), f"inf/NaN ({backend})"
        assert rel(y, ref[0]) < 2e-2 and rel(f, ref[1]) < 2e-2, backend


@needs_cuda
def test_gpu_step_and_auto():
    torch.manual_seed(2)
    ins = sf._random_inputs(4, 1, 16, 128, 128, torch.bfloat16, "cuda")
    state = torch.randn(4, 16, 128, 128, device="cuda")
    x, dt, B, C = (ins[k][:, 0] for k in ("x", "dt", "B", "C"))
    y_ref, s_ref = sk.ssd_step_reference(state.double(), x, dt, ins["A"].double(), B, C,
                                          ins["dt_bias"].double())
    y, s = sk.ssd_step(state, x, dt, ins["A"], B, C, ins["dt_bias"], inplace=True)   # auto
    assert s is state and rel(s, s_ref) < 1e-5 and rel(y, y_ref) < 1e-2
    y1, f1 = sk.ssd(**ins)
    y2, f2 = sk.ssd(**ins, backend="triton")
    assert torch.equal(y1, y2) and torch.equal(f1, f2), \
        "backend='auto' on CUDA must be the fast Triton path"
