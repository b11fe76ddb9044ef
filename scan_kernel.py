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
import math

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
# 3. the Triton kernels (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)
#
# The forward splits the sequence into segments of G chunks (G * Q tokens):
#   _state_kernel  one program per (segment, batch*head, p-tile): the state the segment alone
#                  leaves at its end, built chunk by chunk (PAPER.md section 2, step 2). Run for
#                  every segment but the last: nothing reads what the last one leaves (the scan
#                  kernel writes the final state itself).
#   _pass_kernel   one program per (batch*head, block of P*N state entries): walks the segments
#                  in order and turns "what each segment adds" into "the state entering each
#                  segment" (step 3). Elementwise, sequential over segments only.
#   _scan_kernel   one program per (segment, batch*head, p-tile): starts from the state entering
#                  its segment and runs G chunks in order, each chunk doing the intra-chunk
#                  quadratic form (step 1) and the state-to-output term (step 4) in registers,
#                  then carrying the state to the next chunk (step 2 again, in registers).
# Why segments: every state written to memory costs P*N*4 bytes = 512 bytes per token at
# Q = P = N = 128, twice the bytes of x. One state per segment of G chunks makes that traffic
# G times smaller; G = all chunks needs no state kernels at all but leaves only b*h*P/BP
# programs to fill the GPU. _pick_segment chooses G to keep enough programs in flight.
# The forward runs chunks of 64 whatever chunk_size says (a schedule, not part of the function)
# and p-tiles of 64 (docs/kernel_log.md, v4): the scan is bound by the latency of one long chain
# per program (loads, four small products, exps, state update), not by bytes or tensor-core
# rate, and with (64, 64) tiles one warpgroup fits in 255 registers: two programs share an SM
# and hide each other's waits. Tiles move through TMA tensor descriptors over (b, l, h*P) views
# (one bulk copy per tile; rows past the end read as zeros, are not written back): ~10% faster.
#
# The backward (chunk-parallel, one program per (chunk, batch*head)) needs the state entering
# every chunk and the gradient of the state leaving it: _state_kernel + _pass_kernel with G = 1
# give both (the second run goes backwards in time with dy and C in place of x and B).
# _scan_bwd_kernel then forms every gradient of one chunk from those two (P, N) matrices.

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
def _chunk_decay(dt_ptr, dt_bias_ptr, A_ptr, row0, hi, t, L, H, HAS_BIAS: tl.constexpr):
    """For the tokens t (a chunk, Q positions) of one (batch, head): the raw dt (+ dt_bias), the
    discretised dt = softplus(raw) and cs = the cumulative sum of dt*A inside the chunk, in fp32.
    Tokens past the end get dt = 0: no input and decay exp(0) = 1."""
    ok = t < L
    raw = tl.load(dt_ptr + (row0 + t) * H + hi, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(dt_bias_ptr + hi).to(tl.float32)
    soft = tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw)))    # softplus, no overflow
    dt = tl.where(ok, tl.where(raw > 20.0, raw, soft), 0.0)             # torch's threshold 20
    cs = tl.cumsum(dt * tl.load(A_ptr + hi).to(tl.float32), axis=0)    # <= 0, non-increasing
    return raw, dt, cs


@triton.jit
def _last(v, Q: tl.constexpr):
    """v[Q-1] of a (Q,) vector (the chunk's total log-decay when v = cs)."""
    return tl.sum(tl.where(tl.arange(0, Q) == Q - 1, v, 0.0), axis=0)


