"""The models: cached decode == full forward, for the teacher, a Mamba-2 layer and hybrids;
image splicing; input checks."""
from dataclasses import replace

import pytest
import torch

from mmmamba import IMAGE_ID, IMG_END_ID, IMG_START_ID, Config, Mamba2, Model, expand_image_placeholder
from seed import hybrid_layout
from util import InputError

CFG = Config(vocab_size=97, n_layer=4, d_model=48, n_head=4, n_kv_head=2, head_dim=12, d_mlp=64,
             max_seq_len=64, img_size=8, img_patch=4, img_dim=16, chunk_size=8, scan_backend="torch")


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


def test_mamba_state_is_constant_size():
    model = Model(replace(CFG, layout="MMMM"))
    sizes = [sum(t.numel() for c in model.new_cache(1, L).layers for t in c.values()) for L in (16, 64)]
    assert sizes[0] == sizes[1]


def test_generate_streams_the_greedy_continuation():
    model = randomize(Model(replace(CFG, layout="AMMM")), seed=3).double().eval()
    tokens, images = prompt(5, seed=4)
    new = list(model.generate(tokens, images, max_new_tokens=6, stop_id=-1))
    assert len(new) == 6
    # the same tokens by full forwards, one argmax at a time
    seq = tokens
    for tok in new:
        logits = model(seq, images)[:, -1]
        logits[:, :4] = -torch.inf                               # pad and image tokens are never emitted
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
