"""
The SSD scan of Mamba-2: what one mmMamba layer computes over a sequence, written four
ways that must agree, simplest first (the pattern of llm.c's dev/cuda: the reference writes
the ground truth, every faster version reproduces it):

    1. segment sums, naive and stable        (why the decays are computed the way they are)
    2. the recurrence                        ssd_step_reference, ssd_recurrent
    3. the quadratic (attention-like) form   ssd_quadratic
    4. the chunked algorithm in PyTorch      ssd_chunked (four numbered steps)
    5. a simple Triton kernel of the same    ssd_simple (forward only), and the one-token
       four steps                            step kernel used by decoding
    6. the dispatch                          ssd(...), ssd_step(...)

The fast Triton kernels used for training and benchmarks on a GPU (segments, TMA, a
backward) are in scan_fast.py, which ssd(..., backend="triton") calls; nothing here needs
reading it: it computes the same function as ssd_chunked, and the tests hold it to that.

What is computed, per head (arXiv 2502.13145 Sec. 3, Eq. 2; docs/method.md §2):
    dt_t = softplus(dt_raw_t + dt_bias)                   step size, > 0
    S_t  = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T           state, (P, N)
    y_t  = S_t C_t                                        read-out, (P,)
A < 0, so every exp(dt A) is a decay in (0, 1]. mmMamba feeds x = V, B = K, C = Q of the
attention layer it replaces. The chunked form is the Mamba-2 paper's (arXiv 2405.21060
Sec. 6, Listing 1; docs/method.md §3).

Glossary (mamba_ssm's layout; every backend and test uses it). dt is the papers' step size
Delta; A, B, C and x are Eq. 2's; P and N are the papers' head dim and state size:
    b  batch        l  sequence length (any length, not only multiples of Q)
    h  heads (H)    p  head dim of x (P)        n  state size of B and C (N)
    c  chunks       q, s  positions inside a chunk of Q = chunk_size tokens
    x: (b, l, h, p)   dt: (b, l, h), raw   A: (h,)   B, C: (b, l, h, n)
    dt_bias: (h,)     state: (b, h, p, n) in float32 (float64 for float64 inputs)
    cs  the cumulative sum of dt*A inside a chunk (the log of the decay from its start)
"""
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# helpers


def _compute_dtype(x):
    """The scan accumulates in float32, or float64 when asked for it (the tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _discretize(dt, dt_bias, dtype):
    """dt_raw -> softplus(dt_raw + dt_bias), in the compute dtype."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt)


# -----------------------------------------------------------------------------
# 1. segment sums: the decay from token s to token t is exp(dA_{s+1} + ... + dA_t)
#
# segsum_naive takes the difference of two running sums. Over a long sequence the running
# sum grows large (65536 tokens at dt*A ~ -0.05 reach -3000, where one fp32 step is 2.4e-4)
# and the small difference between two large, nearly equal numbers keeps only their rounding
# error: catastrophic cancellation. segsum adds up only the segment itself, so its error is
# relative to the segment, not to the whole prefix.
#
# Differences of cumsums are still fine in one place: inside one chunk, in fp32, clamped at 0
# (ssd_chunked's steps 2 and 4 and every Triton kernel do this). A chunk's running sum covers
# at most Q = 128 tokens, so its rounding error stays a few fp32 steps of a small number; where
# it does grow large (strong decay), the decay it feeds is exp(-large) ~ 0 for all but nearby
# tokens, whose difference is small and exact enough. The clamp at 0 does two things: rounding
# can never turn a decay into a gain (> 1), and the masked upper triangle (s > t, a positive
# difference) can never overflow to inf, which times a zero mask would be NaN.


def segsum_naive(x):
    """out[..., i, j] = cumsum(x)[i] - cumsum(x)[j] for j <= i, -inf above the diagonal."""
    cs = torch.cumsum(x, dim=-1)
    keep = torch.ones(x.size(-1), x.size(-1), dtype=torch.bool, device=x.device).tril()
    return (cs[..., :, None] - cs[..., None, :]).masked_fill(~keep, -torch.inf)