@triton.jit
def _state_kernel(u_ptr, v_ptr, dt_ptr, dt_bias_ptr, A_ptr, s_ptr, seg_ptr,
                  L, H, P, N, nseg, G,
                  Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                  REVERSE: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr):
    """What one segment of G chunks contributes to the state, for a (BP, N) tile of it.
    Forward (u = x, v = B):  S = sum_t exp(cs_end - cs_t) dt_t x_t B_t^T, chunks in order.
    Reverse (u = dy, v = C): dS = sum_t exp(cs_t) dy_t C_t^T, chunks from the last: the
    gradient, w.r.t. the state entering the segment, of the outputs inside it.
    Both are one (BP, Q) @ (Q, N) tensor-core product per chunk. Also writes the segment's
    total log-decay (sum of dt*A) for _pass_kernel. TMA: u_ptr, v_ptr are tensor descriptors
    over (b, l, h*P) and (b, l, h*N) (see _tma_views), else plain pointers."""
    g, bh, pt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // H, bh % H
    q = tl.arange(0, Q)
    p = pt * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    acc = tl.zeros((BN, BP), dtype=tl.float32)                         # S^T: see _scan_kernel
    logdecay = 0.0
    for i in range(G):
        if REVERSE:
            k = g * G + G - 1 - i
        else:
            k = g * G + i
        t = k * Q + q
        _, dt, cs = _chunk_decay(dt_ptr, dt_bias_ptr, A_ptr, bi * L, hi, t, L, H, HAS_BIAS)
        total = _last(cs, Q)
        if TMA:
            u = u_ptr.load([bi, k * Q, hi * P + pt * BP]).reshape(Q, BP)
            v = v_ptr.load([bi, k * Q, hi * N]).reshape(Q, BN)
        else:
            rows = (bi * L + t).to(tl.int64) * H + hi                   # (Q,) token-head rows
            u = tl.load(u_ptr + rows[:, None] * P + p[None, :],
                        mask=(t < L)[:, None] & (p < P)[None, :], other=0.0)   # (Q, BP)
            v = tl.load(v_ptr + rows[:, None] * N + n[None, :],
                        mask=(t < L)[:, None] & (n < N)[None, :], other=0.0)   # (Q, BN)
        if REVERSE:
            w = tl.exp(tl.minimum(cs, 0.0))                             # decay start -> t
        else:
            w = dt * tl.exp(tl.minimum(total - cs, 0.0))                # dt * decay t -> end
        uw = (u.to(tl.float32) * w[:, None]).to(v.dtype)
        acc = acc * tl.exp(total) + tl.dot(tl.trans(v), uw)             # (BN, BP)
        logdecay += total
    bhs = (bi * nseg + g) * H + hi
    tl.store(s_ptr + (bhs * P + p)[None, :].to(tl.int64) * N + n[:, None], acc,
             mask=(p < P)[None, :] & (n < N)[:, None])
    if pt == 0:
        tl.store(seg_ptr + bh * nseg + g, logdecay)


