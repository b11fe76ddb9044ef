"""
hf.py against the on-disk formats of HoVLE and of the released mmMamba models.

Each test writes a small random checkpoint in exactly their format (config.json, bf16
safetensors written by this file's own few lines, shards with an index), loads it with
hf.load_hf and compares our Model's logits with a float64 forward written here from the format
itself, not through mmmamba.py. Every piece a loader could get wrong (either stack's RoPE base,
the pixel shuffle order, the wqkv split, the embedding tables, the wvkqgdt row order) has a
mutation of that reference which must make the comparison fail: the comparison can fail.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hf
from mmmamba import SPECIAL_TOKENS, Config, Model
from util import InputError, checkpoint_of, save_checkpoint

F64 = torch.float64
# the toy: HoVLE's structure at a tiny size. 56 px images of 14 px patches: a 4 x 4 grid that
# the 2 x 2 pixel shuffle merges into 4 image tokens. GQA: 4 query heads on 2 KV heads.
D, H, HKV, HD, MLP, N_TEXT = 32, 4, 2, 8, 48, 40
SPECIAL = {"<img>": 40, "</img>": 41, "<IMG_CONTEXT>": 42}
VOCAB, IMG_CTX = N_TEXT + len(SPECIAL), 42
THETA_E, THETA_L, EPS_E, EPS_L = 1e4, 1e6, 1e-5, 1e-6            # per-stack RoPE base, eps
# the prompt: text ids, <img> and </img> (the special table), the 4 image slots, more text
IDS = [5, 17, 40, 42, 42, 42, 42, 41, 9, 33, 2, 39, 12]


def toy_config(embed_kinds=None, llm_kinds=None):
    stack = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV,
                 intermediate_size=MLP, hidden_act="silu", max_position_embeddings=64,
                 num_hidden_layers=2, rope_scaling=None)
    e = dict(stack, model_type="holistic_embedding", rope_theta=THETA_E, rms_norm_eps=EPS_E,
             use_ls=False, attention_bias=False, num_channels=3, image_size=56, patch_size=14,
             downsample_ratio=0.5, use_pixel_shuffle_proj=True, pixel_shuffle_loc="pre",
             llm_vocab_size=N_TEXT, llm_hidden_size=D, special_token_maps=SPECIAL,
             img_context_token_id=IMG_CTX)
    l = dict(stack, model_type="internlm2", rope_theta=THETA_L, rms_norm_eps=EPS_L, bias=False,
             vocab_size=VOCAB, rope_scaling={"type": "dynamic", "factor": 2.0})
    if embed_kinds:
        e["layers_block_type"], l["layers_block_type"] = embed_kinds, llm_kinds
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "template": "internlm2-chat", "embedding_config": e, "llm_config": l}


def toy_weights(kinds, seed=0):
    """Random tensors under HoVLE's / mmMamba's key names, big enough that a wrong RoPE base
    or a wrong split moves the logits far; norm weights away from 1."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(torch.bfloat16)  # noqa
    E, L = "embedding_model.", "language_model."
    w = {E + "llm_text_embeddings.weight": r(N_TEXT, D),
         E + "special_text_embeddings.weight": r(len(SPECIAL), D),
         E + "vision_embeddings.patch_embedding.weight": r(D, 3, 14, 14, s=0.05),
         E + "vision_embeddings.patch_embedding.bias": r(D, s=0.3),
         E + "vision_embeddings.position_embedding": r(1, 17, D),
         E + "vision_embeddings.class_embedding": r(1, 1, D),
         E + "pixel_shuffle_proj.0.weight": r(D, 4 * D, s=0.1),
         E + "pixel_shuffle_proj.0.bias": r(D),
         E + "pixel_shuffle_proj.2.weight": r(D, D, s=0.2), E + "pixel_shuffle_proj.2.bias": r(D),
         L + "model.tok_embeddings.weight": r(VOCAB, D),      # in the file, never used
         L + "model.norm.weight": (1 + r(D, s=0.3)).bfloat16(),
         L + "output.weight": r(VOCAB, D, s=0.3)}
    for i, kind in enumerate(kinds):
        p = f"{E}encoder.{i}." if i < 2 else f"{L}model.layers.{i - 2}."
        w[p + "attention_norm.weight"] = (1 + r(D, s=0.3)).bfloat16()
        w[p + "ffn_norm.weight"] = (1 + r(D, s=0.3)).bfloat16()
        w[p + "feed_forward.w1.weight"] = r(MLP, D, s=0.3)
        w[p + "feed_forward.w3.weight"] = r(MLP, D, s=0.3)
        w[p + "feed_forward.w2.weight"] = r(D, MLP, s=0.2)
        if kind == "A":
            w[p + "attention.wqkv.weight"] = r((H + 2 * HKV) * HD, D, s=0.5)
            w[p + "attention.wo.weight"] = r(D, H * HD, s=0.3)
        else:
            w[p + "attention.wvkqgdt.weight"] = r(2 * HKV * HD + 2 * H * HD + H, D, s=0.3)
            w[p + "attention.conv1d.weight"] = r(2 * HKV * HD + H * HD, 1, 2, s=0.7)
            w[p + "attention.conv1d.bias"] = r(2 * HKV * HD + H * HD, s=0.2)
            w[p + "attention.dt_bias"] = r(H, s=0.5)
            w[p + "attention.A_log_bias"] = (torch.rand(H, generator=g) * 2 - 2).bfloat16()
            w[p + "attention.g_norm_swish_gate.weight"] = (1 + r(HD, s=0.3)).bfloat16()
            w[p + "attention.o_proj.weight"] = r(D, H * HD, s=0.3)
    return w