def segsum(x):
    """Stable segment sum: out[..., i, j] = x[..., j+1] + ... + x[..., i] for j <= i, -inf above
    the diagonal, each entry summed from its own segment only."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)                               # (..., T, T): [i, j] = x_i
    below = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)                                       # sum over i' in (j, i]
    keep = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~keep, -torch.inf)


# -----------------------------------------------------------------------------
# 2. the recurrence: obviously correct, one token at a time (the decoding form)


def ssd_step_reference(state, x, dt, A, B, C, dt_bias=None):
    """One token. state: (b, h, p, n); x: (b, h, p); dt: (b, h); B, C: (b, h, n).
    Returns (y: (b, h, p) in x's dtype, new_state in float32/64)."""
    cd = _compute_dtype(x)
    dt = _discretize(dt, dt_bias, cd)                                   # (b, h)
    decay = torch.exp(dt * A.to(cd))                                    # (b, h), in (0, 1]
    xdt = x.to(cd) * dt[..., None]                                      # (b, h, p)
    new_state = state.to(cd) * decay[..., None, None] + xdt[..., None] * B.to(cd)[..., None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C.to(cd))
    return y.to(x.dtype), new_state


def ssd_recurrent(x, dt, A, B, C, dt_bias=None, initial_state=None):
    """The plain recurrence, one ssd_step_reference per token: l sequential steps."""
    b, l, h, p = x.shape
    cd = _compute_dtype(x)
    state = (x.new_zeros(b, h, p, B.shape[-1], dtype=cd) if initial_state is None
             else initial_state.to(cd))
    ys = []
    for t in range(l):
        y, state = ssd_step_reference(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], dt_bias)
        ys.append(y)
    return torch.stack(ys, dim=1), state


# -----------------------------------------------------------------------------
# 3. the quadratic form: the whole sequence as one masked, decayed attention


def ssd_quadratic(x, dt, A, B, C, dt_bias=None, initial_state=None):
    """y_t = sum_{s<=t} (C_t . B_s) exp(dA_{s+1} + ... + dA_t) dt_s x_s + exp(cs_t) S_0 C_t,
    with the (l, l) decay matrix materialised: O(l^2) memory, short sequences only."""
    cd = _compute_dtype(x)
    x, B, C = x.to(cd), B.to(cd), C.to(cd)
    dt = _discretize(dt, dt_bias, cd)                                   # (b, l, h)
    dA = (dt * A.to(cd)).transpose(1, 2)                                # (b, h, l)
    L = torch.exp(segsum(dA))                                           # (b, h, t, s)
    scores = torch.einsum("bthn,bshn->bhts", C, B) * L                  # masked: L = 0 above
    xdt = x * dt[..., None]
    y = torch.einsum("bhts,bshp->bthp", scores, xdt)
    b, _, h, p = x.shape
    S0 = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state.to(cd)
    from_start = torch.exp(torch.cumsum(dA, dim=-1))                    # (b, h, l): decay 0 -> t
    y = y + torch.einsum("bhpn,bthn,bht->bthp", S0, C, from_start)
    final = S0 * from_start[..., -1, None, None] + torch.einsum(
        "bshp,bshn,bhs->bhpn", xdt, B, L[..., -1, :])                   # row t = l-1 of L
    return y, final


# -----------------------------------------------------------------------------
# 4. the chunked algorithm in plain PyTorch (arXiv 2405.21060 Sec. 6, Listing 1), any device