@triton.jit
def _pass_kernel(s_ptr, seg_ptr, init_ptr, final_ptr, H, PN, nseg, nsteps,
                 BLOCK: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
                 STORE_FINAL: tl.constexpr):
    """State passing over segments, in place: s_ptr holds (b, nseg, h, P*N) per-segment
    contributions on entry and the state entering each segment on exit (for REVERSE: the state
    gradient at each segment's end). Sequential over segments, elementwise, so a program owns a
    flat BLOCK of the P*N entries: many programs, each a short chain of load-fma-store.
    The first nsteps segments have a contribution: all nseg in the backward (STORE_FINAL), all
    but the last in the forward (the scan kernel writes the final state itself)."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // H, bh % H
    e = blk * BLOCK + tl.arange(0, BLOCK)
    ok = e < PN
    if HAS_INIT:
        s = tl.load(init_ptr + bh.to(tl.int64) * PN + e, mask=ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    step = -1 if REVERSE else 1
    g = nseg - 1 if REVERSE else 0
    base = (bi * nseg * H + hi).to(tl.int64) * PN + e                  # segment 0 of this (b, h)
    contrib = tl.load(s_ptr + base + g * H * PN, mask=ok, other=0.0)
    for i in range(nsteps):
        # load the next segment's contribution before this one's store: one load in flight
        # while the chain load -> fma -> store runs (the chain itself cannot be parallel)
        nxt = tl.load(s_ptr + base + (g + step) * H * PN, mask=ok & (e * 0 + i + 1 < nsteps), other=0.0)
        decay = tl.exp(tl.load(seg_ptr + bh * nseg + g))
        tl.store(s_ptr + base + g * H * PN, s, mask=ok)
        s = decay * s + contrib
        contrib = nxt
        g += step
    if STORE_FINAL:
        tl.store(final_ptr + bh.to(tl.int64) * PN + e, s, mask=ok)
    else:                                                               # entering the last segment
        tl.store(s_ptr + base + g * H * PN, s, mask=ok)


@triton.jit
def _scan_kernel(x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, y_ptr, s_ptr, final_ptr,
                 L, H, P, N, nseg, G,
                 Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, TMA: tl.constexpr):
    """The forward outputs of one segment for a (Q, BP) slice of y per chunk, starting from the
    state entering the segment (s_ptr, (b, nseg, h, P, N)) and carrying the (BP, N) state in
    registers through G chunks. Per chunk, four tensor-core products:
        C B^T (Q, Q) -> masked with the decay -> @ x (Q, BP)       intra-chunk (step 1)
        C @ S^T (Q, BP), rows scaled by the decay from the start    state -> output (step 4)
        B^T @ (x dt decay-to-end) (N, BP)                          chunk state (step 2)
    Tiles (FWD_CONFIG, measured on the H100 in docs/kernel_log.md): Q = BP = 64 and 4 warps, so
    one warpgroup holds the (N, BP) fp32 state (64 registers a thread), y and the (Q, Q) scores
    (32 each) and two programs fit an SM. C B^T is recomputed for each of the P / BP p-tiles:
    (Q, Q, N) is the smallest of the four products, cheaper than a second pass over C and B.
    TMA: x_ptr, B_ptr, C_ptr, y_ptr are tensor descriptors (see _tma_views)."""
    g, bh, pt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // H, bh % H
    q = tl.arange(0, Q)
    p = pt * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    np_mask = (n < N)[:, None] & (p < P)[None, :]
    if HAS_STATE:                                                       # S^T, (BN, BP): both products
        bhs = (bi * nseg + g) * H + hi                                  # with it then need no
        ST = tl.load(s_ptr + (bhs * P + p)[None, :].to(tl.int64) * N + n[:, None],  # transpose
                     mask=np_mask, other=0.0)                           # of a register tile
    else:
        ST = tl.zeros((BN, BP), dtype=tl.float32)
    causal = q[:, None] >= q[None, :]
    for i in range(G):
        t0 = (g * G + i) * Q
        t = t0 + q
        tm = t < L
        _, dt, cs = _chunk_decay(dt_ptr, dt_bias_ptr, A_ptr, bi * L, hi, t, L, H, HAS_BIAS)
        total = _last(cs, Q)
        if TMA:                                                         # rows past L read as 0
            x = x_ptr.load([bi, t0, hi * P + pt * BP]).reshape(Q, BP)
            Bm = B_ptr.load([bi, t0, hi * N]).reshape(Q, BN)
            Cm = C_ptr.load([bi, t0, hi * N]).reshape(Q, BN)
        else:
            rows = (bi * L + t).to(tl.int64) * H + hi
            x = tl.load(x_ptr + rows[:, None] * P + p[None, :], mask=tm[:, None] & (p < P)[None, :], other=0.0)
            Bm = tl.load(B_ptr + rows[:, None] * N + n[None, :], mask=tm[:, None] & (n < N)[None, :], other=0.0)
            Cm = tl.load(C_ptr + rows[:, None] * N + n[None, :], mask=tm[:, None] & (n < N)[None, :], other=0.0)
        cb = tl.dot(Cm, tl.trans(Bm))                                   # (Q, Q): C_t . B_s
        decay = tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0))     # exp(cs_t - cs_s) <= 1
        scores = tl.where(causal, cb * decay * dt[None, :], 0.0)
        # state -> output: scale the (Q, BP) product's rows by the decay from the chunk start
        # rather than C's (Q, N) rows: fewer multiplies, and C goes to the tensor cores as loaded
        y = tl.dot(Cm, ST.to(Cm.dtype)) * tl.exp(tl.minimum(cs, 0.0))[:, None]
        y = tl.dot(scores.to(x.dtype), x, y)                            # + intra-chunk
        if TMA:                                                         # rows past L dropped
            y_ptr.store([bi, t0, hi * P + pt * BP], y.to(y_ptr.dtype).reshape(1, Q, BP))
        else:
            tl.store(y_ptr + rows[:, None] * P + p[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=tm[:, None] & (p < P)[None, :])
        xw = (x.to(tl.float32) * (dt * tl.exp(tl.minimum(total - cs, 0.0)))[:, None]).to(Bm.dtype)
        ST = ST * tl.exp(total) + tl.dot(tl.trans(Bm), xw)              # (BN, BP) state at chunk end
    if g == nseg - 1:
        tl.store(final_ptr + (bh * P + p)[None, :].to(tl.int64) * N + n[:, None], ST, mask=np_mask)


@triton.jit
def _scan_bwd_kernel(x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, s_ptr, ds_ptr,
                     dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr,
                     L, H, P, N, nchunks,
                     Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr):
    """All gradients of one chunk of one (batch, head), given S = the state entering the chunk
    and dS = the gradient of the state leaving it (both (P, N), fp32, from _pass_kernel).
    With xdt = dt x, M = (C B^T) * decay (causal), W = (dy xdt^T) * decay:
        dxdt = M^T dy + e_out * B dS^T          dC = W B + e_in * dy S
        dB   = W^T C + e_out * xdt dS           (e_in = exp(cs_t), e_out = exp(cs_end - cs_t))
    The log-decays cs get d(cs_t) = <dy_t, y_t> - <xdt_t, dxdt_t> (+ <dS, S_end> at the chunk's
    last token); dA_t is the reverse cumsum of that inside the chunk. It is summed here from
    terms that do not cancel: the pairs (t, s) inside the chunk (row minus column sums of
    W * C B^T), the state->output term, and the state terms as an exclusive cumsum.
    One program holds the whole (Q, P) and (Q, N) tiles: dB and dC sum over all of P."""
    k, bh = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // H, bh % H
    q = tl.arange(0, Q)
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    t = k * Q + q
    tm = t < L
    rows = (bi * L + t).to(tl.int64) * H + hi
    qp_mask = tm[:, None] & (p < P)[None, :]
    qn_mask = tm[:, None] & (n < N)[None, :]
    raw, dt, cs = _chunk_decay(dt_ptr, dt_bias_ptr, A_ptr, bi * L, hi, t, L, H, HAS_BIAS)
    total = _last(cs, Q)
    x = tl.load(x_ptr + rows[:, None] * P + p[None, :], mask=qp_mask, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * P + p[None, :], mask=qp_mask, other=0.0).to(x.dtype)
    Bm = tl.load(B_ptr + rows[:, None] * N + n[None, :], mask=qn_mask, other=0.0)
    Cm = tl.load(C_ptr + rows[:, None] * N + n[None, :], mask=qn_mask, other=0.0)
    st = ((bi * nchunks + k) * H + hi).to(tl.int64) * P
    pn = (st + p)[:, None] * N + n[None, :]
    pn_mask = (p < P)[:, None] & (n < N)[None, :]
    S = tl.load(s_ptr + pn, mask=pn_mask, other=0.0)                    # (P, N) entering
    dS = tl.load(ds_ptr + pn, mask=pn_mask, other=0.0)                  # (P, N) grad leaving
    e_in = tl.exp(tl.minimum(cs, 0.0))
    e_out = tl.exp(tl.minimum(total - cs, 0.0))
    decay = tl.where(q[:, None] >= q[None, :], tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    xdt = x.to(tl.float32) * dt[:, None]
    xdt_lo = xdt.to(x.dtype)

    cb = tl.dot(Cm, tl.trans(Bm))                                       # (Q, Q): C_t . B_s
    W = tl.dot(dy, tl.trans(xdt_lo)) * decay                            # (Q, Q): dy_t . xdt_s, decayed
    WC = tl.where(q[:, None] > q[None, :], W * cb, 0.0)                 # s < t: the diagonal
    dA_pairs = tl.sum(WC, axis=1) - tl.sum(WC, axis=0)                  # cancels, leave it out

    dC_state = tl.dot(dy, S.to(x.dtype)) * e_in[:, None]                # (Q, N)
    dC = tl.dot(W.to(Cm.dtype), Bm, dC_state)
    tl.store(dC_ptr + rows[:, None] * N + n[None, :], dC.to(dC_ptr.dtype.element_ty), mask=qn_mask)
    dB = tl.dot(xdt_lo, dS.to(x.dtype)) * e_out[:, None]
    dB = tl.dot(tl.trans(W).to(Cm.dtype), Cm, dB)
    tl.store(dB_ptr + rows[:, None] * N + n[None, :], dB.to(dB_ptr.dtype.element_ty), mask=qn_mask)
    dxdt_state = tl.dot(Bm, tl.trans(dS).to(Bm.dtype)) * e_out[:, None] # (Q, P)
    dxdt = tl.dot(tl.trans(cb * decay).to(x.dtype), dy, dxdt_state)
    tl.store(dx_ptr + rows[:, None] * P + p[None, :], (dxdt * dt[:, None]).to(dx_ptr.dtype.element_ty),
             mask=qp_mask)

    z = dA_pairs + tl.sum(Cm.to(tl.float32) * dC_state, axis=1)        # pairs + <dy_t, y_state_t>
    u = tl.sum(xdt * dxdt_state, axis=1)                                # <xdt_t, dxdt_state_t>
    ddA = tl.cumsum(z, axis=0, reverse=True) + (tl.cumsum(u, axis=0) - u) \
        + tl.exp(total) * tl.sum(tl.sum(dS * S, axis=1), axis=0)
    A = tl.load(A_ptr + hi).to(tl.float32)
    ddt = tl.sum(x.to(tl.float32) * dxdt, axis=1) + A * ddA
    draw = ddt / (1.0 + tl.exp(-raw))                                   # softplus' = sigmoid
    tl.store(ddt_ptr + rows, draw, mask=tm)
    tl.store(dA_ptr + bh * nchunks + k, tl.sum(tl.where(tm, dt * ddA, 0.0), axis=0))


@triton.jit
def _step_kernel(s_ptr, out_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, y_ptr,
                 H, P, N, BP: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, REP: tl.constexpr):
    """One decoding token for a (BP, N) tile of one (batch, head) state: read it once, decay,
    add dt x B^T, write it back (out_ptr may be s_ptr: in place) and read out y = S C.
    Pure bandwidth (64 KiB of fp32 state per head); the point is one launch per layer.
    REP > 1: x and B hold one head per REP heads (grouped heads, fused_decode.py)."""
    bh, pt = tl.program_id(0), tl.program_id(1)
    hi, g = bh % H, bh // REP
    p = pt * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    m = (p < P)[:, None] & (n < N)[None, :]
    raw = tl.load(dt_ptr + bh).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(dt_bias_ptr + hi).to(tl.float32)
    dt = tl.where(raw > 20.0, raw, tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw))))
    decay = tl.exp(tl.minimum(dt * tl.load(A_ptr + hi).to(tl.float32), 0.0))
    x = tl.load(x_ptr + g * P + p, mask=p < P, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + g * N + n, mask=n < N, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bh * N + n, mask=n < N, other=0.0).to(tl.float32)
    offs = (bh * P + p)[:, None].to(tl.int64) * N + n[None, :]
    S = tl.load(s_ptr + offs, mask=m, other=0.0) * decay + (dt * x)[:, None] * Bv[None, :]
    tl.store(out_ptr + offs, S, mask=m)
    tl.store(y_ptr + bh * P + p, tl.sum(S * Cv[None, :], axis=1).to(y_ptr.dtype.element_ty), mask=p < P)


# -----------------------------------------------------------------------------
# 4. launching the kernels, and the autograd Function around them

# Launch settings, fixed from the sweeps in docs/kernel_log.md instead of an autotuner. BP is
# capped at next_pow2(P), so the CPU interpreter tests (P = 16) run 16-wide tiles.
# Forward: chunks of 64 tokens (or chunk_size if smaller), p-tiles of 64, two programs per SM.
FWD_CONFIG = dict(Q=64, BP=64, num_warps=4, num_stages=2, programs_per_sm=2)
STATES_CONFIG = dict(BP=128, num_warps=8, num_stages=2)   # _chunk_states (backward, G = 1)
BWD_CONFIG = dict(num_warps=8, num_stages=1)             # _scan_bwd_kernel (whole P, N)
PASS_BLOCK = 512                                          # state entries per _pass_kernel program
SEGMENT_CHUNKS = None                                     # G; None: _pick_segment decides


def _pick_segment(b, h, nchunks, p_tiles, device):
    """G, the chunks per forward segment: as long as possible (fewer states through memory)
    while the scan still has about FWD_CONFIG["programs_per_sm"] programs per streaming
    multiprocessor (two fit: 4 warps, 255 registers each). Measured on the H100
    (docs/kernel_log.md): nseg = round(2 SMs / (b*h*p_tiles)), G = 32, 64, 128 chunks of 64
    at 8x2048, 4x8192, 1x65536."""
    if SEGMENT_CHUNKS is not None:
        return min(SEGMENT_CHUNKS, nchunks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    nseg = max(1, round(FWD_CONFIG["programs_per_sm"] * sms / (b * h * p_tiles)))
    return triton.cdiv(nchunks, nseg)


def _pow2(v):
    return max(16, triton.next_power_of_2(v))


def _tma_views(tensors, blocks):
    """TMA tensor descriptors for (b, l, h, d) tensors viewed as (b, l, h*d), with (1, Q, block)
    tiles; None where TMA does not apply: a block that would straddle two heads (d not a
    multiple of it), strides or a base off 16 bytes, or no TensorDescriptor in this triton."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    views = []
    for t, (Q, blk) in zip(tensors, blocks):
        b, l, h, d = t.shape
        if d % blk or (h * d * t.element_size()) % 16 or t.data_ptr() % 16:
            return None
        views.append(TensorDescriptor(t, [b, l, h * d], [l * h * d, h * d, 1], [1, Q, blk]))
    return views


