"""The models: the Mamba-2 layer and its gated norm against formulas written out here in
float64; cached decode == full forward, for the teacher, Mamba-2 layers and hybrids, with
and without HoVLE's embedding stack; the image embedding (pixel shuffle order, splicing);
input checks."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import mmmamba
from mmmamba import (IMAGE_ID, IMG_END_ID, IMG_START_ID, PRESETS, Config, GatedRMSNorm, Mamba2,
                     Model, expand_image_placeholder, pixel_shuffle, rope)
from seed import hybrid_layout
from util import InputError

CFG = Config(vocab_size=97, n_layer=4, d_model=48, n_head=4, n_kv_head=2, head_dim=12, d_mlp=64,
             max_seq_len=64, img_size=8, img_patch=4, img_dim=16, chunk_size=8,
             scan_backend="torch")


def randomize(model, seed=0):
    """Random weights everywhere (no zeros, no identity convs) so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        for m in model.modules():
            if isinstance(m, Mamba2):
                m.A_log.copy_(torch.rand(m.A_log.shape, generator=g, dtype=m.A_log.dtype))
    return model


def prompt(T, seed=0, with_image=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, CFG.vocab_size, (T,), generator=g).tolist()
    if with_image:
        ids[2] = IMAGE_ID
        ids = expand_image_placeholder(ids, CFG.n_img_tokens)
    images = torch.rand(1, 3, CFG.img_size, CFG.img_size, generator=g, dtype=torch.float64) * 2 - 1
    return torch.tensor([ids]), images if with_image else None


@pytest.mark.parametrize("layout", ["AAAA", "MMMM", hybrid_layout(4, attn_every=2), "MMAM"])
@pytest.mark.parametrize("split", [7, 12])  # the prefill holds the image (slots 3..6)
def test_prefill_then_decode_equals_full_forward(layout, split):
    model = randomize(Model(replace(CFG, layout=layout))).double().eval()
    tokens, images = prompt(7)                                  # 7 + 4 image slots + 2 = 13 tokens
    T = tokens.shape[1]
    full = model(tokens, images)
    cache = model.new_cache(1)
    # prefill (holds the image), then the rest one token at a time
    outs = [model(tokens[:, :split], images, cache)]
    outs += [model(tokens[:, t:t + 1], None, cache) for t in range(split, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)
    assert cache.pos == T


def test_chunked_prefill_after_prefix_equals_full_forward():
    model = randomize(Model(replace(CFG, layout="AMAM")), seed=2).double().eval()
    tokens, images = prompt(20, seed=1)
    full = model(tokens, images)
    cache = model.new_cache(1)
    a = model(tokens[:, :10], images, cache)
    b = model(tokens[:, 10:], None, cache)                      # several tokens after a prefix
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-9, atol=1e-9)


def test_mamba_state_is_constant_size_and_carries_the_past():
    """A Mamba-2 layer's decoding state is K-1 conv inputs and one H x P x N matrix, counted
    here from the config, whatever the context; attention's grows by K and V per token. And
    the fixed-size state does carry the past: the first token changes the 30th logits."""
    H, Hkv, hd, K = CFG.n_head, CFG.n_kv_head, CFG.head_dim, CFG.conv_kernel
    per_layer = (K - 1) * (2 * Hkv + H) * hd + H * hd * hd
    mamba, teacher = Model(replace(CFG, layout="MMMM")), Model(CFG)
    for L in (16, 64):
        numel = lambda m: sum(t.numel() for c in m.new_cache(1, L).layers for t in c.values())
        assert numel(mamba) == 4 * per_layer
        assert numel(teacher) == 4 * 2 * Hkv * hd * L
    mamba = randomize(mamba, seed=7).double().eval()
    with torch.no_grad():                               # slow decay: A = -0.02 (A_log = -4)
        for block in mamba.layers:
            block.mixer.A_log.fill_(-4.0)
    tokens = torch.randint(6, CFG.vocab_size, (1, 30), generator=torch.Generator().manual_seed(7))
    other = tokens.clone()
    other[0, 0] = 6 if tokens[0, 0] != 6 else 7
    last = []
    for seq in (tokens, other):
        cache = mamba.new_cache(1)
        mamba(seq[:, :1], None, cache)
        last.append([mamba(seq[:, t:t + 1], None, cache) for t in range(1, 30)][-1])
    assert (last[0] - last[1]).abs().max() > 1e-6


def test_generate_streams_the_greedy_continuation():
    model = randomize(Model(replace(CFG, layout="AMMM")), seed=3).double().eval()
    tokens, images = prompt(5, seed=4)
    new = list(model.generate(tokens, images, max_new_tokens=6, stop_id=-1))
    assert len(new) == 6
    # the same tokens by full forwards, one argmax at a time
    seq = tokens
    for tok in new:
        logits = model(seq, images)[:, -1]
        logits[:, :4] = -torch.inf                      # pad and image tokens are never emitted
        assert int(logits.argmax()) == tok
        seq = torch.cat([seq, torch.tensor([[tok]])], 1)