def ssd_chunked(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128):
    """The four steps of the chunked SSD. Inside a chunk of Q tokens: the quadratic form;
    across chunks: one (P, N) state per head. Work O(l Q), memory O(l Q) for the scores."""
    cd = _compute_dtype(x)
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = min(chunk_size, l)              # a sequence shorter than a chunk: one chunk, unpadded
    dt = _discretize(dt, dt_bias, cd)                                   # (b, l, h)
    # Pad to whole chunks. A padded token has dt = 0: decay exp(0) = 1 and input 0, so it
    # changes neither the outputs before it nor the final state.
    pad = (-l) % Q
    x, B, C = (F.pad(t.to(cd), (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    dt = F.pad(dt, (0, 0, 0, pad))
    c = (l + pad) // Q
    x = (x * dt[..., None]).view(b, c, Q, h, p)                         # fold dt into the input
    B, C = B.view(b, c, Q, h, n), C.view(b, c, Q, h, n)
    dA = (dt * A.to(cd)).view(b, c, Q, h).permute(0, 3, 1, 2)           # (b, h, c, Q), <= 0
    dA_cs = torch.cumsum(dA, dim=-1)                                    # within each chunk

    # 1. intra-chunk outputs: the quadratic form inside each chunk (the "diagonal blocks")
    L = torch.exp(segsum(dA).clamp(max=0))                              # (b, h, c, Q, Q)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, x)

    # 2. per-chunk states: what each chunk alone leaves in the state at its end
    decay_to_end = torch.exp((dA_cs[..., -1:] - dA_cs).clamp(max=0))    # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x)

    # 3. state passing: carry the state across chunk boundaries (a recurrence over c chunks,
    #    written as a (c+1, c+1) decay matrix as in Listing 1; stable segsum: c can be large)
    S0 = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(cd)
    states = torch.cat([S0[:, None], states], dim=1)                    # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(dA_cs[..., -1], (1, 0))).clamp(max=0))  # (b,h,c+1,c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]                 # state entering each chunk

    # 4. state -> output: the contribution of the state entering each chunk
    decay_from_start = torch.exp(dA_cs.clamp(max=0))                    # (b, h, c, Q)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, decay_from_start)

    y = (y_diag + y_off).reshape(b, c * Q, h, p)[:, :l]
    return y, final_state


# -----------------------------------------------------------------------------
# 5. the same four steps as a Triton kernel (CUDA, or the CPU with TRITON_INTERPRET=1)

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                      # CPU-only install: the torch backend still works
    HAS_TRITON = False

    class _NoTriton:                     # lets the kernel definitions below parse; never launched
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn
    triton = tl = _NoTriton()


@triton.jit
def _softplus(v):
    """softplus(v) in fp32 without overflow; torch's threshold: v itself above 20."""
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v))))


@triton.jit
def _simple_scan_kernel(x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, y_ptr, init_ptr,
                        final_ptr, L, H, P, N, Q: tl.constexpr, BP: tl.constexpr,
                        BN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr):
    """ssd_chunked as one kernel (arXiv 2405.21060 Sec. 6; docs/method.md §3). One program
    per (batch*head, tile of BP rows of the state) walks the chunks in order with the (BP, N)
    state in registers. Per chunk, ssd_chunked's steps on (Q, .) tiles:
    1 and 4 give the chunk's outputs, 2 and 3 carry the state to the chunk's end. The rows p
    of the state never mix, so tiles of p are independent programs."""
    bh, pt = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // H, bh % H
    q = tl.arange(0, Q)
    p = pt * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    pn = (p < P)[:, None] & (n < N)[None, :]
    state_offs = (bh * P + p)[:, None].to(tl.int64) * N + n[None, :]   # into (b, h, p, n)
    if HAS_INIT:
        state = tl.load(init_ptr + state_offs, mask=pn, other=0.0)     # (BP, BN), fp32
    else:
        state = tl.zeros((BP, BN), dtype=tl.float32)
    A = tl.load(A_ptr + hi).to(tl.float32)
    causal = q[:, None] >= q[None, :]                                   # (t, s): s <= t
    for c in range(0, tl.cdiv(L, Q)):
        t = c * Q + q
        ok = t < L                                                      # the last chunk's tail
        rows = (bi * L + t).to(tl.int64) * H + hi                       # token-head rows
        x = tl.load(x_ptr + rows[:, None] * P + p[None, :],
                    mask=ok[:, None] & (p < P)[None, :], other=0.0)     # (Q, BP)
        B = tl.load(B_ptr + rows[:, None] * N + n[None, :],
                    mask=ok[:, None] & (n < N)[None, :], other=0.0)     # (Q, BN)
        C = tl.load(C_ptr + rows[:, None] * N + n[None, :],
                    mask=ok[:, None] & (n < N)[None, :], other=0.0)     # (Q, BN)
        dt = tl.load(dt_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += tl.load(dt_bias_ptr + hi).to(tl.float32)
        dt = tl.where(ok, _softplus(dt), 0.0)                           # padding: dt = 0
        cs = tl.cumsum(dt * A, axis=0)                                  # (Q,), <= 0
        total = tl.sum(dt * A, axis=0)                                  # the chunk's log-decay
        # 1. intra-chunk: (C B^T) masked and decayed from s to t, times dt_s x_s
        decay = tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0))     # (Q, Q)
        scores = tl.where(causal, tl.dot(C, tl.trans(B)) * decay * dt[None, :], 0.0)
        y = tl.dot(scores.to(x.dtype), x)                               # (Q, BP)
        # 4. state -> output: the state entering the chunk, decayed to each token
        y += tl.dot(C, tl.trans(state).to(C.dtype)) * tl.exp(tl.minimum(cs, 0.0))[:, None]
        tl.store(y_ptr + rows[:, None] * P + p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & (p < P)[None, :])
        # 2. + 3. the chunk's own state (each token decayed to the end), added to the
        # entering state decayed across the whole chunk
        to_end = dt * tl.exp(tl.minimum(total - cs, 0.0))               # (Q,)
        xw = (x.to(tl.float32) * to_end[:, None]).to(B.dtype)           # (Q, BP)
        state = state * tl.exp(total) + tl.dot(tl.trans(xw), B)        # (BP, BN)
    tl.store(final_ptr + state_offs, state, mask=pn)