def _ssd_fwd_triton(x, dt, A, B, C, dt_bias, initial_state, chunk_size):
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = min(chunk_size, FWD_CONFIG["Q"])                                # the forward's own chunk
    BP, BN = min(FWD_CONFIG["BP"], _pow2(p)), _pow2(n)
    warps, stages = FWD_CONFIG["num_warps"], FWD_CONFIG["num_stages"]
    nchunks, p_tiles = triton.cdiv(l, Q), triton.cdiv(p, BP)
    G = _pick_segment(b, h, nchunks, p_tiles, x.device)
    nseg = triton.cdiv(nchunks, G)
    # the state kernel takes two chunks per step where a segment has an even number of them
    # (half the serial steps, (N, 2Q) @ (2Q, BP) products); fp32 tiles of 128 tokens would not
    # fit its shared memory
    QS = 2 * Q if G % 2 == 0 and x.element_size() <= 2 else Q
    y = torch.empty_like(x)
    final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    bias = dt_bias if dt_bias is not None else A                        # any pointer; unused
    has_state = initial_state is not None or nseg > 1
    states = initial_state if initial_state is not None else final      # any pointer when unused
    if nseg > 1:                                                        # steps 2 and 3 per segment
        states = torch.empty(b, nseg, h, p, n, device=x.device, dtype=torch.float32)
        segdecay = torch.empty(b, h, nseg, device=x.device, dtype=torch.float32)
        views = _tma_views((x, B), ((QS, BP), (QS, BN)))
        _state_kernel[(nseg - 1, b * h, p_tiles)](                      # not the last segment
            *(views or (x, B)), dt, bias, A, states, segdecay, l, h, p, n, nseg, G * Q // QS,
            Q=QS, BP=BP, BN=BN, REVERSE=False, HAS_BIAS=dt_bias is not None, TMA=views is not None,
            num_warps=warps, num_stages=stages)
        _pass_kernel[(b * h, triton.cdiv(p * n, PASS_BLOCK))](
            states, segdecay, initial_state if initial_state is not None else final, final,
            h, p * n, nseg, nseg - 1, BLOCK=PASS_BLOCK, REVERSE=False,
            HAS_INIT=initial_state is not None, STORE_FINAL=False)
    views = _tma_views((x, B, C, y), ((Q, BP), (Q, BN), (Q, BN), (Q, BP)))
    xv, Bv, Cv, yv = views or (x, B, C, y)
    _scan_kernel[(nseg, b * h, p_tiles)](
        xv, dt, bias, A, Bv, Cv, yv, states, final, l, h, p, n, nseg, G, Q=Q, BP=BP, BN=BN,
        HAS_BIAS=dt_bias is not None, HAS_STATE=has_state, TMA=views is not None,
        num_warps=warps, num_stages=stages)
    return y, final


