"""
The fast Triton kernels of the SSD scan, forward and backward, behind scan_kernel.ssd(...,
backend="triton") (and backend="auto" on CUDA). scan_kernel.py is the lesson: the references,
the chunked algorithm in PyTorch and a simple Triton kernel of it; this file computes the same
function faster, and is checked against those references by tests/test_scan_triton.py.

    python scan_fast.py                  # validate on the GPU, then benchmark (markdown tables)
    python scan_fast.py --peers .peers   # ... beside mamba_ssm and fla, where importable
    python scan_fast.py --probe          # registers, spills and shared memory of each kernel

The peers autotune hundreds of configurations on their first calls: a whole run takes
minutes. `--part times|first-call` and `--only fast,simple,mamba_ssm,fla,torch` split it.

docs/kernel_log.md is the version history: every version tried, its idea, the predicted and
the measured time, and whether it was kept. Shapes and names follow scan_kernel.py's glossary
(arXiv 2405.21060 Sec. 6; docs/method.md §3).
"""
import argparse
import importlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.nn.functional as F

import scan_kernel
from scan_kernel import HAS_TRITON, _pow2, check_triton_inputs, ssd, ssd_chunked, tl, triton
from util import ArgumentParser, InputError, run_cli

# -----------------------------------------------------------------------------
# the kernels
#
# The forward splits the sequence into segments of G chunks (G * Q tokens):
#   _state_kernel  one program per (segment, batch*head, p-tile): the state the segment alone
#                  leaves at its end, built chunk by chunk (docs/method.md §3, step 2). Run for
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
# The forward runs chunks of at most 64 whatever chunk_size says (the chunk is a schedule, not
# part of the function: any chunk gives the same y and final state; the backward takes at most
# 64, BWD_CHUNK) and p-tiles of 64 (docs/kernel_log.md, v4): the scan is bound by the latency
# of one long chain per program (loads, four small products, exps, state update), not by bytes
# or tensor-core rate, and with (64, 64) tiles one warpgroup fits in 255 registers: two
# programs share an SM and hide each other's waits. Tiles move through TMA tensor descriptors
# over (b, l, h*P) views (one bulk copy per tile; rows past the end read as zeros, are not
# written back): ~10% faster.
#
# The backward (chunk-parallel) needs the state entering every chunk and the gradient of the
# state leaving it, in the inputs' dtype (they enter bf16 products; the sums stay fp32). The
# forward stores the first as it passes (sb_ptr); _states_kernel computes the second, one program
# per (segment, batch*head, tile of the state) walking the chunks backwards in time with dy and
# C in place of x and B (segments, as the forward's, only where the programs would be too few;
# v8). Then two kernels (docs/kernel_log.md, v6-v9) form every gradient of one chunk:
#   _bwd_grad_kernel one program per (chunk and result tile, batch*head), the chunk's programs
#                  adjacent (they run together, the later ones' loads hit L2), each running
#     _bwd_bc      a tile of dC or dB, from W = dy xdt^T (decayed) and one state; and the pairs'
#                  share of dA
#     _bwd_dx      a tile of dx, from M = C B^T (decayed) and dS; its tile's shares of dA
#   _bwd_dt_kernel one program per (chunk, batch*head): sums the shares into ddt and dA
# No program holds more than one (Q, Q) matrix, one state and one result: the single kernel of
# v5 held all of them and spilled (the backward is 37% faster split). Chunks of 64 with 4 warps
# (v10): two programs share an SM, one's products hiding the other's loads (21% faster than
# one program of 8 warps on chunks of 128, for twice the states through memory).

