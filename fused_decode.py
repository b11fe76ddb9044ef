"""
One decoding token of a whole model (teacher, hybrid or linear) in five Triton kernels per
layer: the fast path behind the paper's Figure 1 (arXiv 2502.13145 Sec. 5.3, Fig. 1;
docs/method.md §7), next to the PyTorch step in mmmamba.py that it must reproduce
(tests/test_fused_decode.py, in Triton's interpreter).

Why a separate path: at batch 1 every weight is read once per token and used once, so a
step can go no faster than reading the weights (4.4-4.7 GB for the paper preset). The
PyTorch step, compiled and replayed as a CUDA graph, runs 14-18 kernels per layer; the
matmuls of one token reach 1.9-2.4 TB/s and every small kernel between them (norms, conv,
RoPE, cache writes, gates, residual adds) costs 1.5-3 us (docs/bench_log.md). Here each
matmul carries the elementwise work before and after it:

    Mamba-2 layer                                    attention layer
    1 RMSNorm -> [x B C dt gate] -> conv, SiLU       1 RMSNorm -> [q k v] -> RoPE -> KV cache
    2 state update, y = S C  (scan_kernel's step)    2 attention over the cache (PyTorch SDPA,
                                                       or split over the keys: ATTENTION)
    3 per-head RMSNorm, gate -> W_O -> + residual    3 W_O -> + residual
    4 RMSNorm -> [w1 w3] -> silu(a) * b              4, 5 the same MLP
    5 w2 -> + residual
and the final RMSNorm -> LM head. Each matmul is a matrix-vector product: a program owns
BR rows of the weight and walks the whole input in blocks of BK (fp32 accumulation). The
projections that read the same input are stacked into one matrix (pack_for_decoding).

Glossary as mmmamba.py: D d_model, H / Hkv heads, hd head dim (P = N), F d_mlp, V vocab,
K conv width; "rows" are output features, the weight is (rows, D) row-major.
"""
import os
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

import scan_kernel as sk
from scan_fast import _sms
from mmmamba import Attention
from util import InputError
from scan_kernel import HAS_TRITON, tl, triton

# Launch settings per matrix: rows per program (a paired kernel reads BR / 2 pairs), inputs
# per block, warps; from the sweep on the H200 (docs/benchmarks.md; the H100's, in
# docs/bench_log.md, were 4-32 rows and 8 warps). "qkv": attention's [q k v]; "in": Mamba-2's
# [x B C dt gate]; "mlp": [w1 w3]; "out": W_O; "w2"; "head": the LM head.
CONFIG = {"qkv": (8, 1024, 8), "in": (8, 512, 4), "mlp": (8, 512, 4), "out": (8, 2048, 4),
          "w2": (8, 4096, 4), "head": (4, 2048, 4)}
STEP_BP = 32            # rows of the state per program in the SSM step (scan_kernel._step_kernel)
# Programmatic dependent launch (Hopper on): each kernel may start while the one before it
# finishes, and reads its first block of weights before it waits for that kernel's output.
PDL = True
# The teacher's attention of one token: "sdpa" (PyTorch's scaled_dot_product_attention) or
# "split" (_attend_kernel and _combine_kernel) over fewer than SPLIT_KEYS keys, sdpa beyond;
# the split kernels launch early under PDL below ATTEND_PDL_KEYS, plainly beyond: launched early
# at 16K-128K keys they cost the teacher's step 2.5-10% (placed on the SMs while the qkv kernel
# still runs, our reading). The teacher's step on the H200 (docs/decode_study/fused_study.py
# attention-pdl, docs/bench_log.md v7): 1.51 against SDPA's 1.55 ms at 1K, 2.04 against 2.07
# at 16K, 2.538 against 2.537 at 32K.
ATTENTION = "split"
SPLIT_KEYS = 32768
ATTEND_PDL_KEYS = 8192
ATTEND_BT = 64          # keys per step of _attend_kernel; its splits: about 2 programs per SM
STEP_PDL = True         # the SSM step under PDL too (_ssm_step_kernel); False: launched plainly