def write_safetensors(path, tensors):
    """The format written out by hand: u64 header length, JSON header, raw little-endian bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    for k, t in tensors.items():
        b = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def write_folder(path, config, weights, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), weights)
        return path
    keys, weight_map = list(weights), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        write_safetensors(os.path.join(path, name), {k: weights[k] for k in part})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


# -----------------------------------------------------------------------------
# the reference: HoVLE's / mmMamba's forward in float64, from the format's description


def rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope(x, theta):                                                   # (T, heads, hd)
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=F64) * 2 / HD)
    ang = torch.arange(x.shape[0], dtype=F64)[:, None] * inv_freq
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def attention(n, w, p, theta, mutation):
    qkv, T, G = n @ w[p + "attention.wqkv.weight"].T, n.shape[0], H // HKV
    if mutation == "wqkv_blocked":                      # LLaMA's layout: all q, then k, then v
        q, k, v = qkv.split([H * HD, HKV * HD, HKV * HD], -1)
        q, k, v = q.view(T, H, HD), k.view(T, HKV, HD), v.view(T, HKV, HD)
    else:  # per KV head g, (G + 2) * HD rows: its G query heads, its k, its v
        blocks = [qkv[:, g * (G + 2) * HD:(g + 1) * (G + 2) * HD] for g in range(HKV)]
        q = torch.stack([b[:, i * HD:(i + 1) * HD] for b in blocks for i in range(G)], 1)
        k = torch.stack([b[:, G * HD:(G + 1) * HD] for b in blocks], 1)
        v = torch.stack([b[:, (G + 1) * HD:] for b in blocks], 1)
    q, k = rope(q, theta), rope(k, theta)
    heads = []
    for h in range(H):                                  # query head h reads KV head h // G
        s = q[:, h] @ k[:, h // G].T / HD ** 0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf)
        heads.append(torch.softmax(s, -1) @ v[:, h // G])
    return torch.cat(heads, -1) @ w[p + "attention.wo.weight"].T


def mamba2(n, w, p, mutation):
    """The converted layer, token by token: conv over [v, k, q], SiLU, per head
    S = exp(dt A) S + dt v k^T, y = S q, RMSNorm over the head dim (eps 1e-5) * silu(gate)."""
    T, G, a = n.shape[0], H // HKV, p + "attention."
    z = n @ w[a + "wvkqgdt.weight"].T
    order = {"wvkqgdt_qkv": "qkvgd", "wvkqgdt_kv_swapped": "kvqgd"}.get(mutation, "vkqgd")
    size = {"v": HKV * HD, "k": HKV * HD, "q": H * HD, "g": H * HD, "d": H}
    parts = dict(zip(order, z.split([size[c] for c in order], -1)))
    xkq = torch.cat([parts["v"], parts["k"], parts["q"]], -1)
    cw, cb = w[a + "conv1d.weight"][:, 0], w[a + "conv1d.bias"]         # (C, 2): tap 1 = now
    prev = torch.cat([torch.zeros(1, xkq.shape[1], dtype=F64), xkq[:-1]])
    xkq = F.silu(prev * cw[:, 0] + xkq * cw[:, 1] + cb)
    v, k, q = xkq.split([HKV * HD, HKV * HD, H * HD], -1)
    dt = F.softplus(parts["d"] + w[a + "dt_bias"])                      # (T, H)
    A = -torch.exp(w[a + "A_log_bias"])
    y = torch.zeros(T, H, HD, dtype=F64)
    for h in range(H):
        g, S = h // G, torch.zeros(HD, HD, dtype=F64)
        for t in range(T):
            vt, kt = v[t, g * HD:(g + 1) * HD], k[t, g * HD:(g + 1) * HD]
            S = torch.exp(dt[t, h] * A[h]) * S + dt[t, h] * torch.outer(vt, kt)
            y[t, h] = S @ q[t, h * HD:(h + 1) * HD]
    y = rms(y, w[a + "g_norm_swish_gate.weight"], 1e-5) * F.silu(parts["g"].view(T, H, HD))
    return y.reshape(T, H * HD) @ w[a + "o_proj.weight"].T


def reference(weights, kinds, ids, pixels, mutation=None):
    """(len(ids), VOCAB) logits of one sequence with one 56 px image."""
    w = {k: v.to(F64) for k, v in weights.items()}
    E, L = "embedding_model.", "language_model."
    ids = torch.tensor(ids)
    text, special = w[E + "llm_text_embeddings.weight"], w[E + "special_text_embeddings.weight"]
    if mutation == "llm_table":                          # the LLM's own (unused) table
        x = w[L + "model.tok_embeddings.weight"][ids]
    elif mutation == "tables_swapped":
        x = torch.cat([special, text])[ids]
    else:
        x = torch.stack([text[i] if i < N_TEXT else special[i - N_TEXT] for i in ids.tolist()])
    # patches: 14 x 14 x 3 pixels each, raster order, + position rows 1: (row 0: class token)
    conv = w[E + "vision_embeddings.patch_embedding.weight"].reshape(D, -1)
    feats = torch.stack([conv @ pixels[0, :, 14 * r:14 * r + 14, 14 * c:14 * c + 14].reshape(-1)
                         for r in range(4) for c in range(4)])
    pos = w[E + "vision_embeddings.position_embedding"][0]
    pos = pos[:16] if mutation == "pos_row0" else pos[1:]
    feats = feats + w[E + "vision_embeddings.patch_embedding.bias"] + pos
    if mutation == "plain_reshape":                      # four consecutive patches of a row
        merged = feats.reshape(4, 4 * D)
    else:  # token R * 2 + C: patches (2R, 2C), (2R, 2C + 1), (2R + 1, 2C), (2R + 1, 2C + 1)
        merged = torch.stack([torch.cat([feats[(2 * R + dr) * 4 + 2 * C + dc]
                                         for dr in (0, 1) for dc in (0, 1)])
                              for R in range(2) for C in range(2)])
    h = F.gelu(merged @ w[E + "pixel_shuffle_proj.0.weight"].T + w[E + "pixel_shuffle_proj.0.bias"])
    img = h @ w[E + "pixel_shuffle_proj.2.weight"].T + w[E + "pixel_shuffle_proj.2.bias"]
    x = x.clone()
    x[ids == IMG_CTX] = img
    for i, kind in enumerate(kinds):
        embed = i < 2
        p = f"{E}encoder.{i}." if embed else f"{L}model.layers.{i - 2}."
        theta, eps = (THETA_E, EPS_E) if embed else (THETA_L, EPS_L)
        if mutation == ("embed_rope_as_llm" if embed else "llm_rope_as_embed"):
            theta = THETA_L if embed else THETA_E
        n = rms(x, w[p + "attention_norm.weight"], eps)
        x = x + (attention(n, w, p, theta, mutation) if kind == "A" else mamba2(n, w, p, mutation))
        n = rms(x, w[p + "ffn_norm.weight"], eps)
        w1, w2, w3 = (w[f"{p}feed_forward.{k}.weight"] for k in ("w1", "w2", "w3"))
        x = x + (F.silu(n @ w1.T) * (n @ w3.T)) @ w2.T
    return rms(x, w[L + "model.norm.weight"], EPS_L) @ w[L + "output.weight"].T


def pixels(seed=1):
    return torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ours(folder):
    model, _ = hf.load_hf(str(folder), dtype=F64)
    return model(torch.tensor([IDS]), pixels())[0].detach()


def same(a, b):
    return (a - b).abs().max().item() <= 1e-9 * b.abs().max().item()


# -----------------------------------------------------------------------------
# the logits


TEACHER = "AAAA"
HOVLE_MUTATIONS = ["embed_rope_as_llm", "llm_rope_as_embed", "plain_reshape", "pos_row0",
                   "wqkv_blocked", "llm_table", "tables_swapped"]


@pytest.fixture(scope="module")
def hovle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hovle")
    weights = toy_weights(TEACHER)
    write_folder(folder, toy_config(), weights)
    return folder, weights, ours(folder)


def test_hovle_logits_match_the_format(hovle):
    folder, weights, logits = hovle
    ref = reference(weights, TEACHER, IDS, pixels())
    assert same(logits, ref), (logits - ref).abs().max()
    assert ref.abs().max() > 1          # logits of some size, so the tolerance means something


@pytest.mark.parametrize("mutation", HOVLE_MUTATIONS)
def test_hovle_reference_mutation_fails(hovle, mutation):
    """Each wrong reading of the format gives other logits: the comparison above can fail."""
    folder, weights, logits = hovle
    ref = reference(weights, TEACHER, IDS, pixels(), mutation)
    assert (logits - ref).abs().max() > 1e-3 * ref.abs().max(), mutation


MAMBA = ["mamba2", "mha"], ["mha", "mamba2"]           # a hybrid: both kinds in both stacks


@pytest.fixture(scope="module")
def mmmamba(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmmamba")
    weights = toy_weights("MAAM", seed=2)
    write_folder(folder, toy_config(*MAMBA), weights)
    return folder, weights, ours(folder)


def test_mmmamba_logits_match_the_format(mmmamba):
    folder, weights, logits = mmmamba
    model, _ = hf.load_hf(str(folder))
    assert model.cfg.kinds == "MAAM" and model.cfg.n_embed_layer == 2
    ref = reference(weights, "MAAM", IDS, pixels())
    assert same(logits, ref), (logits - ref).abs().max()


@pytest.mark.parametrize("mutation", ["wvkqgdt_qkv", "wvkqgdt_kv_swapped", "embed_rope_as_llm"])
def test_mmmamba_reference_mutation_fails(mmmamba, mutation):
    folder, weights, logits = mmmamba
    ref = reference(weights, "MAAM", IDS, pixels(), mutation)
    assert (logits - ref).abs().max() > 1e-3 * ref.abs().max(), mutation


def test_sharded_folder(tmp_path, mmmamba):
    """Shards and an index (the released models' layout) load to the same model."""
    folder, weights, logits = mmmamba
    write_folder(tmp_path, toy_config(*MAMBA), weights, shards=3)
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.equal(ours(tmp_path), logits)


def test_config_read_not_assumed(hovle):
    folder, _, _ = hovle
    model, tok = hf.load_hf(str(folder))
    c = model.cfg
    assert (c.n_embed_layer, c.embed_rope_theta, c.rope_theta, c.embed_norm_eps, c.norm_eps) == (
        2, THETA_E, THETA_L, EPS_E, EPS_L)
    assert (c.img_merge, c.n_img_tokens, c.img_token_id, c.vocab_size) == (2, 4, IMG_CTX, VOCAB)
    assert model.output.weight.dtype == torch.bfloat16               # the file's dtype kept
    assert c.max_seq_len == 64          # dynamic NTK RoPE: exact up to max_position_embeddings


# -----------------------------------------------------------------------------
# export: ours -> their format -> ours


def student(layout="MAAM", seed=3):
    torch.manual_seed(seed)
    cfg = Config(vocab_size=VOCAB, n_layer=4, n_embed_layer=2, d_model=D, n_head=H, n_kv_head=HKV,
                 head_dim=HD, d_mlp=MLP, max_seq_len=64, rope_theta=THETA_L, norm_eps=EPS_L,
                 embed_rope_theta=THETA_E, embed_norm_eps=EPS_E, img_size=56, img_patch=14,
                 img_merge=2, img_dim=D, img_token_id=IMG_CTX, layout=layout)
    model = Model(cfg).eval()
    with torch.no_grad():  # away from the initialisation: norms, biases, A, all distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("layout", ["MAAM", "", "MMMM"])
def test_export_round_trip(tmp_path, layout):
    model = student(layout)
    hf.export_hf(model, str(tmp_path / "fp32"), dtype=torch.float32)
    back, _ = hf.load_hf(str(tmp_path / "fp32"))
    assert back.cfg.kinds == model.cfg.kinds
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.tensor([IDS])
    with torch.no_grad():
        assert torch.equal(back(x, pixels().float()), model(x, pixels().float()))
    hf.export_hf(model, str(tmp_path / "bf16"))                       # the release's dtype
    back, _ = hf.load_hf(str(tmp_path / "bf16"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.bfloat16()), k
    with open(tmp_path / "bf16" / "config.json") as f:
        c = json.load(f)
    assert ("layers_block_type" in c["llm_config"]) == ("M" in layout)


def test_sharded_export_round_trip(tmp_path):
    """Past the shard size: shards of at most that many bytes (a larger tensor alone in one)
    and an index naming each tensor's shard, which load back to the same model; exported
    again as one file, the shards and the index are gone (load_hf would read the one file)."""
    model, out, limit = student("MAAM"), tmp_path / "out", 20_000
    save_checkpoint(str(tmp_path / "s.pt"), checkpoint_of(model))
    hf.main(["export", "--ckpt", str(tmp_path / "s.pt"), "--out", str(out), "--dtype", "fp32",
             "--shard-gb", str(limit / 1e9)])
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}" \
        ".safetensors" and "model.safetensors" not in shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for shard in shards:
        _, header = hf.read_header(str(out / shard))
        sizes = [e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()]
        assert sum(sizes) <= limit or len(sizes) == 1, shard
        assert set(header) == {k for k, f in index["weight_map"].items() if f == shard}
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    back, _ = hf.load_hf(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    hf.export_hf(model, str(out), dtype=torch.float32)                  # 5 GB: one file
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    back, _ = hf.load_hf(str(out))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_export_is_read_as_the_format(tmp_path, mmmamba):
    """Export of a loaded mmMamba folder gives back the file's tensors, every key, bit for bit:
    our writer and the table's inverse agree with the format, not only with our reader."""
    src, mmmamba_weights, _ = mmmamba
    model, tok = hf.load_hf(str(src))
    hf.export_hf(model, str(tmp_path / "out"), like=tok)
    base, header = hf.read_header(str(tmp_path / "out" / "model.safetensors"))
    assert set(header) == set(mmmamba_weights)
    for k, t in mmmamba_weights.items():
        got = hf.read_tensor(str(tmp_path / "out" / "model.safetensors"), base, header[k])
        if "position_embedding" in k:                    # row 0, the class token's: unused
            got, t = got[:, 1:], t[:, 1:]
        if "tok_embeddings" not in k and "class_embedding" not in k:   # unused: ours written
            assert torch.equal(got, t), k
    with open(tmp_path / "out" / "config.json") as f:
        c = json.load(f)
    assert c["llm_config"]["layers_block_type"] == MAMBA[1] and c["template"] == "internlm2-chat"


def test_export_refuses_another_shape(tmp_path, hovle):
    folder, _, _ = hovle
    small = Model(Config(n_layer=2, layout="MA"))
    with pytest.raises(InputError, match="does not fit"):
        hf.export_hf(small, str(tmp_path), like=hf.HFTokenizer(str(folder)))
    with pytest.raises(InputError, match="img_dim 64 != 128"):
        hf.export_hf(Model(Config(img_dim=64)), str(tmp_path))


def test_safetensors_package_reads_our_files(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    t = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7.0)}
    hf.write_safetensors(str(tmp_path / "x.safetensors"), t, torch.float32)
    got = st.load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(got["a"], t["a"].float()) and torch.equal(got["b"], t["b"])


def test_cli_export(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    model = student()
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS + ["a"])}      # ours: specials 0..5
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_checkpoint(str(tmp_path / "s.pt"), checkpoint_of(model, tokenizer=tok.to_str()))
    hf.main(["export", "--ckpt", str(tmp_path / "s.pt"), "--out", str(tmp_path / "out")])
    back, htok = hf.load_hf(str(tmp_path / "out"))
    assert back.cfg.kinds == "MAAM" and htok.encode("a a") == [6, 6]
    r = subprocess.run([sys.executable, "hf.py", "export", "--ckpt", str(tmp_path / "no.pt"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr.startswith("error: no checkpoint")
    assert len(r.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# bad folders: one line that says what is wrong


def _config(change):
    def edit(folder):
        with open(folder / "config.json") as f:
            c = json.load(f)
        change(c)
        with open(folder / "config.json", "w") as f:
            json.dump(c, f)
    return edit


def _rewrite(change):
    def edit(folder):
        w = toy_weights(TEACHER)
        change(w)
        hf_path = folder / "model.safetensors"
        write_safetensors(hf_path, w)
    return edit


def _truncate(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _shards_missing_one(folder):
    os.remove(folder / "model.safetensors")
    write_folder(folder, toy_config(), toy_weights(TEACHER), shards=3)
    os.remove(folder / "model-00002-of-00003.safetensors")


BAD = {
    "not a folder": (lambda f: None, "is not a folder"),
    "no config": (lambda f: os.remove(f / "config.json"), "config.json is missing"),
    "another architecture": (_config(lambda c: c.clear() or c.update(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=D)),
        "not HoVLE or mmMamba"),
    "config not json": (lambda f: (f / "config.json").write_text("{oops"), "not readable JSON"),
    "config a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "no weights": (lambda f: os.remove(f / "model.safetensors"), "holds neither"),
    "a shard missing": (_shards_missing_one, "model-00002-of-00003.safetensors is missing"),
    "truncated weights": (_truncate, "not a readable safetensors file"),
    "shapes": (_config(lambda c: [s.update(intermediate_size=40) for s in (
        c["embedding_config"], c["llm_config"])]), "has shape"),
    "a key missing": (_rewrite(lambda w: w.pop("language_model.output.weight")), "no tensor"),
    "an unknown key": (_rewrite(lambda w: w.update(extra=torch.zeros(2))), "does not know"),
    "block types say Mamba-2": (_config(lambda c: c["llm_config"].update(
        layers_block_type=["mamba2", "mha"])), "wvkqgdt"),
    "linear rope scaling": (_config(lambda c: c["llm_config"].update(
        rope_scaling={"type": "linear", "factor": 2.0})), "implemented are silu and dynamic"),
    "stacks of two widths": (_config(lambda c: c["embedding_config"].update(intermediate_size=40)),
                             "differ between"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folder_one_line(tmp_path, case):
    folder = write_folder(tmp_path / "m", toy_config(), toy_weights(TEACHER))
    breaker, message = BAD[case]
    breaker(folder)
    path = folder / "config.json" if case == "not a folder" else folder
    with pytest.raises(InputError, match=message) as e:
        hf.load_hf(str(path))
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# tokenizer, template, image, generation


WORDS = ["<unk>", "<s>", "</s>", "system", "user", "assistant", "what", "is", "it", "?", "be",
         "kind"]


def toy_tokenizer(folder, words=WORDS):
    """A tokenizer.json whose special tokens have the folder's ids (as HoVLE's: <|im_end|>
    below the image tokens, those from the text table's end on)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    assert len(words) <= 38, "the toy's text ids end at 37: <|im_start|> is 38"
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"<|im_start|>": 38, "<|im_end|>": 39, **SPECIAL})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, normalized=False)
                            for s in ["<|im_start|>", "<|im_end|>", *SPECIAL]])
    tok.save(str(folder / "tokenizer.json"))


def test_prompt_ids_internlm2_chat(hovle):
    folder, _, _ = hovle
    toy_tokenizer(folder)
    tok = hf.HFTokenizer(str(folder))
    ids = hf.prompt_ids(tok, "what is it ?", 4, system="be kind")
    v = {w: i for i, w in enumerate(WORDS)}
    assert ids == [38, v["system"], v["be"], v["kind"], 39, 38, v["user"], 40, 42, 42, 42, 42, 41,
                   v["what"], v["is"], v["it"], v["?"], 39, 38, v["assistant"]]
    assert tok.id("<|im_end|>") == 39 and tok.decode([v["what"], 39, v["it"]]) == "what it"
    typed = hf.prompt_ids(tok, "what is <IMG_CONTEXT> ?", 4, system="be kind")  # stays text:
    assert typed.count(42) == 4 and typed.count(0) >= 1      # no fifth image slot, <unk> words
    assert len(typed) > len(ids) and typed[:13] == ids[:13] and typed[-3:] == ids[-3:]
    plain = tok.plain("is <|im_end|>")                                  # cut, never the id
    assert plain[0] == v["is"] and set(plain[1:]) == {0} and tok.encode("<|im_end|>") == [39]
    bad = hf.HFTokenizer(str(folder), {**tok.config, "embedding_config": {
        **tok.config["embedding_config"], "img_context_token_id": 41}})
    with pytest.raises(InputError, match="does not map <IMG_CONTEXT>"):
        hf.prompt_ids(bad, "what", 4)
    os.remove(folder / "tokenizer.json")


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = ["what is in the image", "a red circle and a blue square", "system user assistant"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), vocab_size=30,
                                   model_prefix=str(tmp_path / "tokenizer"),
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    (tmp_path / "config.json").write_text(json.dumps(toy_config()))
    (tmp_path / "added_tokens.json").write_text(json.dumps(SPECIAL))
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True,  # InternLM2
        "added_tokens_decoder": {str(im_start): {"content": "<|im_start|>"},
                                 str(im_end): {"content": "<|im_end|>"}}}))
    tok = hf.HFTokenizer(str(tmp_path))
    ids = tok.encode("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\na red circle"
                     "<|im_end|>")
    assert ids == ([sp.bos_id(), im_start] + sp.encode("user\n") + [40, 42, 42, 41]
                   + sp.encode("\na red circle") + [im_end])
    assert tok.encode("a red circle<|im_end|>", bos=False) == sp.encode("a red circle") + [im_end]
    assert tok.id("<|im_end|>") == im_end          # specials dropped, the text decoded together
    assert tok.decode(ids) == sp.decode(sp.encode("user\n") + sp.encode("\na red circle"))


def test_sentencepiece_missing_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(toy_config()))
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)          # import fails
    with pytest.raises(InputError, match="pip install sentencepiece"):
        hf.HFTokenizer(str(tmp_path))


def test_image_tiles(tmp_path, hovle):
    folder, _, _ = hovle
    tok = hf.HFTokenizer(str(folder))
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    x = hf.image_tiles(str(tmp_path / "x.png"), tok)
    assert x.shape == (1, 3, 56, 56)
    def resize(f):
        return np.asarray(Image.fromarray(rgb).resize((56, 56), f), dtype=np.float64) / 255
    resized = resize(Image.BICUBIC)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = torch.from_numpy((resized - mean) / std).permute(2, 0, 1).float()
    assert torch.allclose(x[0], want, atol=1e-6)
    assert torch.equal(hf.tile(Image.fromarray(rgb), tok), x[0])        # the same from PIL
    assert not np.allclose(resized, resize(Image.BILINEAR), atol=1e-3)      # the filter matters
    with pytest.raises(InputError, match="no image"):
        hf.image_tiles(str(tmp_path / "none.png"), tok)


def test_generate_with_the_folders_ids(hovle):
    """Model.generate on a loaded folder, with its own stop id and masked ids (hf.HFChat:
    <|im_end|>'s, and <img>, </img>, <IMG_CONTEXT>): cached greedy decoding == the full
    forward with exactly those masked, so HoVLE's ids 0-3 (ours pad and image markers, its
    <unk>, <s>, </s>) can be emitted; and it stops right after the stop id."""
    folder, _, _ = hovle
    toy_tokenizer(folder)
    try:
        chat = hf.HFChat(str(folder))
    finally:
        os.remove(folder / "tokenizer.json")
    assert chat.stop_id == 39 and set(chat.never) == {40, 41, 42}
    model, _ = hf.load_hf(str(folder), dtype=F64)
    x = torch.tensor([IDS])
    with torch.no_grad():       # id 2 scaled up to win the first step: ours would mask it
        first = model(x, pixels())[0, -1]
        first[[40, 41, 42]] = -torch.inf
        model.output.weight[2] = model.output.weight[int(first.argmax())] * 3
    out = list(model.generate(x, pixels(), max_new_tokens=6, stop_id=-1, never=chat.never))
    with torch.no_grad():
        logits = model(torch.tensor([IDS + out[:-1]]), pixels())[0, len(IDS) - 1:]
    logits[:, [40, 41, 42]] = -torch.inf
    assert len(out) == 6 and logits.argmax(-1).tolist() == out and out[0] == 2
    assert next(model.generate(x, pixels(), 1, stop_id=-1)) != 2        # our default masks it
    stop = out[2]
    assert list(model.generate(x, pixels(), 6, stop_id=stop, never=chat.never)) == out[
        :out.index(stop) + 1]


def test_sampling_masks_first_and_tiny_temperatures_are_greedy(hovle):
    """The masked ids are never sampled, however hot; any temperature above 0, down to the
    smallest float, gives the greedy tokens (logits are taken from their maximum first, in
    float64: 0 or -inf, never inf - inf), so sample.py needs no threshold for greedy."""
    folder, _, _ = hovle
    model, _ = hf.load_hf(str(folder), dtype=torch.float32)
    x, never = torch.tensor([IDS]), (40, 41, 7)
    greedy = list(model.generate(x, pixels().float(), 5, stop_id=-1, never=never))
    for t in (1e-6, 1e-37, 1e-300, 5e-324):             # 5e-324: the smallest float
        g = torch.Generator().manual_seed(0)
        assert list(model.generate(x, pixels().float(), 5, t, stop_id=-1, never=never,
                                   generator=g)) == greedy, t
    g, seen = torch.Generator().manual_seed(1), set()
    for _ in range(20):
        seen |= set(model.generate(x, pixels().float(), 4, 100.0, stop_id=-1, never=never,
                                   generator=g))
    assert len(seen) > 10 and not seen & {40, 41, 42, 7}         # hot, and never a masked id
    g = torch.Generator().manual_seed(2)
    top = list(model.generate(x, pixels().float(), 3, 100.0, top_k=1, stop_id=-1, never=never,
                              generator=g))
    assert top == greedy[:3]                                      # top-1 after the mask


def test_sample_py_hf_answers_what_generate_gives(tmp_path, hovle, capsys):
    """`python sample.py --hf DIR --image X --prompt Q`: the folder's tokenizer, template and
    preprocessing, and the answer is Model.generate's greedy ids decoded, stopped at
    <|im_end|>."""
    import sample
    folder, _, _ = hovle
    toy_tokenizer(folder)
    rgb = np.random.default_rng(1).integers(0, 256, (60, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    try:
        sample.main(["--hf", str(folder), "--image", str(tmp_path / "x.png"), "--prompt",
                     "what is it ?", "--max-new-tokens", "5", "--device", "cpu"])
        model, tok = hf.load_hf(str(folder), torch.float32)
        tokens = torch.tensor([hf.prompt_ids(tok, "what is it ?", model.cfg.n_img_tokens)])
        ids = list(model.generate(tokens, hf.image_tiles(str(tmp_path / "x.png"), tok), 5,
                                  stop_id=tok.id("<|im_end|>"), never=(40, 41)))
    finally:
        os.remove(folder / "tokenizer.json")
    out = capsys.readouterr()
    assert out.out == f"user: what is it ?\nassistant: {tok.decode(ids)}\n"
    assert "HoVLE's data" in out.err