# The forward's decays as powers of two, exp(x) = 2^(LOG2E x): the decay matrix masks in the
# exponent (2^-inf = 0), and LOG2E scales the (Q,) sums once, not each (Q, Q) entry (v20, v22)
LOG2E = tl.constexpr(1.4426950408889634)


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
def _decay_kernel(dt_ptr, dt_bias_ptr, A_ptr, dc_ptr, L, H, Q: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """_chunk_decay's dt and cs of chunk k of one (batch, head), to dc_ptr's (b*h, chunks, 2, Q)
    fp32 (v14): the scan and the backward's chunks load them instead of each running the
    softplus -> cumsum chain (a scan and a sum across the program's threads) on its own."""
    k, bh = tl.program_id(0), tl.program_id(1)
    t = k * Q + tl.arange(0, Q)
    _, dt, cs = _chunk_decay(dt_ptr, dt_bias_ptr, A_ptr, bh // H * L, bh % H, t, L, H, HAS_BIAS)
    base = (bh.to(tl.int64) * tl.num_programs(0) + k) * 2 * Q + tl.arange(0, Q)
    tl.store(dc_ptr + base, dt)
    tl.store(dc_ptr + base + Q, cs)


@triton.jit
def _load_decay(dc_ptr, bh, k, nchunks, Q: tl.constexpr):
    """dt, cs and the total log-decay of chunk k of (batch*head) bh from _decay_kernel. A chunk
    past the end (a segment's loop runs on): total 0 (decay 1); its inputs load as zeros, so
    its dt and cs, the last chunk's, add nothing."""
    row, q = (bh.to(tl.int64) * nchunks + tl.minimum(k, nchunks - 1)) * 2 * Q, tl.arange(0, Q)
    total = tl.where(k < nchunks, tl.load(dc_ptr + row + 2 * Q - 1), 0.0)
    return tl.load(dc_ptr + row + q), tl.load(dc_ptr + row + Q + q), total


@triton.jit
def _last(v, Q: tl.constexpr):
    """v[Q-1] of a (Q,) vector (the chunk's total log-decay when v = cs)."""
    return tl.sum(tl.where(tl.arange(0, Q) == Q - 1, v, 0.0), axis=0)


@triton.jit
def _chunk_part(u, v, dt, cs, total, REVERSE: tl.constexpr):
    """What one chunk adds to the carried (BN, BP) state, one tensor-core product:
    v^T (u * dt * decay t -> end) forward (u = x, v = B: the state it leaves), or
    v^T (u * decay start -> t) in REVERSE (u = dy, v = C: the gradient w.r.t. the state
    entering it)."""
    if REVERSE:
        w = tl.exp(tl.minimum(cs, 0.0))
    else:   # as the decay matrix: the long forwards 4% faster (v22)
        w = dt * tl.exp2(tl.minimum((total - cs) * LOG2E, 0.0))
    return tl.dot(tl.trans(v), (u.to(tl.float32) * w[:, None]).to(v.dtype))


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
    total log-decay (sum of dt*A) for _pass_kernel. Run for every segment but the one at the
    far end (nothing reads what it adds): the last forward, the first in reverse. TMA: u_ptr,
    v_ptr are tensor descriptors over (b, l, h*P) and (b, l, h*N) (see _tma_views)."""
    g, bh, pt = tl.program_id(0) + REVERSE, tl.program_id(1), tl.program_id(2)
    bi, hi = bh // H, bh % H
    q = tl.arange(0, Q)
    p = pt * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    acc = tl.zeros((BN, BP), dtype=tl.float32)                         # S^T: see _scan_kernel
    logdecay = 0.0
    for i in range(G):
        k = g * G + (G - 1 - i if REVERSE else i)
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
        acc = acc * tl.exp(total) + _chunk_part(u, v, dt, cs, total, REVERSE)    # (BN, BP)
        logdecay += total
    bhs = (bi * nseg + g) * H + hi
    tl.store(s_ptr + (bhs * P + p)[None, :].to(tl.int64) * N + n[:, None], acc,
             mask=(p < P)[None, :] & (n < N)[:, None])
    if pt == 0:
        tl.store(seg_ptr + bh * nseg + g, logdecay)


@triton.jit
def _pass_kernel(s_ptr, seg_ptr, init_ptr, H, PN, nseg,
                 BLOCK: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """State passing over segments, in place: s_ptr holds (b, nseg, h, P*N) per-segment
    contributions (all but the far end's, see _state_kernel) and gets the state entering each
    segment (REVERSE: the state gradient at each segment's end). Sequential over segments,
    elementwise, so a program owns a flat BLOCK of the P*N entries: many programs, each a short
    chain of load-fma-store."""
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
    for i in range(nseg - 1):
        # load the next segment's contribution before this one's store: one load in flight
        # while the chain load -> fma -> store runs (the chain itself cannot be parallel)
        nxt = tl.load(s_ptr + base + (g + step) * H * PN, mask=ok & (e * 0 + i + 2 < nseg),
                      other=0.0)
        decay = tl.exp(tl.load(seg_ptr + bh * nseg + g))
        tl.store(s_ptr + base + g * H * PN, s, mask=ok)
        s = decay * s + contrib
        contrib = nxt
        g += step
    tl.store(s_ptr + base + g * H * PN, s, mask=ok)                    # the far end's


@triton.jit
def _states_kernel(u_ptr, v_ptr, dc_ptr, init_ptr, o_ptr, end_ptr,
                   L, H, P, N, nchunks, nseg, G,
                   Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, REVERSE: tl.constexpr,
                   HAS_INIT: tl.constexpr):
    """The backward's per-chunk states for a (BP, BN) tile, over one segment of G chunks: the
    state entering each chunk (u = x, v = B) or, REVERSE, the state gradient leaving each
    chunk (u = dy, v = C, from the segment's last chunk). init_ptr, (b, nseg, h, P, N): what
    enters the segment (the initial state or dfinal where nseg = 1, else _pass_kernel's). Per
    chunk: store the running state (in o_ptr's dtype), then decay it over the chunk and add
    the chunk's own part, one (BN, Q) @ (Q, BP) product as in _state_kernel. end_ptr gets
    what is left at the far end (fp32). The chunks' parts never go through memory (fp32, twice
    the bytes of x): segments only where b*h*tiles programs would leave the GPU idle."""
    g, bh, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pt, nt = tile // tl.cdiv(N, BN), tile % tl.cdiv(N, BN)
    bi, hi = bh // H, bh % H
    q = tl.arange(0, Q)
    p = pt * BP + tl.arange(0, BP)
    n = nt * BN + tl.arange(0, BN)
    np_mask = (n < N)[:, None] & (p < P)[None, :]
    off = p[None, :] * N + n[:, None]                                   # S^T, (BN, BP)
    if HAS_INIT:
        s = tl.load(init_ptr + ((bi * nseg + g) * H + hi).to(tl.int64) * P * N + off,
                    mask=np_mask, other=0.0)
    else:
        s = tl.zeros((BN, BP), dtype=tl.float32)
    for i in range(G):
        k = g * G + (G - 1 - i if REVERSE else i)                       # past the end: t >= L,
        t = k * Q + q                                                   # no input, decay 1
        dt, cs, total = _load_decay(dc_ptr, bh, k, nchunks, Q)
        rows = (bi * L + t).to(tl.int64) * H + hi
        u = tl.load(u_ptr + rows[:, None] * P + p[None, :],
                    mask=(t < L)[:, None] & (p < P)[None, :], other=0.0)   # (Q, BP)
        v = tl.load(v_ptr + rows[:, None] * N + n[None, :],
                    mask=(t < L)[:, None] & (n < N)[None, :], other=0.0)   # (Q, BN)
        if k < nchunks:
            st = ((bi * nchunks + k) * H + hi).to(tl.int64) * P * N
            tl.store(o_ptr + st + off, s.to(o_ptr.dtype.element_ty), mask=np_mask)
        s = s * tl.exp(total) + _chunk_part(u, v, dt, cs, total, REVERSE)
    if g == (0 if REVERSE else nseg - 1):
        tl.store(end_ptr + bh.to(tl.int64) * P * N + off, s, mask=np_mask)


@triton.jit
def _scan_kernel(x_ptr, dc_ptr, B_ptr, C_ptr, y_ptr, s_ptr, final_ptr,
                 sb_ptr, L, H, P, N, nchunks, nseg, G, R, nb,
                 Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                 HAS_STATE: tl.constexpr, TMA: tl.constexpr):
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
    TMA: x_ptr, B_ptr, C_ptr, y_ptr are tensor descriptors (see _tma_views).
    Also stores the state entering every R-th chunk to sb_ptr, (b, nb, h, P, N) in its dtype:
    the states the backward's chunks of R * Q tokens start from, which it would otherwise
    recompute (nb = 0: none. A runtime test, not a constexpr: one compiled kernel serves the
    forward with and without grad, and a fresh process's first step compiles it once)."""
    g, bh, pt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // H, bh % H
    q = tl.arange(0, Q)
    p = pt * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    np_mask = (n < N)[:, None] & (p < P)[None, :]
    if HAS_STATE:                                                       # S^T, (BN, BP): both
        bhs = (bi * nseg + g) * H + hi                                  # products with it need no
        ST = tl.load(s_ptr + (bhs * P + p)[None, :].to(tl.int64) * N + n[:, None],  # transpose
                     mask=np_mask, other=0.0)                           # of a register tile
    else:
        ST = tl.zeros((BN, BP), dtype=tl.float32)
    causal = q[:, None] >= q[None, :]
    for i in range(G):
        t0 = (g * G + i) * Q
        t = t0 + q
        tm = t < L
        if (g * G + i) % R == 0 and (g * G + i) // R < nb:
            sb = ((bi * nb + (g * G + i) // R) * H + hi).to(tl.int64) * P
            tl.store(sb_ptr + (sb + p)[None, :] * N + n[:, None],
                     ST.to(sb_ptr.dtype.element_ty), mask=np_mask)
        dt, cs, total = _load_decay(dc_ptr, bh, g * G + i, nchunks, Q)
        if TMA:                                                         # rows past L read as 0
            x = x_ptr.load([bi, t0, hi * P + pt * BP]).reshape(Q, BP)
            Bm = B_ptr.load([bi, t0, hi * N]).reshape(Q, BN)
            Cm = C_ptr.load([bi, t0, hi * N]).reshape(Q, BN)
        else:
            rows = (bi * L + t).to(tl.int64) * H + hi
            qp_mask = tm[:, None] & (p < P)[None, :]
            qn_mask = tm[:, None] & (n < N)[None, :]
            x = tl.load(x_ptr + rows[:, None] * P + p[None, :], mask=qp_mask, other=0.0)
            Bm = tl.load(B_ptr + rows[:, None] * N + n[None, :], mask=qn_mask, other=0.0)
            Cm = tl.load(C_ptr + rows[:, None] * N + n[None, :], mask=qn_mask, other=0.0)
        cb = tl.dot(Cm, tl.trans(Bm))                                   # (Q, Q): C_t . B_s
        # exp(cs_t - cs_s) <= 1 as 2^(log2(e) (cs_t - cs_s)) masked in the exponent (2^-inf = 0):
        # no clamp, nothing overflows, 945 instructions a chunk for 1127 (docs/kernel_log.md v20)
        a = cs * LOG2E
        scores = cb * tl.exp2(tl.where(causal, a[:, None] - a[None, :], float("-inf"))) \
            * dt[None, :]
        # state -> output: scale the (Q, BP) product's rows by the decay from the chunk start
        # rather than C's (Q, N) rows: fewer multiplies, and C goes to the tensor cores as loaded
        y = tl.dot(Cm, ST.to(Cm.dtype)) * tl.exp(tl.minimum(cs, 0.0))[:, None]
        y = tl.dot(scores.to(x.dtype), x, y)                            # + intra-chunk
        if TMA:                                                         # rows past L dropped
            y_ptr.store([bi, t0, hi * P + pt * BP], y.to(y_ptr.dtype).reshape(1, Q, BP))
        else:
            tl.store(y_ptr + rows[:, None] * P + p[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=tm[:, None] & (p < P)[None, :])
        ST = ST * tl.exp(total) + _chunk_part(x, Bm, dt, cs, total, False)   # at chunk end
    if g == nseg - 1:
        tl.store(final_ptr + (bh * P + p)[None, :].to(tl.int64) * N + n[:, None], ST, mask=np_mask)


@triton.jit
def _bwd_chunk(x_ptr, dc_ptr, dy_ptr, k, bh, p, L, H, P, nchunks, Q: tl.constexpr):
    """What every backward kernel loads first for chunk k of one (batch, head): the chunk's
    token rows, its decays and the columns p of x, dy and xdt = dt x (fp32)."""
    bi, hi = bh // H, bh % H
    t = k * Q + tl.arange(0, Q)
    rows = (bi * L + t).to(tl.int64) * H + hi
    qp_mask = (t < L)[:, None] & (p < P)[None, :]
    dt, cs, total = _load_decay(dc_ptr, bh, k, nchunks, Q)
    x = tl.load(x_ptr + rows[:, None] * P + p[None, :], mask=qp_mask, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * P + p[None, :], mask=qp_mask, other=0.0).to(x.dtype)
    return t, rows, dt, cs, total, x, dy, x.to(tl.float32) * dt[:, None]


@triton.jit
def _state_tile(s_ptr, bh, k, p, n, H, P, N, nchunks):
    """The (len(p), len(n)) tile of chunk k's state, (b, nchunks, h, P, N)."""
    st = ((bh // H * nchunks + k) * H + bh % H).to(tl.int64) * P
    return tl.load(s_ptr + (st + p)[:, None] * N + n[None, :],
                   mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)


@triton.jit
def _bwd_bc(k, j, bh, x_ptr, dc_ptr, B_ptr, C_ptr, dy_ptr, s_ptr, ds_ptr,
            dB_ptr, dC_ptr, z_ptr, L, H, P, N, nchunks, zstride,
            Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, NT: tl.constexpr):
    """Columns n (tile j % NT) of dC (j < NT) or dB (j >= NT) for chunk k of one (batch,
    head) bh, given S = the state entering the chunk and dS = the gradient of the state
    leaving it. With xdt = dt x and W = (dy xdt^T) * decay (causal:
    W_ts = dy_t . xdt_s exp(cs_t - cs_s)):
        dC = W B + e_in * dy S          dB = W^T C + e_out * xdt dS
    (e_in = exp(cs_t), e_out = exp(cs_end - cs_t)). Each program forms W (a (Q, Q, P) product)
    for one result: apart, each program is half the size of one that forms both.
    Also the pairs' share of the log-decays' gradient (_bwd_dt_kernel) without C B^T:
    sum_s<t W_ts (C_t . B_s) = C_t . (W_strict B)_t, by columns B_s . (W_strict^T C)_s: the
    strictly causal products the gradients take anyway (the diagonal, which cancels between
    rows and columns, is added apart). Row terms (and <C_t, e_in (dy S)_t>, the state -> output
    term) go to z[tile], columns to z[NT + tile]."""
    q = tl.arange(0, Q)
    n = j % NT * BN + tl.arange(0, BN)
    p = tl.arange(0, BP)
    t, rows, dt, cs, total, x, dy, xdt = _bwd_chunk(x_ptr, dc_ptr, dy_ptr, k, bh, p, L, H, P,
                                                    nchunks, Q)
    xdt_lo = xdt.to(x.dtype)
    qn_mask = (t < L)[:, None] & (n < N)[None, :]
    qn = rows[:, None] * N + n[None, :]
    Bm = tl.load(B_ptr + qn, mask=qn_mask, other=0.0)
    Cm = tl.load(C_ptr + qn, mask=qn_mask, other=0.0)
    decay = tl.where(q[:, None] > q[None, :],
                     tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    W = (tl.dot(dy, tl.trans(xdt_lo)) * decay).to(Cm.dtype)       # strictly causal
    diag = tl.sum(dy.to(tl.float32) * xdt_lo.to(tl.float32), axis=1)  # W_tt, decay 1
    if j < NT:
        g = tl.dot(W, Bm)                                           # (Q, BN)
        zq = tl.sum(Cm.to(tl.float32) * g, axis=1)
        S = _state_tile(s_ptr, bh, k, p, n, H, P, N, nchunks)       # (P, BN) entering
        g_state = tl.dot(dy, S.to(x.dtype)) * tl.exp(tl.minimum(cs, 0.0))[:, None]
        zq += tl.sum(Cm.to(tl.float32) * g_state, axis=1)
        g += diag[:, None] * Bm.to(tl.float32) + g_state
        tl.store(dC_ptr + qn, g.to(dC_ptr.dtype.element_ty), mask=qn_mask)
    else:
        g = tl.dot(tl.trans(W), Cm)                                 # (Q, BN)
        zq = tl.sum(Bm.to(tl.float32) * g, axis=1)
        dS = _state_tile(ds_ptr, bh, k, p, n, H, P, N, nchunks)     # (P, BN) grad leaving
        e_out = tl.exp(tl.minimum(total - cs, 0.0))
        g += diag[:, None] * Cm.to(tl.float32) \
            + tl.dot(xdt_lo, dS.to(x.dtype)) * e_out[:, None]
        tl.store(dB_ptr + qn, g.to(dB_ptr.dtype.element_ty), mask=qn_mask)
    tl.store(z_ptr + j * zstride + rows, zq, mask=t < L)


@triton.jit
def _bwd_dx(k, pt, bh, x_ptr, dc_ptr, B_ptr, C_ptr, dy_ptr, s_ptr, ds_ptr,
            dx_ptr, u_ptr, sds_ptr, L, H, P, N, nchunks, ustride,
            Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Columns p (tile pt) of dx for chunk k of one (batch, head) bh. With
    M = (C B^T) * decay (causal):  dxdt = M^T dy + e_out * B dS^T,  dx = dt dxdt.
    Also this tile's shares of the log-decays' gradient: <xdt_t, (e_out B dS^T)_t> (the input
    -> state term) and <x_t, dxdt_t> (ddt's own term) to u, and <dS, S> (the incoming state's
    decay) to sds."""
    q = tl.arange(0, Q)
    n = tl.arange(0, BN)
    p = pt * BP + tl.arange(0, BP)
    t, rows, dt, cs, total, x, dy, xdt = _bwd_chunk(x_ptr, dc_ptr, dy_ptr, k, bh, p, L, H, P,
                                                    nchunks, Q)
    tm = t < L
    qn_mask = tm[:, None] & (n < N)[None, :]
    Bm = tl.load(B_ptr + rows[:, None] * N + n[None, :], mask=qn_mask, other=0.0)
    Cm = tl.load(C_ptr + rows[:, None] * N + n[None, :], mask=qn_mask, other=0.0)
    dS = _state_tile(ds_ptr, bh, k, p, n, H, P, N, nchunks)         # (BP, N) grad leaving
    S = _state_tile(s_ptr, bh, k, p, n, H, P, N, nchunks)
    sds = tl.sum(tl.sum(dS.to(tl.float32) * S.to(tl.float32), axis=1), axis=0)
    e_out = tl.exp(tl.minimum(total - cs, 0.0))
    dx_state = tl.dot(Bm, tl.trans(dS).to(Bm.dtype)) * e_out[:, None]   # (Q, BP)
    u = tl.sum(xdt * dx_state, axis=1)
    decay = tl.where(q[:, None] >= q[None, :],
                     tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
    M = (tl.dot(Cm, tl.trans(Bm)) * decay).to(x.dtype)              # (Q, Q)
    dxdt = tl.dot(tl.trans(M), dy, dx_state)
    tl.store(dx_ptr + rows[:, None] * P + p[None, :], (dxdt * dt[:, None]).to(
        dx_ptr.dtype.element_ty), mask=tm[:, None] & (p < P)[None, :])
    tl.store(u_ptr + 2 * pt * ustride + rows, u, mask=tm)
    tl.store(u_ptr + (2 * pt + 1) * ustride + rows, tl.sum(x.to(tl.float32) * dxdt, axis=1),
             mask=tm)
    tl.store(sds_ptr + (pt * tl.num_programs(1) + bh) * nchunks + k, sds)


@triton.jit
def _bwd_grad_kernel(x_ptr, dc_ptr, B_ptr, C_ptr, dy_ptr, s_ptr, ds_ptr,
                     dB_ptr, dC_ptr, z_ptr, dx_ptr, u_ptr, sds_ptr, L, H, P, N, nchunks, stride,
                     Q: tl.constexpr, BPW: tl.constexpr, BN: tl.constexpr, NT: tl.constexpr,
                     BP: tl.constexpr, BNW: tl.constexpr, PT: tl.constexpr):
    """Every gradient of one chunk of one (batch, head) but ddt and dA: program j of the chunk
    runs _bwd_bc (dC or dB tile j, j < 2 NT, tiles BN wide with whole rows of P, BPW) or
    _bwd_dx (dx tile j - 2 NT, BP wide with whole rows of N, BNW). One kernel, the chunk's
    programs adjacent in the grid: they run together, and the later ones' loads of x, dy, B,
    C and the states hit L2."""
    k = tl.program_id(0) // (2 * NT + PT)
    j = tl.program_id(0) % (2 * NT + PT)
    bh = tl.program_id(1)
    if j < 2 * NT:
        _bwd_bc(k, j, bh, x_ptr, dc_ptr, B_ptr, C_ptr, dy_ptr, s_ptr, ds_ptr,
                dB_ptr, dC_ptr, z_ptr, L, H, P, N, nchunks, stride, Q, BPW, BN, NT)
    else:
        _bwd_dx(k, j - 2 * NT, bh, x_ptr, dc_ptr, B_ptr, C_ptr, dy_ptr,
                s_ptr, ds_ptr, dx_ptr, u_ptr, sds_ptr, L, H, P, N, nchunks, stride, Q, BP, BNW)


@triton.jit
def _bwd_dt_kernel(dt_ptr, dt_bias_ptr, A_ptr, z_ptr, u_ptr, sds_ptr, ddt_ptr, dA_ptr,
                   L, H, nchunks, stride, Q: tl.constexpr, NT: tl.constexpr, PT: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """ddt (in ddt_ptr's dtype) of one chunk of one (batch, head) from the other kernels' shares,
    and the chunk's shares of dA and ddt_bias (dA_ptr, (2, b*h, chunks), fp32). The log-decays
    cs get d(cs_t) = <dy_t, y_t> - <xdt_t, dxdt_t> (+ <dS, S_end> at the chunk's last token),
    and dA_t is the reverse cumsum of that inside the chunk: summed here from terms that do not
    cancel (the pairs inside the chunk and the state -> output term, z; the input -> state term,
    u, as an exclusive cumsum; the incoming state's, sds)."""
    k, bh = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // H, bh % H
    t = k * Q + tl.arange(0, Q)
    tm = t < L
    rows = (bi * L + t).to(tl.int64) * H + hi
    raw, dt, cs = _chunk_decay(dt_ptr, dt_bias_ptr, A_ptr, bi * L, hi, t, L, H, HAS_BIAS)
    zq = tl.zeros((Q,), dtype=tl.float32)
    for j in tl.static_range(NT):                                       # rows minus columns
        zq += tl.load(z_ptr + j * stride + rows, mask=tm, other=0.0) \
            - tl.load(z_ptr + (NT + j) * stride + rows, mask=tm, other=0.0)
    u = tl.zeros((Q,), dtype=tl.float32)
    xdx = tl.zeros((Q,), dtype=tl.float32)
    sds = 0.0
    for j in tl.static_range(PT):
        u += tl.load(u_ptr + 2 * j * stride + rows, mask=tm, other=0.0)
        xdx += tl.load(u_ptr + (2 * j + 1) * stride + rows, mask=tm, other=0.0)
        sds += tl.load(sds_ptr + (j * tl.num_programs(1) + bh) * nchunks + k)
    ddA = tl.cumsum(zq, axis=0, reverse=True) + (tl.cumsum(u, axis=0) - u) \
        + tl.exp(_last(cs, Q)) * sds
    ddt = (xdx + tl.load(A_ptr + hi).to(tl.float32) * ddA) / (1.0 + tl.exp(-raw))  # softplus'
    tl.store(ddt_ptr + rows, ddt.to(ddt_ptr.dtype.element_ty), mask=tm)
    tl.store(dA_ptr + bh * nchunks + k, tl.sum(tl.where(tm, dt * ddA, 0.0), axis=0))
    tl.store(dA_ptr + (tl.num_programs(1) + bh) * nchunks + k, tl.sum(tl.where(tm, ddt, 0.0), 0))


# -----------------------------------------------------------------------------
# launching the kernels, and the autograd Function around them

# Launch settings, fixed from the sweeps in docs/kernel_log.md instead of an autotuner. BP is
# capped at next_pow2(P), so the CPU interpreter tests (P = 16) run 16-wide tiles.
# Forward: chunks of 64 tokens (or chunk_size if smaller), p-tiles of 64, two programs per SM.
FWD_CONFIG = dict(Q=64, BP=64, num_warps=4, num_stages=2, programs_per_sm=2)
STATES_CONFIG = dict(BP=64, BN=64, num_warps=8, num_stages=3, programs_per_sm=2)
# ... or (64, 128) tiles with 4 warps, where they need no more segments than (64, 64) would:
# faster at 8 x 2048 (no segments either way) and 1 x 65536 (segments either way), slower
# where (64, 64) has programs enough without segments and (64, 128) not (4 x 8192). None: off
STATES_WIDE = dict(BP=64, BN=128, num_warps=4, num_stages=2, programs_per_sm=2)
SEGMENTS = None                                           # _chunk_states' nseg; None: it decides
BWD_CONFIG = dict(BN=128, BP=128, num_stages=1)
BWD_WARPS = {2: 4, 4: 8}                      # by element size: fp32 tiles need twice the registers
PASS_BLOCK = 512                                          # state entries per _pass_kernel program
SEGMENT_CHUNKS = None                                     # G; None: _pick_segment decides
# The backward's chunk: its programs hold whole (Q, P) and (Q, Q) tiles and a (P, BN) or (BP, N)
# state tile; at P = N = 128 chunks of 64 let two bf16 programs of 4 warps share an SM (shared
# memory and registers; chunks of 128 fit one, of 256 none) and fit fp32's (tf32) tiles.
BWD_CHUNK = 64


def _bwd_q(chunk_size):
    """The backward's own chunk (BWD_CHUNK)."""
    return min(chunk_size, BWD_CHUNK)


def _sms(device):
    """Streaming multiprocessors (4 for the CPU interpreter: segments get tested there)."""
    return torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4


def _pick_segment(b, h, nchunks, p_tiles, device):
    """G, the chunks per forward segment: as long as possible (fewer states through memory)
    while the scan still has about FWD_CONFIG["programs_per_sm"] programs per streaming
    multiprocessor (two fit: 4 warps, 255 registers each). Measured on the H100
    (docs/kernel_log.md): nseg = round(2 SMs / (b*h*p_tiles)), G = 32, 64, 128 chunks of 64
    at 8x2048, 4x8192, 1x65536."""
    if SEGMENT_CHUNKS is not None:
        return min(SEGMENT_CHUNKS, nchunks)
    nseg = max(1, round(FWD_CONFIG["programs_per_sm"] * _sms(device) / (b * h * p_tiles)))
    return triton.cdiv(nchunks, nseg)


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


def _segments(u, v, dt, dt_bias, A, init, nseg, G, Q, reverse):
    """The state entering each of nseg segments of G chunks (reverse: the state gradient at
    each one's end), (b, nseg, h, p, n) fp32: _state_kernel for what each one adds, then
    _pass_kernel. Two chunks a step where a segment has an even number of them (half the
    serial steps, (N, 2Q) @ (2Q, BP) products; fp32 tiles of 2Q tokens would not fit in shared
    memory); TMA where it applies (docs/kernel_log.md, v4 and v12)."""
    b, l, h, p = u.shape
    n = v.shape[-1]
    QS = 2 * Q if G % 2 == 0 and u.element_size() <= 2 else Q
    BP, BN = min(FWD_CONFIG["BP"], _pow2(p)), _pow2(n)
    bias = dt_bias if dt_bias is not None else A                        # any pointer; unused
    segs = torch.empty(b, nseg, h, p, n, device=u.device, dtype=torch.float32)
    segdecay = torch.empty(b, h, nseg, device=u.device, dtype=torch.float32)
    views = _tma_views((u, v), ((QS, BP), (QS, BN)))
    _state_kernel[(nseg - 1, b * h, triton.cdiv(p, BP))](             # not the far end's
        *(views or (u, v)), dt, bias, A, segs, segdecay, l, h, p, n, nseg, G * Q // QS, Q=QS,
        BP=BP, BN=BN, REVERSE=reverse, HAS_BIAS=dt_bias is not None, TMA=views is not None,
        num_warps=FWD_CONFIG["num_warps"], num_stages=FWD_CONFIG["num_stages"])
    _pass_kernel[(b * h, triton.cdiv(p * n, PASS_BLOCK))](
        segs, segdecay, init if init is not None else segs, h, p * n, nseg, BLOCK=PASS_BLOCK,
        REVERSE=reverse, HAS_INIT=init is not None)
    return segs


def _decays(dt, dt_bias, A, Q, dc=None):
    """_decay_kernel's dt and cs of every chunk of Q tokens, (b*h, chunks, 2, Q) fp32; dc where
    it already holds them (computed for chunks of Q)."""
    b, l, h = dt.shape
    if dc is None or dc.shape[-1] != Q:
        dc = torch.empty(b * h, triton.cdiv(l, Q), 2, Q, device=dt.device, dtype=torch.float32)
        _decay_kernel[(dc.shape[1], b * h)](dt, dt_bias if dt_bias is not None else A, A, dc, l,
                                            h, Q=Q, HAS_BIAS=dt_bias is not None)
    return dc


def _ssd_fwd_triton(x, dt, A, B, C, dt_bias, initial_state, chunk_size, bwd_chunk=None,
                    dc=None):
    """y, the final state and, given bwd_chunk, the states entering every chunk of bwd_chunk
    tokens (in x's dtype, for the backward; else None). dc: _decays' (recomputed if None)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = min(chunk_size, FWD_CONFIG["Q"])                                # the forward's own chunk
    BP, BN = min(FWD_CONFIG["BP"], _pow2(p)), _pow2(n)
    warps, stages = FWD_CONFIG["num_warps"], FWD_CONFIG["num_stages"]
    nchunks, p_tiles = triton.cdiv(l, Q), triton.cdiv(p, BP)
    G = _pick_segment(b, h, nchunks, p_tiles, x.device)
    nseg = triton.cdiv(nchunks, G)
    y = torch.empty_like(x)
    final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    has_state = initial_state is not None or nseg > 1
    states = initial_state if initial_state is not None else final      # any pointer when unused
    if nseg > 1:                                                        # steps 2 and 3 per segment
        states = _segments(x, B, dt, dt_bias, A, initial_state, nseg, G, Q, False)
    views = _tma_views((x, B, C, y), ((Q, BP), (Q, BN), (Q, BN), (Q, BP)))
    xv, Bv, Cv, yv = views or (x, B, C, y)
    # R: forward chunks per backward chunk, the same with and without grad (no recompile;
    # without, y stands in for the states' pointer: the same dtype, never written)
    R = max(1, (bwd_chunk or _bwd_q(chunk_size)) // Q)
    nb = triton.cdiv(l, R * Q) if bwd_chunk else 0
    saved = torch.empty(b, nb, h, p, n, device=x.device, dtype=x.dtype) if nb else None
    _scan_kernel[(nseg, b * h, p_tiles)](
        xv, _decays(dt, dt_bias, A, Q, dc), Bv, Cv, yv, states, final, saved if nb else y, l, h,
        p, n, nchunks, nseg, G, R, nb, Q=Q, BP=BP, BN=BN, HAS_STATE=has_state,
        TMA=views is not None, num_warps=warps, num_stages=stages)
    return y, final, saved


def _chunk_states(u, v, dt, A, dt_bias, init, Q, reverse, dtype, dc=None):
    """The state entering each chunk (forward, u = x, v = B) or the state gradient leaving each
    chunk (reverse, u = dy, v = C, init = dfinal), summed in fp32, returned in dtype. Also
    returns what is left at the far end (fp32): the final state, or the initial state's
    gradient. In segments (_state_kernel, _pass_kernel, as the forward) where b*h*tiles
    programs are too few for the GPU (long sequences, small batches)."""
    b, l, h, p = u.shape
    n = v.shape[-1]
    c = triton.cdiv(l, Q)

    def plan(cfg):
        BP, BN = min(cfg["BP"], _pow2(p)), min(cfg["BN"], _pow2(n))
        tiles = triton.cdiv(p, BP) * triton.cdiv(n, BN)
        nseg = SEGMENTS if SEGMENTS is not None else \
            max(1, round(cfg["programs_per_sm"] * _sms(u.device) / (b * h * tiles)))
        return cfg, BP, BN, tiles, nseg
    narrow = plan(STATES_CONFIG)
    wide = plan(STATES_WIDE) if STATES_WIDE is not None else None
    cfg, BP, BN, tiles, nseg = wide if wide and (narrow[-1] > 1 or wide[-1] == 1) else narrow
    G = triton.cdiv(c, min(nseg, c))
    nseg = triton.cdiv(c, G)
    out = torch.empty(b, c, h, p, n, device=u.device, dtype=dtype)
    end = torch.empty(b, h, p, n, device=u.device, dtype=torch.float32)
    if nseg > 1:
        init = _segments(u, v, dt, dt_bias, A, init, nseg, G, Q, reverse)
    _states_kernel[(nseg, b * h, tiles)](
        u, v, _decays(dt, dt_bias, A, Q, dc), init if init is not None else end, out, end, l, h,
        p, n, c, nseg, G, Q=Q, BP=BP, BN=BN, REVERSE=reverse, HAS_INIT=init is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, end


def _ssd_bwd_triton(dy, dfinal, x, dt, A, B, C, dt_bias, initial_state, Q, S=None, dc=None):
    """Every gradient; S: the states entering each chunk of Q tokens, as the forward saves
    them, and dc: _decays' (each recomputed where None)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    c = triton.cdiv(l, Q)
    dc = _decays(dt, dt_bias, A, Q, dc)
    if S is None:
        S, _ = _chunk_states(x, B, dt, A, dt_bias, initial_state, Q, False, x.dtype, dc)
    dS, dinit = _chunk_states(dy, C, dt, A, dt_bias, dfinal, Q, True, x.dtype, dc)
    dx, dB, dC = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
    ddt = torch.empty_like(dt)
    dA = torch.empty(2, b, h, c, device=x.device, dtype=torch.float32)    # dA's, dt_bias's
    BN, BP = min(BWD_CONFIG["BN"], _pow2(n)), min(BWD_CONFIG["BP"], _pow2(p))
    NT, PT = triton.cdiv(n, BN), triton.cdiv(p, BP)
    z = torch.empty(2 * NT, b, l, h, device=x.device, dtype=torch.float32)  # rows, columns
    u = torch.empty(2 * PT, b, l, h, device=x.device, dtype=torch.float32)  # per p-tile
    sds = torch.empty(PT, b * h, c, device=x.device, dtype=torch.float32)
    bias, has_bias = dt_bias if dt_bias is not None else A, dt_bias is not None
    warps = dict(num_warps=BWD_WARPS[x.element_size()], num_stages=BWD_CONFIG["num_stages"])
    _bwd_grad_kernel[(c * (2 * NT + PT), b * h)](
        x, dc, B, C, dy, S, dS, dB, dC, z, dx, u, sds, l, h, p, n, c, b * l * h,
        Q=Q, BPW=_pow2(p), BN=BN, NT=NT, BP=BP, BNW=_pow2(n), PT=PT, **warps)
    _bwd_dt_kernel[(c, b * h)](dt, bias, A, z, u, sds, ddt, dA, l, h, c, b * l * h,
                               Q=Q, NT=NT, PT=PT, HAS_BIAS=has_bias)
    dA, dbias = dA.sum((1, 3))                                          # one kernel for both
    return dx, ddt, dA, dB, dC, dbias, dinit


class _SSDTriton(torch.autograd.Function):
    """ssd with the Triton kernels. With grad, the forward also keeps the states entering the
    backward's chunks (in x's dtype: at P = N = 128, Q = 64 twice the bytes of x); the backward
    recomputes only the state gradients."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, dt_bias, initial_state, chunk_size, grad):
        x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
        init = initial_state.float().contiguous() if initial_state is not None else None
        bias = dt_bias.float() if dt_bias is not None else None
        Q, A32 = _bwd_q(chunk_size), A.float()
        dc = _decays(dt, bias, A32, Q)                  # the forward's too where its chunk is Q
        y, final, S = _ssd_fwd_triton(x, dt, A32, B, C, bias, init, chunk_size,
                                      Q if grad else None, dc)
        ctx.save_for_backward(x, dt, A, B, C, dt_bias, initial_state, S, dc)
        ctx.set_materialize_grads(False)            # an unused final state: no zeros to read
        ctx.Q = Q
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, dt_bias, initial_state, S, dc = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        init = initial_state.float().contiguous() if initial_state is not None else None
        dfinal = dfinal.float().contiguous() if dfinal is not None else None
        dx, ddt, dA, dB, dC, dbias, dinit = _ssd_bwd_triton(
            dy, dfinal, x, dt, A.float(), B, C, dt_bias.float() if dt_bias is not None else None,
            init, ctx.Q, S, dc)
        return (dx, ddt, dA.to(A.dtype), dB, dC,
                dbias.to(dt_bias.dtype) if dt_bias is not None else None,
                dinit.to(initial_state.dtype) if initial_state is not None else None, None, None)


def ssd_triton(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128):
    """scan_kernel.ssd's backend="triton": fp16, bf16 or fp32 inputs, chunk_size a power of two
    >= 16. The kernels run chunks of at most chunk_size (FWD_CONFIG, BWD_CHUNK): same result."""
    check_triton_inputs(x, chunk_size)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, dt_bias, initial_state))
    return _SSDTriton.apply(x, dt, A, B, C, dt_bias, initial_state, chunk_size, grad)


# -----------------------------------------------------------------------------
# validation and benchmark (tests/test_scan_triton.py holds the tests)

SHAPES = ((16, 1024), (8, 2048), (4, 8192), (2, 16384), (1, 65536))    # batch x length
H, P, N, CHUNK = 16, 128, 128, 128                                      # the mmMamba layer
FIRST_CALL_SHAPE = (8, 2048)


def _random_inputs(b, l, h, p, n, dtype, device, requires_grad=False):
    """mmMamba-like draws: dt0 log-uniform in [1e-3, 1e-1] as Mamba-2 initialises dt_bias,
    A = -e^a, a in [0, 1], raw dt around 0 so softplus(dt + dt_bias) spreads around dt0."""
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
    """The fast kernels (outputs and every gradient) and the simple kernel (outputs) against
    the float64 chunked reference on one mmMamba-shaped draw; returns relative errors."""
    ins = _random_inputs(b, l, h, p, n, dtype, "cuda", requires_grad=True)
    S0 = torch.randn(b, h, p, n, device="cuda", requires_grad=True)
    y, f = ssd(**ins, initial_state=S0, backend="triton")
    ref = {k: v.detach().double().requires_grad_() for k, v in ins.items()}
    S0r = S0.detach().double().requires_grad_()
    yr, fr = ssd_chunked(**ref, initial_state=S0r)
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    grads = torch.autograd.grad((y.double() * gy).sum() + (f.double() * gf).sum(),
                                [*ins.values(), S0])
    grads_r = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), [*ref.values(), S0r])
    err = {"y": _rel(y, yr), "final": _rel(f, fr)}
    err.update({"d" + k: _rel(g, gr) for k, g, gr in zip([*ins, "S0"], grads, grads_r)})
    with torch.no_grad():
        ys, fs = ssd(**ins, initial_state=S0, backend="simple")
    err.update({"simple y": _rel(ys, yr), "simple final": _rel(fs, fr)})
    return err


def load_peers(peers):
    """{name: function or the reason it is missing} for mamba_ssm's mamba_chunk_scan_combined
    and fla's chunk_simple_gla. `peers` (a folder holding mamba_ssm/, fla/, einops/) goes first
    on sys.path. Package __init__ files that would pull in compiled CUDA extensions
    (mamba_ssm's) or every other op (fla.ops') are skipped: their packages are registered as
    bare modules with only a search path, then the one module needed is imported."""
    if peers:
        sys.path.insert(0, os.path.abspath(peers))

    def bare(name):
        if name in sys.modules:
            return
        parent, _, leaf = name.rpartition(".")
        if parent:
            where = [os.path.join(d, leaf) for d in sys.modules[parent].__path__]
        else:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise ImportError(f"no package {name}")
            where = list(spec.submodule_search_locations)
        module = types.ModuleType(name)
        module.__path__ = where
        sys.modules[name] = module

    def mamba():
        for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils"):
            bare(name)
        module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        return module.mamba_chunk_scan_combined

    def fla():
        importlib.import_module("fla")                 # its own __init__ is light (a version)
        bare("fla.ops")
        return importlib.import_module("fla.ops.simple_gla.chunk").chunk_simple_gla

    found = {}
    for name, load in (("mamba_ssm", mamba), ("fla", fla)):
        try:
            found[name] = load()
        except Exception as e:  # noqa: BLE001  (absent or broken: report and time the rest)
            found[name] = f"not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return found


# what the benchmark times: id (for --only) -> the column's name
IMPLEMENTATIONS = {"fast": "ours (fast)", "simple": "ours (simple)", "mamba_ssm": "mamba_ssm",
                   "fla": "fla simple GLA", "torch": "ours (PyTorch chunked)"}


def _implementations(peers, only=None):
    """{id: make(ins, dy) -> (fwd, fwd_bwd or None, grad leaves)} for the scans in `only` (all
    by default); a string in place of make says why that one is missing."""
    def ours(backend, backward):
        def make(ins, dy):
            leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}

            def fwd():
                with torch.no_grad():
                    return ssd(**ins, chunk_size=CHUNK, backend=backend)

            def fwd_bwd():
                y, _ = ssd(**leaves, chunk_size=CHUNK, backend=backend)
                y.backward(dy)
            return fwd, fwd_bwd if backward else None, list(leaves.values())
        return make

    def mamba(fn):
        def make(ins, dy):
            def call(x, dt, A, B, C, dt_bias):
                return fn(x, dt, A, B, C, chunk_size=CHUNK, dt_bias=dt_bias, dt_softplus=True,
                          return_final_states=True)
            leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}

            def fwd():
                with torch.no_grad():
                    return call(**ins)

            def fwd_bwd():
                y, _ = call(**leaves)
                y.backward(dy)
            return fwd, fwd_bwd, list(leaves.values())
        return make

    def fla(fn):
        def make(ins, dy):
            # chunk_simple_gla is the same recurrence given q = C, k = B, v = dt x and the
            # log-decay g = dt A: that preparation is done here, outside the timed calls
            dt = F.softplus(ins["dt"].float() + ins["dt_bias"])
            pre = dict(q=ins["C"], k=ins["B"], v=(ins["x"] * dt[..., None]).to(ins["x"].dtype),
                       g=dt * ins["A"])
            leaves = {k: v.detach().clone().requires_grad_() for k, v in pre.items()}

            def fwd():
                with torch.no_grad():
                    return fn(**pre, scale=1.0, output_final_state=True)

            def fwd_bwd():
                y, _ = fn(**leaves, scale=1.0, output_final_state=True)
                y.backward(dy)
            return fwd, fwd_bwd, list(leaves.values())
        return make

    only = list(IMPLEMENTATIONS) if only is None else only
    found = load_peers(peers) if {"mamba_ssm", "fla"} & set(only) else {}
    wrap = {"mamba_ssm": mamba, "fla": fla}
    impls = {"fast": ours("triton", True), "simple": ours("simple", False),
             "torch": ours("torch", False)}
    impls.update({k: wrap[k](f) if callable(f) else f for k, f in found.items()})
    return {k: impls[k] for k in only}


def _copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy, bytes read + written per second: the byte floor's denominator."""
    from triton.testing import do_bench
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def _floor_bytes(b, l):
    """Forward: read x, B, C, dt once and write y once (bf16). Forward + backward adds: read
    x, dt, B, C, dy and write dx, ddt, dB, dC."""
    rows = b * l * H * 2                                                 # bf16 bytes per entry
    fwd = rows * (2 * P + 2 * N + 1)
    return fwd, fwd + rows * (3 * P + 4 * N + 2)


def _cell(ts, floor_ms):
    if not ts:
        return "-"
    med = statistics.median(ts)
    return f"{med:.3f} ({min(ts):.3f}-{max(ts):.3f}) {med / floor_ms:.1f}x"


def _peer_check(impls, b=2, l=1024 + 77):
    """Each implementation's y against the float64 reference on one draw (not a multiple of the
    chunk): a peer called with the wrong convention would show here, not as a fast time."""
    ins = _random_inputs(b, l, H, P, N, torch.bfloat16, "cuda")
    yr, _ = ssd_chunked(**{k: v.double() for k, v in ins.items()})
    out = {}
    for name, make in impls.items():
        if callable(make):
            try:
                out[name] = f"{_rel(make(ins, None)[0]()[0], yr):.1e}"
            except Exception as e:  # noqa: BLE001
                out[name] = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
    return out


def benchmark(peers=None, rounds=5, shapes=SHAPES, part="all", only=None):
    """Forward and forward + backward of each implementation at `shapes` (H = 16, P = N = 128,
    chunk 128, bf16, dt raw with dt_bias and softplus inside the scan), `rounds` interleaved
    passes (each round times every implementation once, a do_bench median each), then the
    first call of each in a fresh process with an empty Triton cache. Prints markdown.
    part: "times", "first-call" or "all"; only: implementation ids (IMPLEMENTATIONS). The
    peers autotune hundreds of configurations on their first calls (minutes): split a run
    with part and only where a call has a time limit."""
    if rounds < 1:
        raise InputError(f"--rounds {rounds}: time at least one round")
    only = list(IMPLEMENTATIONS) if only is None else only
    if peers and not os.path.isdir(peers):
        raise InputError(f"--peers {peers}: no such folder (give one holding mamba_ssm/, fla/ "
                         "and einops/)")
    if not (HAS_TRITON and torch.cuda.is_available()):
        raise InputError("the scan benchmark needs a CUDA GPU and triton; nothing to time here")
    print(f"device: {torch.cuda.get_device_name()}, triton {triton.__version__}, "
          f"torch {torch.__version__}")
    if part in ("times", "all"):
        _times(_implementations(peers, only), rounds, shapes)
    if part in ("first-call", "all"):
        print(f"\nfirst call in a fresh process, empty Triton cache (compilation and any "
              f"autotuning included), {FIRST_CALL_SHAPE[0]} x {FIRST_CALL_SHAPE[1]}, s\n")
        print("| implementation | first fwd | then first fwd+bwd |")
        print("|---|---|---|")
        for name in only:
            if name != "torch":
                cells = _first_call(name, peers)
                print(f"| {IMPLEMENTATIONS[name]} | " + " | ".join(cells) + " |")


def _times(impls, rounds, shapes):
    """benchmark's timing part: validation, the peers' check, interleaved rounds, tables."""
    from triton.testing import do_bench
    start = time.perf_counter()
    err = validate()
    print("bf16 vs float64 reference (rel. error): "
          + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))
    assert all(v < 2e-2 for v in err.values()), f"a Triton scan disagrees with the reference: {err}"
    for name, make in impls.items():
        if not callable(make):
            print(f"{IMPLEMENTATIONS[name]}: skipped, {make}")
    impls = {k: v for k, v in impls.items() if callable(v)}
    print("y vs float64 reference, 2 x 1101 tokens: "
          + ", ".join(f"{IMPLEMENTATIONS[k]} {v}" for k, v in _peer_check(impls).items()))
    bw = _copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); H={H} P=N={P} chunk {CHUNK}, "
          f"bf16 x, dt, B, C; fp32 A, dt_bias; {rounds} interleaved rounds, each a do_bench "
          "median; cells: median (min-max) x byte floor")
    results = {}                                     # (shape, name, "fwd"/"fwd+bwd") -> [ms]
    for b, l in shapes:
        print(f"[{time.perf_counter() - start:.0f} s] {b} x {l}")
        ins = _random_inputs(b, l, H, P, N, torch.bfloat16, "cuda")
        dy = torch.randn_like(ins["x"])
        runs = {}
        for name, make in impls.items():
            if name == "torch" and b * l > 16384:
                continue                             # its (b, h, c, Q, Q) scores: memory
            fwd, fwd_bwd, leaves = make(ins, dy)
            runs[name, "fwd"] = (fwd, None)
            if fwd_bwd is not None:
                runs[name, "fwd+bwd"] = (fwd_bwd, leaves)
        for r in range(rounds):
            done = []                                # printed as it goes: a cut run still tells
            for key, (fn, leaves) in list(runs.items()):
                try:
                    t = do_bench(fn, grad_to_none=leaves, return_mode="median")
                except Exception as e:  # noqa: BLE001  (e.g. a peer's backward on this GPU)
                    print(f"{IMPLEMENTATIONS[key[0]]} {key[1]} at {b} x {l} failed: "
                          f"{type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100]}")
                    del runs[key]
                    continue
                results.setdefault(((b, l),) + key, []).append(t)
                done.append(f"{IMPLEMENTATIONS[key[0]]} {key[1]} {t:.3f}")
            print(f"{b} x {l}, round {r + 1}, ms: " + ", ".join(done))
        del ins, dy, runs
        torch.cuda.empty_cache()
    names = list(impls)
    print(f"[{time.perf_counter() - start:.0f} s] done")
    for kind, which in (("fwd", 0), ("fwd+bwd", 1)):
        print(f"\n{kind}, ms: median (min-max) over {rounds} rounds, x the byte floor\n")
        print("| b x l | floor ms | " + " | ".join(IMPLEMENTATIONS[k] for k in names) + " |")
        print("|---" * (len(names) + 2) + "|")
        for b, l in shapes:
            floor_ms = _floor_bytes(b, l)[which] / bw * 1e3
            cells = [_cell(results.get(((b, l), name, kind), []), floor_ms) for name in names]
            print(f"| {b} x {l} | {floor_ms:.3f} | " + " | ".join(cells) + " |")


def _first_call(name, peers):
    """Run `python scan_fast.py --first-call NAME` in a fresh process with its own empty
    Triton cache; returns its (fwd, fwd+bwd) seconds as strings."""
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, os.path.abspath(__file__), "--first-call", name]
        if peers:
            cmd += ["--peers", peers]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "TRITON_CACHE_DIR": cache})
            got = json.loads(run.stdout.strip().splitlines()[-1])
        except Exception as e:  # noqa: BLE001
            return [f"failed ({type(e).__name__})", ""]
    return [got.get(k, "-") for k in ("fwd", "fwd+bwd")]


def _first_call_child(name, peers):
    """The child of _first_call: times one implementation's first calls, prints JSON."""
    make = _implementations(peers, [name])[name]
    if not callable(make):
        print(json.dumps({"fwd": make, "fwd+bwd": ""}))
        return
    ins = _random_inputs(*FIRST_CALL_SHAPE, H, P, N, torch.bfloat16, "cuda")
    fwd, fwd_bwd, _ = make(ins, torch.randn_like(ins["x"]))
    out = {}
    for key, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if fn is None:
            out[key] = "-"
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize()
            out[key] = f"{time.perf_counter() - t0:.1f}"
        except Exception as e:  # noqa: BLE001
            out[key] = f"failed ({type(e).__name__})"
    print(json.dumps(out))


def probe():
    """Compile every fast kernel (bf16 and fp32) and print its registers, spills and shared
    memory: the numbers behind docs/kernel_log.md's register notes."""
    for dtype in (torch.bfloat16, torch.float32):
        ins = _random_inputs(1, 1024, 2, P, N, dtype, "cuda", requires_grad=True)
        y, f = ssd(**ins, backend="triton")
        (y.float().sum() + f.sum()).backward()
        with torch.no_grad():
            ssd(**ins, backend="simple")
    torch.cuda.synchronize()
    kernels = (_state_kernel, _pass_kernel, _scan_kernel, _states_kernel, _bwd_grad_kernel,
               _bwd_dt_kernel, scan_kernel._simple_scan_kernel)
    for fn in kernels:
        for caches in fn.device_caches.values():
            for key, k in caches[0].items():
                ptx = k.asm.get("ptx", "")                              # tensor-core instructions
                print(f"{fn.fn.__name__:20s} regs {getattr(k, 'n_regs', -1):4d} "
                      f"spills {getattr(k, 'n_spills', -1):5d} smem {k.metadata.shared:7d} "
                      f"warps {k.metadata.num_warps} wgmma {ptx.count('wgmma.mma_async'):3d} "
                      f"mma.sync {ptx.count('mma.sync'):3d} key {str(key)[:100]}")


def main():
    p = ArgumentParser(description="Validate and benchmark the Triton SSD scans on a GPU")
    p.add_argument("--peers", help="a folder holding mamba_ssm/, fla/ (and einops/) to time "
                   "beside ours; it goes first on sys.path. Without it: whatever is installed")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--shapes", default=",".join(f"{b}x{l}" for b, l in SHAPES),
                   help="batch x length pairs, comma-separated")
    p.add_argument("--part", default="all", choices=["times", "first-call", "all"],
                   help="the timings, the first calls in fresh processes (compilation), or both")
    p.add_argument("--only", default=",".join(IMPLEMENTATIONS),
                   help="implementations to run, comma-separated: " + ",".join(IMPLEMENTATIONS))
    p.add_argument("--probe", action="store_true", help="print each kernel's registers, "
                   "spills and shared memory instead of benchmarking")
    p.add_argument("--first-call", choices=list(IMPLEMENTATIONS),
                   help=argparse.SUPPRESS)                             # the child process
    args = p.parse_args()
    if args.first_call:
        return _first_call_child(args.first_call, args.peers)
    if args.probe:
        if not torch.cuda.is_available():
            raise InputError("--probe compiles the kernels for a CUDA GPU: none here")
        return probe()
    benchmark(args.peers, args.rounds, parse_shapes(args.shapes), args.part,
              parse_only(args.only))


def parse_only(text):
    """'fast,mamba_ssm' -> ['fast', 'mamba_ssm']; an InputError for an unknown id."""
    only = [k for k in text.split(",") if k]
    unknown = [k for k in only if k not in IMPLEMENTATIONS]
    if unknown or not only:
        raise InputError(f"--only {text!r}: choose from {','.join(IMPLEMENTATIONS)}")
    return only


def parse_shapes(text):
    """'16x1024,8x2048' -> ((16, 1024), (8, 2048)); an InputError for anything else."""
    try:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise InputError(f"--shapes {text!r}: give batch x length pairs, e.g. 16x1024,1x65536")
    return shapes


if __name__ == "__main__":
    import scan_fast                     # one copy of this module: scan_kernel.ssd imports it by
    run_cli(scan_fast.main)              # name, and the benchmark, probe and tests use that one