@triton.jit
def _block(acc, ss, w, k, K, u_ptr, g_ptr, z_ptr, eps, BK: tl.constexpr, NORM: tl.constexpr,
           GS: tl.constexpr):
    """One block of _matvec: acc += w v[k] for the (BR, BK) weights w of inputs k."""
    k_ok = k < K
    u = tl.load(u_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if NORM == 1:
        ss += u * u
        u = u * tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    if NORM == 2:
        heads = tl.reshape(u, (BK // GS, GS))                               # (heads in block, hd)
        r = tl.rsqrt(tl.sum(heads * heads, axis=1) / GS + eps)
        z = tl.load(z_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        u = tl.reshape(heads * r[:, None], (BK,)) * g * z * tl.sigmoid(z)
    return acc + tl.sum(w.to(tl.float32) * u[None, :], axis=1), ss


@triton.jit
def _matvec(w_ptr, rows, row_ok, K, u_ptr, g_ptr, z_ptr, eps, BR: tl.constexpr,
            BK: tl.constexpr, NORM: tl.constexpr, GS: tl.constexpr, PDL: tl.constexpr,
            r_ptr=None, RES: tl.constexpr = False):
    """acc[r] = sum_k W[rows[r], k] v[k], v made from u on the fly:
        NORM 0: v = u
        NORM 1: v = RMSNorm(u) * g. The norm of the whole vector is one scalar, so it is
                applied to acc at the end: no pass over u before the matmul.
        NORM 2: v = RMSNorm of each group of GS (a head) * g * silu(z): Mamba-2's gated norm
                (BK is a multiple of GS, so every block holds whole heads).
    PDL: the next kernel may launch now, and the weights do not depend on the kernel before,
    so the first block is loaded before waiting for that kernel to finish; everything this
    kernel reads or writes that another kernel writes or reads comes after the wait.
    RES: acc starts from r[rows] (the residual), read right after the wait: read after the
    loop, its latency would lengthen every program's tail (docs/bench_log.md v14)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BR], dtype=tl.float32)
    ss = tl.zeros([BK], dtype=tl.float32)
    k = tl.arange(0, BK)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * K + k[None, :]          # (BR, BK) pointers
    w = tl.load(w_rows, mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if RES:
        acc += tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    acc, ss = _block(acc, ss, w, k, K, u_ptr, g_ptr, z_ptr, eps, BK, NORM, GS)
    for k0 in range(BK, K, BK):
        w = tl.load(w_rows + k0, mask=row_ok[:, None] & (k0 + k < K)[None, :], other=0.0)
        acc, ss = _block(acc, ss, w, k0 + k, K, u_ptr, g_ptr, z_ptr, eps, BK, NORM, GS)
    if NORM == 1:
        acc = acc * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    return acc


@triton.jit
def _pair_rows(BR: tl.constexpr, HALF):
    """Rows for BR pairs (a, a + HALF), interleaved: pair i of this program is acc[2i], acc[2i+1].
    The pairs: RoPE's two halves of each head (HALF = hd / 2), SwiGLU's w1 and w3 (HALF = F)."""
    r = tl.arange(0, 2 * BR)
    i = tl.program_id(0) * BR + r // 2                                      # pair index
    return i, (i // HALF) * 2 * HALF + i % HALF + (r % 2) * HALF


@triton.jit
def _linear_kernel(w_ptr, u_ptr, g_ptr, z_ptr, out_ptr, N, K, eps, BR: tl.constexpr,
                   BK: tl.constexpr, NORM: tl.constexpr, GS: tl.constexpr, RESIDUAL: tl.constexpr,
                   PDL: tl.constexpr):
    """out = W v (the LM head), or out += W v in place (W_O, w2: the residual add)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    acc = _matvec(w_ptr, rows, rows < N, K, u_ptr, g_ptr, z_ptr, eps, BR, BK, NORM, GS, PDL,
                  out_ptr, RESIDUAL)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _swiglu_kernel(w_ptr, u_ptr, g_ptr, out_ptr, F, K, eps, BR: tl.constexpr, BK: tl.constexpr,
                   PDL: tl.constexpr):
    """out = silu(w1 v) * (w3 v), v = RMSNorm(u) * g; w_ptr is [w1; w3] stacked (2F, K)."""
    i, rows = _pair_rows(BR, F)
    acc = _matvec(w_ptr, rows, i < F, K, u_ptr, g_ptr, g_ptr, eps, 2 * BR, BK, 1, 1, PDL)
    a, b = tl.split(tl.reshape(acc, (BR, 2)))
    i = tl.program_id(0) * BR + tl.arange(0, BR)
    tl.store(out_ptr + i, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=i < F)


@triton.jit
def _store_halves(ptr, offs, a, b, mask, HALF: tl.constexpr):
    """Write the pairs (a, b) of RoPE's halves back to a head's dims d and d + HALF."""
    tl.store(ptr + offs, a.to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + offs + HALF, b.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_kernel(w_ptr, u_ptr, g_ptr, freq_ptr, q_ptr, k_ptr, v_ptr, pos, max_len, K, eps,
                H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, BR: tl.constexpr,
                BK: tl.constexpr, PDL: tl.constexpr):
    """[q; k; v] = W v, v = RMSNorm(u) * g, then RoPE at `pos` on q and k (rotate-half: the
    pair (a, b) = (x_d, x_{d + hd/2}) turns by pos * freq_d), q to q_ptr, k and v into the
    KV cache (1, Hkv, max_len, hd) at `pos`. One program: BR pairs of rows. The angles come
    first, so that no load is left for after the matvec (as _mamba_in_kernel's conv)."""
    HALF: tl.constexpr = HD // 2
    i, rows = _pair_rows(BR, HALF)
    n_pairs = (H + 2 * HKV) * HALF
    j = tl.program_id(0) * BR + tl.arange(0, BR)                            # pair index
    head, d = j // HALF, j % HALF
    angle = pos * tl.load(freq_ptr + d)
    cos, sin = tl.cos(angle), tl.sin(angle)
    acc = _matvec(w_ptr, rows, i < n_pairs, K, u_ptr, g_ptr, g_ptr, eps, 2 * BR, BK, 1, 1, PDL)
    a, b = tl.split(tl.reshape(acc, (BR, 2)))
    ok = j < n_pairs
    turn = head < H + HKV                                                   # q and k heads, not v
    a, b = tl.where(turn, a * cos - b * sin, a), tl.where(turn, b * cos + a * sin, b)
    kv_off = ((head - H) % HKV * max_len + pos).to(tl.int64) * HD + d
    _store_halves(q_ptr, head * HD + d, a, b, ok & (head < H), HALF)
    _store_halves(k_ptr, kv_off, a, b, ok & turn & (head >= H), HALF)
    _store_halves(v_ptr, kv_off, a, b, ok & (head >= H + HKV), HALF)


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, pos, max_len, span, scale,
                   REP: tl.constexpr, RP: tl.constexpr, HD: tl.constexpr, BT: tl.constexpr,
                   PDL: tl.constexpr):
    """Attention of one query, split over the keys (flash-decoding): program (g, s) reads KV
    head g's keys and values [s * span, (s + 1) * span) up to pos once for the REP query heads
    that share them, keeping a running max m, sum l and unnormalised output per head (online
    softmax); _combine_kernel merges the splits. The REP heads' rows are padded to RP (at least
    16) so both products go to the tensor cores: (RP, HD) @ (HD, BT), then (RP, BT) @ (BT, HD).
    At batch 1 one program per head (PyTorch's kernel) leaves most of the GPU idle at short
    contexts. PDL: the first block is read before the wait (docs/bench_log.md v10; launched
    plainly, the loop is as before: reading ahead there cost 4-7% at 8K-16K keys)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    g, s = tl.program_id(0), tl.program_id(1)
    r, d = tl.arange(0, RP), tl.arange(0, HD)
    heads = g * REP + r
    base = g.to(tl.int64) * max_len * HD
    hi = tl.minimum((s + 1) * span, pos + 1)
    if PDL:
        # the first block's keys and values before the wait, as the weights elsewhere: those
        # before pos were written by earlier steps, which all ended before this step's first
        # kernel (a plain one: the embedding's gather) began; the key and value at pos after it
        t = s * span + tl.arange(0, BT)
        kv = base + t[:, None].to(tl.int64) * HD + d[None, :]
        early = (t < hi)[:, None] & (t < pos)[:, None]
        k = tl.load(k_ptr + kv, mask=early, other=0.0)
        v = tl.load(v_ptr + kv, mask=early, other=0.0)
        tl.extra.cuda.gdc_wait()                    # q, and k and v at pos, from _qkv_kernel
        k += tl.load(k_ptr + kv, mask=(t == pos)[:, None], other=0.0)
        v += tl.load(v_ptr + kv, mask=(t == pos)[:, None], other=0.0)
    q = tl.load(q_ptr + heads[:, None] * HD + d[None, :], mask=(r < REP)[:, None],
                other=0.0)                                                  # (RP, HD)
    m = tl.full((RP,), float("-inf"), tl.float32)
    l = tl.zeros((RP,), tl.float32)
    acc = tl.zeros((RP, HD), tl.float32)
    for t0 in range(s * span, hi, BT):
        t = t0 + tl.arange(0, BT)
        ok = t < hi
        if PDL:
            if t0 > s * span:                       # the first block is already loaded
                kv = base + t[:, None].to(tl.int64) * HD + d[None, :]
                k = tl.load(k_ptr + kv, mask=ok[:, None], other=0.0)
                v = tl.load(v_ptr + kv, mask=ok[:, None], other=0.0)
        else:
            kv = base + t[:, None].to(tl.int64) * HD + d[None, :]
            k = tl.load(k_ptr + kv, mask=ok[:, None], other=0.0)            # (BT, HD)
        score = tl.where(ok[None, :], tl.dot(q, tl.trans(k)).to(tl.float32) * scale,
                         float("-inf"))                                     # (RP, BT)
        m_new = tl.maximum(m, tl.max(score, axis=1))    # finite: t0 itself is a key
        p = tl.exp(score - m_new[:, None])
        alpha = tl.exp(m - m_new)
        if not PDL:
            v = tl.load(v_ptr + kv, mask=ok[:, None], other=0.0)
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m = m_new
    part = heads * tl.num_programs(1) + s
    tl.store(m_ptr + part, m, mask=r < REP)
    tl.store(l_ptr + part, l, mask=r < REP)
    tl.store(acc_ptr + part[:, None] * HD + d[None, :], acc, mask=(r < REP)[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, y_ptr, S, HD: tl.constexpr, BS: tl.constexpr,
                    PDL: tl.constexpr):
    """y of one head from _attend_kernel's S splits: each split's sum and output rescaled by
    exp(its max - the largest), the output divided by the sum (an empty split: max -inf,
    weight 0)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    h = tl.program_id(0)
    s, d = tl.arange(0, BS), tl.arange(0, HD)
    ok = s < S
    m = tl.load(m_ptr + h * S + s, mask=ok, other=float("-inf"))
    w = tl.exp(m - tl.max(m, axis=0))
    l = tl.sum(tl.load(l_ptr + h * S + s, mask=ok, other=0.0) * w, axis=0)
    acc = tl.load(acc_ptr + (h * S + s)[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)
    tl.store(y_ptr + h * HD + d, (tl.sum(acc * w[:, None], axis=0) / l).to(y_ptr.dtype.element_ty))


@triton.jit
def _ssm_step_kernel(s_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, y_ptr, H, P, N,
                     BP: tl.constexpr, BN: tl.constexpr, REP: tl.constexpr, PDL: tl.constexpr):
    """scan_kernel's one-token state update in place, made a PDL kernel: it launches while
    _mamba_in_kernel finishes and lets the W_O kernel launch (and read its first weights)
    while it runs, instead of two plain launches, each waiting for the kernel before to end."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()                    # x, B, C, dt from _mamba_in_kernel
    sk._step_kernel(s_ptr, s_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, y_ptr, H, P,
                    N, BP, BN, True, REP)


@triton.jit
def _mamba_in_kernel(w_ptr, u_ptr, g_ptr, conv_ptr, cw_ptr, cb_ptr, out_ptr, N, K, CONV, eps,
                     KC: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                     PDL: tl.constexpr):
    """[x B C dt gate] = W v, v = RMSNorm(u) * g; then the causal conv of width KC (KP: the
    next power of two) and SiLU on the CONV channels of x, B, C, the conv state (KC - 1, CONV)
    shifted by one token in place. dt and gate rows go out raw (the step kernel adds dt_bias
    and softplus). Each channel belongs to one program, which reads its old state before it
    writes the new. The conv's weights and state are read before the matvec, so no load is
    left for its tail; under PDL before the wait, as the weights: the state was written by
    earlier steps, which ended before this step's first kernel (a plain one) began."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    c_ok = rows < CONV
    ch, k = rows[:, None], tl.arange(0, KP)[None, :]                       # (BR, KP) tiles
    cw = tl.load(cw_ptr + ch * KC + k, mask=c_ok[:, None] & (k < KC), other=0.0).to(tl.float32)
    conv = tl.load(cb_ptr + rows, mask=c_ok, other=0.0).to(tl.float32)
    old = tl.load(conv_ptr + k * CONV + ch, mask=c_ok[:, None] & (k < KC - 1), other=0.0)
    acc = _matvec(w_ptr, rows, rows < N, K, u_ptr, g_ptr, g_ptr, eps, BR, BK, 1, 1, PDL)
    window = tl.where(k == KC - 1, acc[:, None], old.to(tl.float32))  # column j: token t-KC+1+j
    conv += tl.sum(cw * window, axis=1)
    for j in tl.static_range(KC - 1):                               # the state one token on
        new = tl.sum(tl.where(k == j + 1, window, 0.0), axis=1)
        tl.store(conv_ptr + j * CONV + rows, new.to(conv_ptr.dtype.element_ty), mask=c_ok)
    out = tl.where(c_ok, conv * tl.sigmoid(conv), acc)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=rows < N)


# -----------------------------------------------------------------------------
# weight packing: one matrix per group of projections that read the same input

_PACKED = weakref.WeakKeyDictionary()          # module -> the matrix its group's weights view


def _groups(layer):
    """(owner, Linear layers read from one input) of a decoder layer: q, k, v; or x, B, C, dt,
    gate; and the MLP's w1, w3. The row order is the kernels' (_qkv_kernel, _mamba_in_kernel)."""
    m, mlp = layer.mixer, layer.mlp
    mixer = ((m.q_proj, m.k_proj, m.v_proj) if isinstance(m, Attention) else
             (m.x_proj, m.b_proj, m.c_proj, m.dt_proj, m.g_proj))
    return (m, mixer), (mlp, (mlp.w1, mlp.w3))


def _packed_intact(w, group):
    """Are the group's weights still consecutive row blocks of w (not replaced by .to() or
    by assigning new parameters since packing)?"""
    offset = 0
    for lin in group:
        p = lin.weight
        if p.dtype != w.dtype or p.device != w.device or p.data_ptr() != w.data_ptr() + offset:
            return False
        offset += p.numel() * p.element_size()
    return offset == w.numel() * w.element_size()


@torch.no_grad()
def pack_for_decoding(model):
    """Inference only, after .to(device, dtype): stack the weights of each group of
    projections that read the same input into one matrix and make each weight a view of its
    rows, so that a group is one matmul (at one token a launch costs ~3 us before it moves a
    byte, and these are small: docs/bench_log.md). The parameters and state_dict stay the
    same and no memory is added; the model's own forward is unchanged. Returns, per layer,
    (the mixer's matrix, the MLP's [w1; w3]). Packing a packed model again costs nothing."""
    out = []
    for layer in model.layers:
        mats = []
        for owner, group in _groups(layer):
            w = _PACKED.get(owner)
            if w is None or not _packed_intact(w, group):
                w = torch.cat([lin.weight for lin in group])
                for lin, rows in zip(group, w.split([lin.out_features for lin in group])):
                    lin.weight = nn.Parameter(rows, requires_grad=lin.weight.requires_grad)
                _PACKED[owner] = w
            mats.append(w)
        out.append(tuple(mats))
    return out


# -----------------------------------------------------------------------------
# launching: one Decoder per model, one step per token


def attend(q, k, v, pos, H, pdl=False):
    """softmax(q K^T / sqrt(hd)) V of one token's q (H * hd,) over the cache's keys and values
    (1, Hkv, max_len, hd) at positions 0..pos, query head h on KV head h // (H / Hkv) (as
    scaled_dot_product_attention's enable_gqa). Returns (H * hd,) in q's dtype. pdl: launched
    early behind the kernel that writes q and the key and value at pos; the keys and values
    before pos are then read before that kernel ends, so no kernel still running may write
    them (in Decoder.step, earlier steps wrote them)."""
    _, Hkv, max_len, hd = k.shape
    REP, BT = H // Hkv, ATTEND_BT
    blocks = triton.cdiv(pos + 1, BT)
    span = BT * triton.cdiv(blocks, min(blocks, triton.cdiv(2 * _sms(q.device), Hkv)))
    S = triton.cdiv(pos + 1, span)
    m, l = (torch.empty(H, S, device=q.device, dtype=torch.float32) for _ in "ml")
    acc = torch.empty(H, S, hd, device=q.device, dtype=torch.float32)
    opts = _launch(pdl)
    _attend_kernel[(Hkv, S)](q, k, v, m, l, acc, pos, max_len, span, hd ** -0.5, REP=REP,
                             RP=max(16, sk._pow2(REP)), HD=hd, BT=BT, **opts)
    y = torch.empty_like(q)
    _combine_kernel[(H,)](m, l, acc, y, S, HD=hd, BS=sk._pow2(S), **opts)
    return y


def _settings(kind, K, pdl, GS=1):
    """(BR, BK, launch options) for a matrix of K inputs: BK no wider than K needs, whole heads."""
    BR, BK, warps = CONFIG[kind]
    return BR, max(min(BK, sk._pow2(K)), GS), dict(num_warps=warps) | _launch(pdl)


def _launch(pdl):
    """The PDL flag every kernel here takes, and the launch option that enables it."""
    return dict(PDL=pdl) | (dict(launch_pdl=True) if pdl else {})


class Decoder:
    """decoder.step(token, cache) == model(token, None, cache) for a (1, 1) token, in five
    kernels per layer. Needs triton, CUDA (or TRITON_INTERPRET=1 with float32), batch 1, and
    head_dim a power of two. The weights are read where they are (packed here), but A =
    -exp(A_log) and the gated norm's weight repeated per head are taken once: after changing
    the weights, make a new Decoder."""

    def __init__(self, model):
        cfg = self.cfg = model.cfg
        if not HAS_TRITON:
            raise InputError("the fused decoder needs the triton package: pip install triton")
        if cfg.head_dim & (cfg.head_dim - 1):
            raise InputError(f"the fused decoder needs head_dim a power of two, got "
                             f"{cfg.head_dim}: decode with the model itself")
        p = model.output.weight
        if not p.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError("the fused decoder runs on a CUDA GPU (on the CPU only in Triton's "
                             "interpreter: TRITON_INTERPRET=1 before Python starts, slow)")
        if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InputError(f"the fused decoder runs fp16, bf16 or fp32 models, not {p.dtype}")
        self.model, self.packed = model, pack_for_decoding(model)
        self.pdl = PDL and p.is_cuda and torch.cuda.get_device_capability(p.device)[0] >= 9
        hd, self.extra = cfg.head_dim, []
        for layer in model.layers:
            m = layer.mixer
            if isinstance(m, Attention):
                # the RoPE frequencies of this layer's base (HoVLE's two stacks differ), as
                # mmmamba.rope computes them (same fp32 angles)
                exps = torch.arange(0, hd, 2, device=p.device, dtype=torch.float32) / hd
                self.extra.append(1.0 / m.rope_theta ** exps)
            else:
                # Mamba-2's A = -exp(a) (the step kernel takes A), and the gated norm's one
                # [hd] weight repeated for every head (the out kernel indexes it by channel)
                self.extra.append((-torch.exp(m.A_log.float()), m.norm.weight.repeat(cfg.n_head)))

    def _linear(self, w, u, out, kind, norm=0, g=None, z=None, residual=False, eps=0.0):
        N, K = w.shape
        GS = self.cfg.head_dim if norm == 2 else 1
        BR, BK, opts = _settings(kind, K, self.pdl, GS)
        g, z = (t if t is not None else u for t in (g, z))               # unread pointers
        _linear_kernel[(triton.cdiv(N, BR),)](w, u, g, z, out, N, K, eps, BR=BR, BK=BK, NORM=norm,
                                              GS=GS, RESIDUAL=residual, **opts)

    def _attention(self, layer, w, x, c, pos, freq):
        cfg, m = self.cfg, layer.mixer
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        BR, BK, opts = _settings("qkv", cfg.d_model, self.pdl)
        q = torch.empty(H * hd, device=x.device, dtype=x.dtype)
        norm = layer.attention_norm
        _qkv_kernel[(triton.cdiv((H + 2 * Hkv) * hd // 2, BR // 2),)](
            w, x, norm.weight, freq, q, c["k"], c["v"], pos, c["k"].shape[2], cfg.d_model,
            norm.eps, H=H, HKV=Hkv, HD=hd, BR=BR // 2, BK=BK, **opts)
        if ATTENTION == "split" and pos < SPLIT_KEYS:
            y = attend(q, c["k"], c["v"], pos, H, self.pdl and pos < ATTEND_PDL_KEYS)
        else:
            y = F.scaled_dot_product_attention(q.view(1, H, 1, hd), c["k"][:, :, :pos + 1],
                                               c["v"][:, :, :pos + 1], enable_gqa=True)
        self._linear(m.o_proj.weight, y.reshape(-1), x, "out", residual=True)

    def _mamba(self, layer, w, x, c, A, norm_weight):
        cfg, m = self.cfg, layer.mixer
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        BR, BK, opts = _settings("in", cfg.d_model, self.pdl)
        N, conv_dim = w.shape[0], m.conv_dim
        zx = torch.empty(N, device=x.device, dtype=torch.float32)      # [x B C] conv'd, dt, gate
        _mamba_in_kernel[(triton.cdiv(N, BR),)](
            w, x, layer.attention_norm.weight, c["conv"], m.conv1d.weight, m.conv1d.bias, zx,
            N, cfg.d_model, conv_dim, layer.attention_norm.eps, KC=cfg.conv_kernel,
            KP=triton.next_power_of_2(cfg.conv_kernel), BR=BR, BK=BK, **opts)
        y = torch.empty(H * hd, device=x.device, dtype=torch.float32)
        BP = min(STEP_BP, sk._pow2(hd))
        _ssm_step_kernel[(H, triton.cdiv(hd, BP))](
            c["ssm"], zx, zx[conv_dim:], m.dt_bias, A, zx[Hkv * hd:], zx[2 * Hkv * hd:], y, H, hd,
            hd, BP=BP, BN=sk._pow2(hd), REP=H // Hkv, num_warps=4, **_launch(self.pdl and STEP_PDL))
        self._linear(m.o_proj.weight, y, x, "out", norm=2, g=norm_weight, z=zx[conv_dim + H:],
                     residual=True, eps=m.norm.eps)

    def _mlp(self, layer, w, x):
        F_, K = w.shape[0] // 2, w.shape[1]
        BR, BK, opts = _settings("mlp", K, self.pdl)
        h = torch.empty(F_, device=x.device, dtype=x.dtype)
        _swiglu_kernel[(triton.cdiv(F_, BR // 2),)](w, x, layer.ffn_norm.weight, h, F_, K,
                                                    layer.ffn_norm.eps, BR=BR // 2, BK=BK, **opts)
        self._linear(layer.mlp.w2.weight, h, x, "w2", residual=True)

    @torch.no_grad()
    def step(self, token, cache):
        """token: (1, 1) int64 on the model's device. Returns logits (1, 1, V); advances cache."""
        model, pos = self.model, cache.pos
        if token.shape != (1, 1) or next(iter(cache.layers[0].values())).shape[0] != 1:
            raise InputError(f"the fused decoder takes one token of one sequence, (1, 1), and a "
                             f"cache of batch 1, got {tuple(token.shape)}: decode larger batches "
                             "with the model itself")
        if pos + 1 > cache.max_len:
            raise InputError(f"position {pos} is past the cache's {cache.max_len} tokens: make a "
                             "larger cache (model.new_cache(1, max_len))")
        x = model.tok_embeddings.weight[token.view(1)].view(-1)        # (D,) the residual stream
        for layer, c, (w_mix, w_mlp), extra in zip(model.layers, cache.layers, self.packed,
                                                   self.extra):
            if layer.kind == "A":
                self._attention(layer, w_mix, x, c, pos, extra)
            else:
                self._mamba(layer, w_mix, x, c, *extra)
            self._mlp(layer, w_mlp, x)
        logits = torch.empty(model.output.weight.shape[0], device=x.device, dtype=x.dtype)
        self._linear(model.output.weight, x, logits, "head", norm=1, g=model.norm.weight,
                     eps=model.norm.eps)
        cache.pos += 1
        return logits.view(1, 1, -1)