def test_image_patches_land_at_the_placeholder():
    model = randomize(Model(CFG)).double()
    tokens, images = prompt(6, seed=5)
    x = model.embed(tokens, images)
    slots = (tokens[0] == IMAGE_ID).nonzero().flatten()
    assert tokens[0, slots[0] - 1] == IMG_START_ID and tokens[0, slots[-1] + 1] == IMG_END_ID
    torch.testing.assert_close(x[0, slots], model.vision(images)[0])
    others = tokens[0] != IMAGE_ID
    torch.testing.assert_close(x[0, others], model.tok_embeddings(tokens[0, others]))
    # raster order: the first slot is the top-left patch
    images2 = images.clone()
    images2[..., :4, :4] += 1.0
    changed = (model.embed(tokens, images2) - x).abs().sum(-1)[0]
    assert changed[slots[0]] > 0 and changed[slots[1:]].abs().max() == 0


def test_image_token_mismatch_is_a_clear_error():
    model = Model(CFG)
    tokens, images = prompt(6)
    with pytest.raises(InputError, match="image-token slots"):
        model(tokens[:, :-3].clone().fill_(IMAGE_ID), images.float())
    with pytest.raises(InputError, match="image-token slots"):
        model(tokens, None)
    with pytest.raises(InputError, match="exactly one <image>"):
        expand_image_placeholder([7, 8, 9], CFG.n_img_tokens)


def test_too_long_is_a_clear_error():
    model = Model(CFG)
    with pytest.raises(InputError, match="longer than"):
        model(torch.full((1, CFG.max_seq_len + 1), 7))


def test_hybrid_layouts():
    assert hybrid_layout(32, attn_every=4).count("A") == 8
    assert hybrid_layout(32, attn_every=4)[:5] == "AMMMA"
    assert hybrid_layout(6, attn_layers=[1, 5]) == "MAMMMA"
    assert hybrid_layout(4) == "MMMM"
    with pytest.raises(InputError, match="out of range"):
        hybrid_layout(4, attn_layers=[4])
    with pytest.raises(InputError, match="1 or more"):
        hybrid_layout(4, attn_every=0)


# -----------------------------------------------------------------------------
# the Mamba-2 layer, written out (arXiv 2502.13145 Sec. 3, Eq. 2; docs/method.md §2)