def _chunk_states(u, v, dt, A, dt_bias, init, Q, reverse):
    """Per-chunk states (G = 1): the state entering each chunk (forward, u = x, v = B) or the
    state gradient leaving each chunk (reverse, u = dy, v = C, init = dfinal). Also returns
    what the pass leaves at its far end: the final state, or the initial state's gradient."""
    b, l, h, p = u.shape
    n = v.shape[-1]
    BP, BN = min(STATES_CONFIG["BP"], _pow2(p)), _pow2(n)
    c = triton.cdiv(l, Q)
    states = torch.empty(b, c, h, p, n, device=u.device, dtype=torch.float32)
    segdecay = torch.empty(b, h, c, device=u.device, dtype=torch.float32)
    end = torch.empty(b, h, p, n, device=u.device, dtype=torch.float32)
    bias = dt_bias if dt_bias is not None else A
    _state_kernel[(c, b * h, triton.cdiv(p, BP))](
        u, v, dt, bias, A, states, segdecay, l, h, p, n, c, 1, Q=Q, BP=BP, BN=BN,
        REVERSE=reverse, HAS_BIAS=dt_bias is not None, TMA=False,
        num_warps=STATES_CONFIG["num_warps"], num_stages=STATES_CONFIG["num_stages"])
    _pass_kernel[(b * h, triton.cdiv(p * n, PASS_BLOCK))](
        states, segdecay, init if init is not None else end, end, h, p * n, c, c,
        BLOCK=PASS_BLOCK, REVERSE=reverse, HAS_INIT=init is not None, STORE_FINAL=True)
    return states, end