@triton.jit
def _step_kernel(s_ptr, out_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, y_ptr,
                 H, P, N, BP: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                 REP: tl.constexpr):
    """One decoding token for a (BP, N) tile of one (batch, head) state: read it once, decay,
    add dt x B^T, write it back (out_ptr may be s_ptr: in place) and read out y = S C.
    Pure bandwidth (64 KiB of fp32 state per head); the point is one launch per layer.
    REP > 1: x and B hold one head per REP heads (grouped heads, fused_decode.py)."""
    bh, pt = tl.program_id(0), tl.program_id(1)
    hi, g = bh % H, bh // REP
    p = pt * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    m = (p < P)[:, None] & (n < N)[None, :]
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dt_bias_ptr + hi).to(tl.float32)
    dt = _softplus(dt)
    decay = tl.exp(tl.minimum(dt * tl.load(A_ptr + hi).to(tl.float32), 0.0))
    x = tl.load(x_ptr + g * P + p, mask=p < P, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + g * N + n, mask=n < N, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + bh * N + n, mask=n < N, other=0.0).to(tl.float32)
    offs = (bh * P + p)[:, None].to(tl.int64) * N + n[None, :]
    state = tl.load(s_ptr + offs, mask=m, other=0.0) * decay + (dt * x)[:, None] * B[None, :]
    tl.store(out_ptr + offs, state, mask=m)
    y = tl.sum(state * C[None, :], axis=1)
    tl.store(y_ptr + bh * P + p, y.to(y_ptr.dtype.element_ty), mask=p < P)


def _pow2(v):
    """Tile width for a dimension of size v: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(v))


def check_triton_inputs(x, chunk_size):
    """What every Triton scan needs; a clear error instead of a compile failure."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton scan needs the triton package: pip install triton, "
                           "or use backend='torch'")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton scan needs chunk_size a power of two >= 16, "
                         f"got {chunk_size}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton scan takes fp16, bf16 or fp32 inputs, got {x.dtype}: "
                         "use backend='torch' for float64")