@torch.no_grad()
def gated_norm_by_hand(y, gate, weight, eps=1e-5):
    """y: (B, T, H, P), gate: (B, T, H*P), weight: (P,): loops, float64."""
    B, T, H, P = y.shape
    out = torch.empty(B, T, H * P, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                rms = math.sqrt(sum(float(v) ** 2 for v in y[b, t, h]) / P + eps)
                for p in range(P):
                    g = float(gate[b, t, h * P + p])
                    out[b, t, h * P + p] = float(y[b, t, h, p]) / rms * float(weight[p]) \
                        * g / (1 + math.exp(-g))
    return out


def test_gated_norm_is_per_head_with_one_shared_weight():
    g = torch.Generator().manual_seed(3)
    H, P = 3, 5
    norm = GatedRMSNorm(P, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(P, generator=g, dtype=torch.float64))
    # one head at the scale of eps, where eps 1e-5 (not, say, 1e-6) decides the result
    scale = torch.tensor([1.0, 3e-3, 0.2])[:, None]                   # per head
    y = torch.randn(2, 4, H, P, generator=g, dtype=torch.float64) * scale
    gate = torch.randn(2, 4, H * P, generator=g, dtype=torch.float64)
    want = gated_norm_by_hand(y, gate, norm.weight)
    torch.testing.assert_close(norm(y, gate), want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gated_norm_by_hand(y, gate, norm.weight, eps=1e-6), want, rtol=1e-3)
    # the model's layer: one weight of head_dim (checkpoint key ...mixer.norm.weight), eps 1e-5
    model = Model(replace(CFG, layout="MMMM", norm_eps=1e-2))
    assert model.state_dict()["layers.0.mixer.norm.weight"].shape == (CFG.head_dim,)
    assert model.layers[0].mixer.norm.eps == 1e-5


@torch.no_grad()
def mamba2_by_hand(m, u, state=None, past=None):
    """Steps 1-8 with loops over time and heads, float64: u (B, T, D); state (B, H, P, N) and
    past (B, K-1, conv channels) as a cache holds them. Returns out (B, T, D), state, past."""
    cfg = m.cfg
    H, Hkv, hd, K = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.conv_kernel
    B_, T, _ = u.shape
    xBC = torch.cat([u @ m.x_proj.weight.T, u @ m.b_proj.weight.T, u @ m.c_proj.weight.T], -1)
    seq = torch.cat([past if past is not None else xBC.new_zeros(B_, K - 1, xBC.shape[-1]), xBC], 1)
    w = m.conv1d.weight[:, 0]                                           # (channels, K)
    conv = torch.stack([m.conv1d.bias + sum(w[:, j] * seq[:, t + j] for j in range(K))
                        for t in range(T)], 1)                          # seq[t + K-1] is token t
    a = F.silu(conv)
    x, Bm, Cm = a[..., :Hkv * hd], a[..., Hkv * hd:2 * Hkv * hd], a[..., 2 * Hkv * hd:]
    dt = F.softplus(u @ m.dt_proj.weight.T + m.dt_bias)                  # (B, T, H)
    A = -torch.exp(m.A_log)
    S = state.clone() if state is not None else torch.zeros(B_, H, hd, hd, dtype=torch.float64)
    y = torch.zeros(B_, T, H, hd, dtype=torch.float64)
    for h in range(H):
        kv = slice((h // (H // Hkv)) * hd, (h // (H // Hkv) + 1) * hd)  # the KV head of head h
        for t in range(T):
            decay = torch.exp(dt[:, t, h] * A[h])[:, None, None]
            # the input times dt, as the released code (the paper's Eq. 2 has no dt there)
            dtx = dt[:, t, h, None, None] * x[:, t, kv, None]
            S[:, h] = decay * S[:, h] + dtx * Bm[:, t, None, kv]
            y[:, t, h] = torch.einsum("bpn,bn->bp", S[:, h], Cm[:, t, h * hd:(h + 1) * hd])
    o = gated_norm_by_hand(y, u @ m.g_proj.weight.T, m.norm.weight)
    return o @ m.o_proj.weight.T, S, seq[:, -(K - 1):]


@pytest.mark.parametrize("kv_heads,conv_kernel,T", [(2, 2, 11), (4, 3, 8), (1, 2, 1)])
def test_mamba2_layer_matches_the_steps_written_out(kv_heads, conv_kernel, T):
    """mix() over a sequence (odd length over chunks of 8, one chunk, one token), and a prefill
    into a cache followed by step() per token, against mamba2_by_hand; random weights."""
    cfg = replace(CFG, n_kv_head=kv_heads, conv_kernel=conv_kernel, layout="MMMM")
    layer = randomize(Model(cfg), seed=kv_heads).double().layers[1].mixer
    g = torch.Generator().manual_seed(T)
    u = torch.randn(2, T, cfg.d_model, generator=g, dtype=torch.float64)
    want, S, past = mamba2_by_hand(layer, u)
    torch.testing.assert_close(layer(u), want, rtol=1e-9, atol=1e-9)
    cache = layer.new_cache(2, 64, "cpu", torch.float64)
    split = max(1, T // 2)
    outs = [layer(u[:, :split], 0, cache)]                              # prefill: mix()
    outs += [layer(u[:, t:t + 1], t, cache) for t in range(split, T)]   # one token: step()
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cache["ssm"], S, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cache["conv"], past, rtol=1e-9, atol=1e-9)


# -----------------------------------------------------------------------------
# HoVLE's shape: the pixel shuffle and the embedding stack (docs/method.md §1)


@pytest.mark.parametrize("grid,m", [(4, 2), (6, 3), (6, 2), (3, 1)])
def test_pixel_shuffle_is_hovles_order(grid, m):
    C = 3
    p = torch.randn(2, grid * grid, C, generator=torch.Generator().manual_seed(grid))
    g = grid // m
    want = torch.empty(2, g * g, m * m * C)
    for R in range(g):
        for c in range(g):
            for dr in range(m):
                for dc in range(m):
                    patch = (m * R + dr) * grid + (m * c + dc)          # raster index of the patch
                    want[:, R * g + c, (dr * m + dc) * C:(dr * m + dc + 1) * C] = p[:, patch]
    assert torch.equal(pixel_shuffle(p, grid, m), want)
    if m > 1:                              # m*m consecutive patches of one row is another order
        assert not torch.equal(p.reshape(2, g * g, m * m * C), want)


def test_image_embed_merges_patches_before_the_projector():
    cfg = replace(CFG, img_size=16, img_patch=4, img_merge=2, img_dim=5)   # 4 x 4 -> 2 x 2
    assert cfg.n_img_tokens == 4 and PRESETS["paper"].n_img_tokens == 256
    model = randomize(Model(cfg)).double()
    vis = model.vision
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    feats = torch.empty(2, 16, 5, dtype=torch.float64)                 # conv by hand, raster order
    for r in range(4):
        for c in range(4):
            tile = images[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
            feats[:, 4 * r + c] = torch.einsum("bkij,okij->bo", tile, vis.patch.weight) \
                + vis.patch.bias
    merged = pixel_shuffle(feats + vis.pos, 4, 2)                       # (2, 4, 20)
    lin1, lin2 = vis.proj[0], vis.proj[2]
    h = merged @ lin1.weight.T + lin1.bias
    want = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ lin2.weight.T + lin2.bias   # exact GELU
    torch.testing.assert_close(vis(images), want, rtol=1e-10, atol=1e-10)
    tokens, _ = prompt(5)
    tokens = torch.tensor([expand_image_placeholder([7, 8, IMAGE_ID, 9], cfg.n_img_tokens)])
    assert model.embed(tokens, images[:1]).shape == (1, 4 + 2 + 3, cfg.d_model)
    with pytest.raises(InputError, match="does not merge"):
        Model(replace(cfg, img_merge=3))


def test_image_slots_use_the_configured_token_id():
    cfg = replace(CFG, img_token_id=90)                                # HoVLE: <IMG_CONTEXT>
    model = randomize(Model(cfg)).double()
    tokens, images = prompt(6, seed=5)
    tokens[tokens == IMAGE_ID] = 90
    x = model.embed(tokens, images)
    torch.testing.assert_close(x[0, tokens[0] == 90], model.vision(images)[0])
    with pytest.raises(InputError, match="image-token slots"):
        model.embed(tokens, None)


def test_embedding_stack_has_its_own_rope_base_and_norm_eps():
    base = replace(CFG, layout="AMAA", rope_theta=1e6, norm_eps=1e-2)
    plain = randomize(Model(base), seed=4).double().eval()
    def like(**kw):
        m = Model(replace(base, **kw)).double().eval()
        m.load_state_dict(plain.state_dict())
        return m
    stacked = like(n_embed_layer=2, embed_rope_theta=50.0, embed_norm_eps=1e-5)
    assert [b.attention_norm.eps for b in stacked.layers] == [1e-5, 1e-5, 1e-2, 1e-2]
    assert [b.ffn_norm.eps for b in stacked.layers] == [1e-5, 1e-5, 1e-2, 1e-2]
    assert stacked.layers[0].mixer.rope_theta == 50.0 and stacked.layers[2].mixer.rope_theta == 1e6
    assert stacked.norm.eps == 1e-2                                     # the final norm: norm_eps
    tokens, images = prompt(9, seed=6)
    full = stacked(tokens, images)
    assert (full - plain(tokens, images)).abs().max() > 1e-3
    # the same values as the other stack: the same model, to the last bit
    same = like(n_embed_layer=2, embed_rope_theta=1e6, embed_norm_eps=1e-2)
    assert torch.equal(same(tokens, images), plain(tokens, images))
    # each of the two alone changes the logits
    for theta, eps in ((50.0, 1e-2), (1e6, 1e-5)):
        one = like(n_embed_layer=2, embed_rope_theta=theta, embed_norm_eps=eps)
        assert (one(tokens, images) - plain(tokens, images)).abs().max() > 1e-6
    cache = stacked.new_cache(1)
    T = tokens.shape[1]
    outs = [stacked(tokens[:, :10], images, cache)] + [stacked(tokens[:, t:t + 1], None, cache)
                                                       for t in range(10, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["AAAA", "MMAM"])
def test_logits_at_a_mask_are_those_rows(layout):
    """Model.forward(..., at=mask): the LM head only where the mask is true, the same rows."""
    model = randomize(Model(replace(CFG, layout=layout)), seed=5).eval()
    tokens = torch.randint(8, CFG.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    at = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        full, some = model(tokens), model(tokens, at=at)
    assert some.shape == (int(at.sum()), CFG.vocab_size) and torch.allclose(some, full[at])


def test_rope_angles_are_cached_on_the_cpu_and_right():
    """rope against the rotation written out in float64 at two lengths and offsets; the angles
    of a length and position are made once (the same tensors come back)."""
    for T, pos in ((7, 0), (1, 13)):
        x = torch.randn(2, 3, T, 8, dtype=torch.float64)
        i = torch.arange(4, dtype=torch.float64)
        ang = (pos + torch.arange(T, dtype=torch.float64))[:, None] / 500.0 ** (2 * i / 8)
        c, s_ = ang.cos(), ang.sin()
        x1, x2 = x[..., :4], x[..., 4:]
        ref = torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], -1)
        assert torch.allclose(rope(x, pos, 500.0), ref, atol=1e-12)
        first = mmmamba.rope_angles(T, 8, pos, 500.0, torch.float64, x.device)
        assert mmmamba.rope_angles(T, 8, pos, 500.0, torch.float64, x.device)[0] is first[0]