def _ssd_bwd_triton(dy, dfinal, x, dt, A, B, C, dt_bias, initial_state, Q):
    b, l, h, p = x.shape
    n = B.shape[-1]
    c = triton.cdiv(l, Q)
    S, _ = _chunk_states(x, B, dt, A, dt_bias, initial_state, Q, reverse=False)
    dS, dinit = _chunk_states(dy, C, dt, A, dt_bias, dfinal, Q, reverse=True)
    dx, dB, dC = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
    ddt = torch.empty(b, l, h, device=x.device, dtype=torch.float32)
    dA = torch.empty(b, h, c, device=x.device, dtype=torch.float32)
    _scan_bwd_kernel[(c, b * h)](
        x, dt, dt_bias if dt_bias is not None else A, A, B, C, dy, S, dS, dx, ddt, dB, dC, dA,
        l, h, p, n, c, Q=Q, BP=_pow2(p), BN=_pow2(n), HAS_BIAS=dt_bias is not None,
        **BWD_CONFIG)
    return dx, ddt, dA.sum((0, 2)), dB, dC, ddt.sum((0, 1)), dinit


def _ssd_bwd_torch(ctx, dy, dfinal):
    """fp32 inputs on the GPU: _scan_bwd_kernel holds whole (P, N) fp32 matrices as tensor-core
    operands, 480 KiB of shared memory at P = N = 128 (an H100 has 227). Until the kernel is
    tiled over N for fp32, those gradients come from autograd through ssd_chunked (recomputed).
    The CPU interpreter tests still check the Triton backward in fp32 at small sizes."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in saved]
        y, final = ssd_chunked(*leaves[:5], leaves[5], leaves[6], ctx.chunk_size)
        outs = [(y, dy), (final, dfinal)]
        outs = [(o, g) for o, g in outs if g is not None]
        need = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad([o for o, _ in outs], need, [g for _, g in outs], allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in leaves) + (None,)


class _SSDTriton(torch.autograd.Function):
    """ssd with the Triton kernels; the backward recomputes the chunk states from the inputs."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, dt_bias, initial_state, chunk_size):
        x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
        init = initial_state.float().contiguous() if initial_state is not None else None
        y, final = _ssd_fwd_triton(x, dt, A.float(), B, C,
                                   dt_bias.float() if dt_bias is not None else None, init, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, dt_bias, initial_state)
        ctx.chunk_size = chunk_size
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, dt_bias, initial_state = ctx.saved_tensors
        if x.dtype == torch.float32 and x.is_cuda:
            return _ssd_bwd_torch(ctx, dy, dfinal)
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        init = initial_state.float().contiguous() if initial_state is not None else None
        dfinal = dfinal.float().contiguous() if dfinal is not None else None
        dx, ddt, dA, dB, dC, dbias, dinit = _ssd_bwd_triton(
            dy, dfinal, x, dt, A.float(), B, C, dt_bias.float() if dt_bias is not None else None,
            init, ctx.chunk_size)
        return (dx, ddt.to(dt.dtype), dA.to(A.dtype), dB, dC,
                dbias.to(dt_bias.dtype) if dt_bias is not None else None,
                dinit.to(initial_state.dtype) if initial_state is not None else None, None)