def ssd_simple(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128):
    """_simple_scan_kernel: forward only. It has no backward on purpose: training runs the
    fast kernels of scan_fast.py (backend='triton') or autograd through ssd_chunked
    (backend='torch'); a call that would need gradients is refused rather than cut off."""
    check_triton_inputs(x, chunk_size)
    ins = (x, dt, A, B, C, dt_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ins):
        raise ValueError("backend='simple' is forward only: use backend='triton' or 'torch' "
                         "for gradients, or call it under torch.no_grad()")
    b, l, h, p = x.shape
    n = B.shape[-1]
    # The chunk is a schedule, not part of the function (every Q gives the same y): at most
    # 64 keeps the (Q, Q) scores and the (BP, N) fp32 state in registers.
    Q, BP = min(chunk_size, 64), min(64, _pow2(p))
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    y = torch.empty_like(x)
    final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    init = initial_state.float().contiguous() if initial_state is not None else final
    _simple_scan_kernel[(b * h, triton.cdiv(p, BP))](
        x, dt, dt_bias if dt_bias is not None else A, A, B, C, y, init, final, l, h, p, n,
        Q=Q, BP=BP, BN=_pow2(n), HAS_BIAS=dt_bias is not None,
        HAS_INIT=initial_state is not None, num_warps=4, num_stages=2)  # fp32: 3 overflow smem
    return y, final


def ssd_step_triton(state, x, dt, A, B, C, dt_bias=None, inplace=False):
    """One fused decode step: one launch, state read and written once (in place if asked)."""
    b, h, p = x.shape
    n = B.shape[-1]
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    f32 = state.dtype == torch.float32 and state.is_contiguous()
    direct = inplace and f32
    src = state if f32 else state.float().contiguous()
    out = state if direct else torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    BP = min(64, _pow2(p))
    _step_kernel[(b * h, triton.cdiv(p, BP))](
        src, out, x, dt, dt_bias if dt_bias is not None else A, A, B, C, y, h, p, n,
        BP=BP, BN=_pow2(n), HAS_BIAS=dt_bias is not None, REP=1, num_warps=4)
    if inplace and not direct:
        state.copy_(out)
        out = state
    return y, out


# -----------------------------------------------------------------------------
# 6. the public entry points

BACKENDS = ("auto", "torch", "triton", "simple")


def _backend(backend, x):
    """'auto': the fast Triton kernels on CUDA (not for float64), the PyTorch code elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if HAS_TRITON and x.is_cuda and x.dtype != torch.float64 else "torch"
    return backend


def ssd(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128, backend="auto"):
    """The SSD scan. Returns (y in x's dtype, final_state in float32; float64 for float64 x).
    backend: "torch" (ssd_chunked: any device, differentiable), "triton" (the fast kernels of
    scan_fast.py, with a backward), "simple" (ssd_simple, forward only), "auto" (see _backend).
    The Triton backends run on CUDA, or on the CPU with TRITON_INTERPRET=1."""
    b, l, h, p = x.shape
    if dt.shape != (b, l, h) or B.shape[:3] != (b, l, h) or C.shape != B.shape or A.shape != (h,):
        raise ValueError(f"ssd shapes do not match: x {tuple(x.shape)} dt {tuple(dt.shape)} "
                         f"A {tuple(A.shape)} B {tuple(B.shape)} C {tuple(C.shape)}; "
                         "expected x (b,l,h,p), dt (b,l,h), A (h,), B and C (b,l,h,n)")
    backend = _backend(backend, x)
    if backend == "triton":
        import scan_fast                 # here, not at the top: scan_fast imports this file
        return scan_fast.ssd_triton(x, dt, A, B, C, dt_bias, initial_state, chunk_size)
    if backend == "simple":
        return ssd_simple(x, dt, A, B, C, dt_bias, initial_state, chunk_size)
    y, final = ssd_chunked(x, dt, A, B, C, dt_bias, initial_state, chunk_size)
    return y.to(x.dtype), final


def ssd_step(state, x, dt, A, B, C, dt_bias=None, inplace=False, backend="auto"):
    """One decoding step (shapes as ssd_step_reference); "triton" and "simple" both run
    _step_kernel. inplace=True writes the new state into `state` and returns it: decoding
    captured in a CUDA graph needs fixed addresses."""
    if _backend(backend, x) != "torch":
        return ssd_step_triton(state, x, dt, A, B, C, dt_bias, inplace)
    y, new_state = ssd_step_reference(state, x, dt, A, B, C, dt_bias)
    if inplace:
        state.copy_(new_state)
        new_state = state
    return y, new_state
