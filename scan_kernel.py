"""
The chunked SSD scan of Mamba-2, three ways: an obviously correct reference, the chunked
algorithm in plain PyTorch, and (further down) hand-written Triton kernels.

Read in this order, as in llm.c's dev/cuda: reference first, then the fast paths that must
reproduce it, then the validation and benchmark entry point at the bottom.

What is computed (PAPER.md section 2, steps 4-6; "Transformers are SSMs", section 6):
    dt_t   = softplus(dt_raw_t + dt_bias)                 per head, > 0
    S_t    = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T    state, (P, N) per head
    y_t    = S_t C_t                                       readout, (P,) per head
With A < 0 every exp(...) above is a decay in (0, 1]. In mmMamba x = v, B = k, C = q.

Dimension glossary (mamba_ssm's layout, shared by every backend and the tests):
    b  batch                      l  sequence length (any length, not only multiples of Q)
    h  heads (H)                  p  head dim of x (P)        n  state size of B and C (N)
    c  number of chunks           q, s  positions inside a chunk (Q = chunk_size)
    x: (b, l, h, p)   dt: (b, l, h) raw   A: (h,)   B, C: (b, l, h, n)
    state: (b, h, p, n), float32 (float64 when the inputs are float64)
"""
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# shared helpers


def _compute_dtype(x):
    """The scan accumulates in float32, or float64 when asked for it (tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _discretize(dt, dt_bias, dtype):
    """dt_raw -> softplus(dt_raw + dt_bias), in the compute dtype."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    return F.softplus(dt)


# -----------------------------------------------------------------------------
# 1. the references: obviously correct, slow


def ssd_step_reference(state, x, dt, A, B, C, dt_bias=None):
    """One token of the recurrence. state: (b, h, p, n); x: (b, h, p); dt: (b, h);
    B, C: (b, h, n). Returns (y: (b, h, p) in x's dtype, new_state in float32/64)."""
    cd = _compute_dtype(x)
    dt = _discretize(dt, dt_bias, cd)                                   # (b, h)
    decay = torch.exp(dt * A.to(cd))                                    # (b, h), in (0, 1]
    xdt = x.to(cd) * dt[..., None]                                      # (b, h, p)
    new_state = state.to(cd) * decay[..., None, None] + xdt[..., None] * B.to(cd)[..., None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, C.to(cd))
    return y.to(x.dtype), new_state


def ssd_recurrent(x, dt, A, B, C, dt_bias=None, initial_state=None):
    """The plain recurrence, one ssd_step per token: O(l) steps, the decoding form."""
    b, l, h, p = x.shape
    cd = _compute_dtype(x)
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(l):
        y, state = ssd_step_reference(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], dt_bias)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_quadratic(x, dt, A, B, C, dt_bias=None, initial_state=None):
    """The attention-like form with a materialised (l, l) decay matrix (PAPER.md section 2):
    y_t = sum_{s<=t} (C_t . B_s) * exp(sum_{r=s+1..t} dt_r A) * dt_s * x_s
          + exp(sum_{r<=t} dt_r A) * S_0 C_t.   O(l^2) memory: short sequences only."""
    cd = _compute_dtype(x)
    x, B, C = x.to(cd), B.to(cd), C.to(cd)
    dt = _discretize(dt, dt_bias, cd)                                   # (b, l, h)
    cum = torch.cumsum(dt * A.to(cd), dim=1).transpose(1, 2)            # (b, h, l)
    l = x.shape[1]
    causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -torch.inf)  # (b, h, t, s)
    L = torch.exp(seg)                                                  # decay from s to t
    scores = torch.einsum("bthn,bshn->bhts", C, B) * L                  # (b, h, t, s)
    y = torch.einsum("bhts,bshp->bthp", scores, x * dt[..., None])
    b, _, h, p = x.shape
    S0 = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state.to(cd)
    y = y + torch.einsum("bhpn,bthn,bht->bthp", S0, C, torch.exp(cum))
    final = S0 * torch.exp(cum[..., -1])[..., None, None] + torch.einsum(
        "bshp,bshn,bhs->bhpn", x * dt[..., None], B, torch.exp(cum[..., -1:] - cum))
    return y, final


# -----------------------------------------------------------------------------
# 2. the chunked algorithm in plain PyTorch (Mamba-2 paper, Listing 1), any device


def segsum(x):
    """Stable segment sum: out[..., i, j] = x[..., j+1] + ... + x[..., i] for j <= i, -inf above
    the diagonal. The naive cumsum(x)[i] - cumsum(x)[j] subtracts two large numbers and loses
    the small difference (catastrophic cancellation); summing only the segment does not."""
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)                               # (..., T, T): x[..., i, j] = x_i
    below = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)                                       # sum over i' in (j, i]
    keep = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return out.masked_fill(~keep, -torch.inf)


def ssd_chunked(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128):
    """The four steps of the chunked SSD. Inside a chunk of Q tokens: the quadratic form;
    across chunks: one (P, N) state per head. Work O(l Q), memory O(l Q / Q * ...)."""
    cd = _compute_dtype(x)
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = chunk_size
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
    #    written as a (c+1, c+1) decay matrix as in Listing 1)
    S0 = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(cd)
    states = torch.cat([S0[:, None], states], dim=1)                    # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(dA_cs[..., -1], (1, 0))).clamp(max=0))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]                 # state entering each chunk

    # 4. state -> output: the contribution of the state entering each chunk
    decay_from_start = torch.exp(dA_cs.clamp(max=0))                    # (b, h, c, Q)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, decay_from_start)

    y = (y_diag + y_off).reshape(b, c * Q, h, p)[:, :l]
    return y, final_state


# -----------------------------------------------------------------------------
# 3. the public entry point


def ssd(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128, backend="auto"):
    """The SSD scan. Returns (y in x's dtype, final_state in float32, float64 for float64 x).
    backend: "torch" (the chunked PyTorch code above, any device, differentiable),
    "triton" (the kernels below, CUDA or TRITON_INTERPRET=1), "auto" (triton on CUDA)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown scan backend {backend!r}: use 'auto', 'torch' or 'triton'")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h) or B.shape[:3] != (b, l, h) or C.shape != B.shape or A.shape != (h,):
        raise ValueError(f"ssd shapes do not match: x {tuple(x.shape)} dt {tuple(dt.shape)} "
                         f"A {tuple(A.shape)} B {tuple(B.shape)} C {tuple(C.shape)}; "
                         "expected x (b,l,h,p), dt (b,l,h), A (h,), B and C (b,l,h,n)")
    y, final = ssd_chunked(x, dt, A, B, C, dt_bias, initial_state, chunk_size)
    return y.to(x.dtype), final


def ssd_step(state, x, dt, A, B, C, dt_bias=None, inplace=False, backend="auto"):
    """One decoding step (shapes as ssd_step_reference). inplace=True writes the new state
    into `state` and returns it: decoding captured in a CUDA graph needs fixed addresses."""
    y, new_state = ssd_step_reference(state, x, dt, A, B, C, dt_bias)
    if inplace:
        state.copy_(new_state)
        new_state = state
    return y, new_state