def ssd_triton(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128):
    """The Triton backend of ssd (fp16, bf16 or fp32 inputs; chunk_size a power of two >= 16)."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package: pip install triton, "
                           "or use backend='torch'")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton scan needs chunk_size a power of two >= 16, got {chunk_size}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton scan takes fp16, bf16 or fp32 inputs, got {x.dtype}: "
                         "use backend='torch' for float64")
    if x.dtype == torch.float32 and x.is_cuda:
        # fp32 tiles are twice the bytes of bf16 ones and the (128, 128) tiles of the backward
        # no longer fit in shared memory: run chunks of 64. The chunk size is a schedule, not
        # part of the function: any chunk size gives the same y and final state.
        chunk_size = min(chunk_size, 64)
    return _SSDTriton.apply(x, dt, A, B, C, dt_bias, initial_state, chunk_size)


def ssd_step_triton(state, x, dt, A, B, C, dt_bias=None, inplace=False):
    """One fused decode step: one launch, state read and written once (in place if asked)."""
    b, h, p = x.shape
    n = B.shape[-1]
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    direct = inplace and state.dtype == torch.float32 and state.is_contiguous()
    src = state if state.dtype == torch.float32 and state.is_contiguous() else state.float().contiguous()
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
# 5. the public entry points


def _use_triton(backend, x):
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown scan backend {backend!r}: use 'auto', 'torch' or 'triton'")
    if backend == "auto":
        return HAS_TRITON and x.is_cuda and x.dtype != torch.float64
    return backend == "triton"


def ssd(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128, backend="auto"):
    """The SSD scan. Returns (y in x's dtype, final_state in float32, float64 for float64 x).
    backend: "torch" (the chunked PyTorch code above, any device, differentiable),
    "triton" (the kernels above, CUDA or TRITON_INTERPRET=1), "auto" (triton on CUDA)."""
    b, l, h, p = x.shape
    if dt.shape != (b, l, h) or B.shape[:3] != (b, l, h) or C.shape != B.shape or A.shape != (h,):
        raise ValueError(f"ssd shapes do not match: x {tuple(x.shape)} dt {tuple(dt.shape)} "
                         f"A {tuple(A.shape)} B {tuple(B.shape)} C {tuple(C.shape)}; "
                         "expected x (b,l,h,p), dt (b,l,h), A (h,), B and C (b,l,h,n)")
    if _use_triton(backend, x):
        return ssd_triton(x, dt, A, B, C, dt_bias, initial_state, chunk_size)
    y, final = ssd_chunked(x, dt, A, B, C, dt_bias, initial_state, chunk_size)
    return y.to(x.dtype), final


def ssd_step(state, x, dt, A, B, C, dt_bias=None, inplace=False, backend="auto"):
    """One decoding step (shapes as ssd_step_reference). inplace=True writes the new state
    into `state` and returns it: decoding captured in a CUDA graph needs fixed addresses."""
    if _use_triton(backend, x):
        return ssd_step_triton(state, x, dt, A, B, C, dt_bias, inplace)
    y, new_state = ssd_step_reference(state, x, dt, A, B, C, dt_bias)
    if inplace:
        state.copy_(new_state)
        new_state = state
    return y, new_state


# -----------------------------------------------------------------------------
# 6. validation and benchmark (python scan_kernel.py; tests/test_scan_triton.py holds the tests)

# ANCHORS.md: H100 80GB HBM3, ms, medians of do_bench, bf16 inputs, h=16, p=n=128, chunk 128.
ANCHOR_MS = {  # (batch, length): (mamba_ssm fwd, mamba_ssm fwd+bwd, fla simple-GLA fwd)
    (8, 2048): (0.435, 4.19, 0.684),
    (4, 8192): (0.970, 5.13, 0.557),
    (1, 65536): (1.956, 10.67, 1.833),
}
COPY_BW = 3.02e12   # bytes/s, device-to-device copy (read + write) measured on that H100


def _random_inputs(b, l, h, p, n, dtype, device, requires_grad=False):
    """mmMamba-like draws: dt0 log-uniform in [1e-3, 1e-1] (PAPER.md section 3), A = -e^a,
    a in [0, 1], raw dt around 0 so softplus(dt + dt_bias) spreads around dt0."""
    dt0 = torch.exp(torch.empty(h, device=device).uniform_(math.log(1e-3), math.log(1e-1)))
    ins = dict(x=torch.randn(b, l, h, p, device=device, dtype=dtype),
               dt=torch.randn(b, l, h, device=device, dtype=dtype),
               A=-torch.exp(torch.rand(h, device=device)),
               B=torch.randn(b, l, h, n, device=device, dtype=dtype),
               C=torch.randn(b, l, h, n, device=device, dtype=dtype) / math.sqrt(n),
               dt_bias=dt0 + torch.log(-torch.expm1(-dt0)))          # softplus^-1(dt0)
    for t in ins.values():
        t.requires_grad_(requires_grad)
    return ins


def _rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def validate(b=2, l=2048 + 77, h=16, p=128, n=128, dtype=torch.bfloat16):
    """Triton vs the float64 chunked reference on one mmMamba-shaped draw; returns rel errors."""
    ins = _random_inputs(b, l, h, p, n, dtype, "cuda", requires_grad=True)
    S0 = torch.randn(b, h, p, n, device="cuda", requires_grad=True)
    y, f = ssd(**ins, initial_state=S0, backend="triton")
    ref = {k: v.detach().double().requires_grad_() for k, v in ins.items()}
    S0r = S0.detach().double().requires_grad_()
    yr, fr = ssd_chunked(**ref, initial_state=S0r)
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    grads = torch.autograd.grad((y.double() * gy).sum() + (f.double() * gf).sum(), [*ins.values(), S0])
    grads_r = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), [*ref.values(), S0r])
    err = {"y": _rel(y, yr), "final": _rel(f, fr)}
    err.update({"d" + k: _rel(g, gr) for k, g, gr in zip([*ins, "S0"], grads, grads_r)})
    return err


def benchmark():
    """Forward and forward+backward at the ANCHORS.md shapes, against the floor and anchors."""
    if not (HAS_TRITON and torch.cuda.is_available()):
        print("scan_kernel.benchmark needs a CUDA GPU and triton; nothing to time here")
        return
    from triton.testing import do_bench
    print(f"device: {torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}")
    err = validate()
    print("bf16 vs float64 reference (rel. error): " + " ".join(f"{k} {v:.1e}" for k, v in err.items()))
    assert all(v < 2e-2 for v in err.values()), f"Triton scan disagrees with the reference: {err}"
    h, p, n = 16, 128, 128
    print(f"h={h} p=n={p} chunk 128, bf16 x/dt/B/C, fp32 A and dt_bias; every input > 50 MB L2, "
          "so no rotation; floor = bytes / 3.02 TB/s (fwd: read x,dt,B,C + write y; fwd+bwd "
          "adds read x,dt,B,C,dy + write dx,ddt,dB,dC)")
    head = (f"{'b x l':>10} | {'fwd ms':>7} {'TB/s':>5} {'floor':>6} {'/mamba':>6} {'/fla':>5} | "
            f"{'fwd+bwd':>7} {'floor':>6} {'/mamba':>6} | {'torch fwd':>9}")
    print(head)
    print("-" * len(head))
    for (b, l), (m_f, m_fb, fla_f) in ANCHOR_MS.items():
        ins = _random_inputs(b, l, h, p, n, torch.bfloat16, "cuda", requires_grad=True)
        dy = torch.randn_like(ins["x"])
        tok = b * l * h * 2                                             # bf16 bytes per element-row
        fwd_bytes = tok * (2 * p + 2 * n + 1)
        bwd_bytes = tok * (3 * p + 4 * n + 2)
        with torch.no_grad():
            t_f = do_bench(lambda: ssd(**ins, backend="triton"), return_mode="median")

        def fwd_bwd():
            y, _ = ssd(**ins, backend="triton")
            y.backward(dy)
        t_fb = do_bench(fwd_bwd, grad_to_none=list(ins.values()), return_mode="median")
        t_torch = "-"
        if b * l <= 16384:                                              # PyTorch path: memory-hungry
            with torch.no_grad():
                t_torch = f"{do_bench(lambda: ssd(**ins, backend='torch'), return_mode='median'):.2f}"
        print(f"{b:>3} x {l:<5} | {t_f:7.3f} {fwd_bytes / t_f / 1e9:5.2f} {fwd_bytes / COPY_BW * 1e3:6.3f} "
              f"{t_f / m_f:6.2f} {t_f / fla_f:5.2f} | {t_fb:7.3f} "
              f"{(fwd_bytes + bwd_bytes) / COPY_BW * 1e3:6.3f} {t_fb / m_fb:6.2f} | {t_torch:>9}")
        del ins, dy
        torch.cuda.empty_cache()


if __name__ == "__main__":
    benchmark()
