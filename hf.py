"""
Real checkpoints: load HoVLE (the paper's teacher) or a released mmMamba model into our Model,
and write our models in their format.

    model, tok = load_hf("path/to/HoVLE", dtype=torch.float32)      # our Model, eval mode
    chat = HFChat("path/to/HoVLE", tok)             # its template, stop and masked ids, images
    pixels = chat.image({"path": "cat.jpg"})[None]                   # (1, 3, 448, 448)
    ids = torch.tensor([chat.prompt("What is in the image?", model.cfg.n_img_tokens)])
    logits = model(ids, pixels)                                      # (1, T, V)
    answer = chat.decode(list(model.generate(ids, pixels, 256, stop_id=chat.stop_id,
                                             never=chat.never)))
    python distill.py --teacher-hf path/to/HoVLE --data llava.json  # distil it on your data
    python hf.py export --ckpt out/stage3_linear.pt --out DIR        # ours -> their format

The folder, InternVL's layout as HoVLE uses it (arXiv 2502.13145 Sec. 2; docs/method.md §1):
config.json with an `embedding_config` (HoVLE's embedding stack: text and image patches in
one causal stream, no vision encoder) and an `llm_config` (the InternLM2 LLM on top of it);
bf16 weights in model.safetensors, or in shards that model.safetensors.index.json lists. A
released mmMamba model (Sec. 4.1-4.5; §4, §6) is the same folder with each converted layer's
attention replaced by a Mamba-2 layer, marked "mamba2" in its stack's `layers_block_type`.

Loading is a copy table (`table`): each group of our keys, the keys in the file, and two
inverse functions between them; most rows are plain copies. The result is our Model, with
nothing of their format left at run time; `export_hf` runs the same table backwards.
Safetensors are read and written here (an 8-byte little-endian header length, a JSON header
{name: dtype, shape, byte offsets}, the raw bytes): reading runs no code from the file, and no
dependency is added.

Glossary: D model width, H query (= Mamba-2) heads, Hkv key/value heads, hd head dim,
G query heads per KV head (H / Hkv), S image side in pixels.
"""
import json
import math
import os
import re
import shutil
import sys
from copy import deepcopy
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

import data
from mmmamba import Config, Model
from util import (ArgumentParser, InputError, load_checkpoint, model_from_checkpoint, number,
                  read_image, run_cli, tokenizer_from_checkpoint)

# -----------------------------------------------------------------------------
# safetensors

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path):
    """-> (where the bytes start, {name: entry}), each entry checked against the file size: a
    truncated or foreign file fails here, in one line, before anything is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if not 2 <= n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, e in header.items():
                start, end = e["data_offsets"]
                if (end - start != math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize
                        or not 0 <= start <= end <= size - 8 - n):
                    raise ValueError(f"tensor {name} does not fit in the file")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                             f"{e}): truncated or of another format; download it again") from None
    return 8 + n, header


def read_tensor(path, base, entry):
    (start, end), dtype = entry["data_offsets"], DTYPES[entry["dtype"]]
    with open(path, "rb") as f:
        f.seek(base + start)
        raw = bytearray(f.read(end - start) or b"\0")             # frombuffer refuses 0 bytes
    return torch.frombuffer(raw, dtype=torch.uint8)[:end - start].view(dtype).view(entry["shape"])


def write_safetensors(path, tensors, dtype):
    """{name: tensor} -> one file, tensor by tensor (cast to dtype on the way), written beside
    `path` and renamed over it: an interrupted export leaves no half-written file."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0           # what transformers checks
    for name, t in tensors.items():
        n = t.numel() * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)                                      # tensors 8-byte aligned
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for t in tensors.values():
                f.write(t.detach().to("cpu", dtype).reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise InputError(f"could not write {path} ({e.strerror or e}): free some disk space "
                         "or choose another --out") from None


# -----------------------------------------------------------------------------
# the folder: config.json and the weights, one file or shards by the index's weight_map

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def write_weights(path, tensors, dtype, shard_bytes):
    """One model.safetensors; or, past shard_bytes, shards model-0000K-of-0000N.safetensors of
    at most shard_bytes each (a larger tensor alone in one) and the index whose weight_map
    names each tensor's shard, as the Hub's large models are stored. Weights of an earlier
    export that the new files do not replace are removed afterwards: a leftover
    model.safetensors would be read instead of the new shards."""
    shards, size = [[]], 0
    for name, t in tensors.items():                     # in the table's order, filled in turn
        n = t.numel() * dtype.itemsize
        if shards[-1] and size + n > shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += n
    files = [WEIGHTS] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, names in zip(files, shards):
        write_safetensors(os.path.join(path, file), {k: tensors[k] for k in names}, dtype)
    if len(files) > 1:
        total = sum(t.numel() * dtype.itemsize for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: f for f, names in zip(files, shards) for k in names}}
        with open(os.path.join(path, INDEX + ".tmp"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        os.replace(os.path.join(path, INDEX + ".tmp"), os.path.join(path, INDEX))
    keep = set(files) | ({INDEX} if len(files) > 1 else set())
    for old in os.listdir(path):
        if (old in (WEIGHTS, INDEX) or SHARD.fullmatch(old)) and old not in keep:
            os.remove(os.path.join(path, old))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def read_json(path, missing_ok=False):
    if missing_ok and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        if not isinstance(content, dict):
            raise ValueError("not a JSON object")
        return content
    except FileNotFoundError:
        raise InputError(f"{path} is missing: pass the folder of a HoVLE or mmMamba "
                         "checkpoint") from None
    except (ValueError, OSError) as e:
        raise InputError(f"{path} is not readable JSON ({type(e).__name__}: {e}): download it "
                         "again") from None


def open_folder(path):
    """-> (config.json as a dict, {key: (file, where its bytes start, header entry)})."""
    if not os.path.isdir(path):
        raise InputError(f"{path} is not a folder: pass the folder of a HoVLE or mmMamba "
                         "checkpoint (config.json and *.safetensors)")
    hf, weight_map = read_json(os.path.join(path, "config.json")), None
    if not os.path.isfile(os.path.join(path, WEIGHTS)):
        if not os.path.isfile(os.path.join(path, INDEX)):
            raise InputError(f"{path} holds neither {WEIGHTS} nor {INDEX} (only safetensors are "
                             "read: convert .bin weights first)")
        weight_map = read_json(os.path.join(path, INDEX)).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{path}/{INDEX} has no weight_map: download it again")
    found = {}
    for shard in sorted(set(weight_map.values())) if weight_map else [WEIGHTS]:
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise InputError(f"shard {file} is missing ({INDEX} lists it): download every shard")
        base, header = read_header(file)
        found.update({k: (file, base, e) for k, e in header.items()
                      if weight_map is None or weight_map.get(k) == shard})
    return hf, found


# -----------------------------------------------------------------------------
# config.json -> our Config, every value read from the file. The two stacks differ only in
# their RoPE base and RMSNorm eps (Config.embed_rope_theta, embed_norm_eps)


def need(c, key, where):
    if key not in c:
        raise InputError(f"config.json: {where} has no {key}: not a HoVLE or mmMamba config")
    return c[key]


def block_kinds(c, where):
    """layers_block_type (mmMamba's conversion writes it; HoVLE has none) -> "A"/"M" per layer."""
    n = need(c, "num_hidden_layers", where)
    kinds = c.get("layers_block_type", ["mha"] * n)
    if len(kinds) != n or set(kinds) - {"mha", "mamba2"}:
        raise InputError(f"config.json: {where}.layers_block_type must be {n} entries, each "
                         f"'mha' or 'mamba2'; got {kinds}")
    return "".join("A" if k == "mha" else "M" for k in kinds)


def config_of(hf, conv_kernel=2):
    e, l = hf.get("embedding_config"), hf.get("llm_config")
    if not isinstance(e, dict) or not isinstance(l, dict):
        raise InputError(f"config.json describes {hf.get('architectures') or 'an unknown model'}"
                         ", not HoVLE or mmMamba (no embedding_config and llm_config)")
    ge, gl = (lambda k: need(e, k, "embedding_config")), (lambda k: need(l, k, "llm_config"))
    shared = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    if any(ge(k) != gl(k) for k in shared):
        raise InputError(f"config.json: {', '.join(shared)} differ between embedding_config and "
                         "llm_config; our Model has one value of each for both stacks")
    limits = [gl("max_position_embeddings")]
    for c, where in ((e, "embedding_config"), (l, "llm_config")):
        # biases and layer scale would add tensors, which load_hf refuses by name
        scaling, act = c.get("rope_scaling") or {}, c.get("hidden_act", "silu")
        if act != "silu" or scaling.get("type", "dynamic") != "dynamic":
            raise InputError(f"config.json: {where} has hidden_act {act}, rope_scaling {scaling}:"
                             " implemented are silu and dynamic NTK scaling")
        if scaling:  # dynamic NTK RoPE changes nothing up to max_position_embeddings: stop there
            limits.append(need(c, "max_position_embeddings", where))
    D, H, Hkv, size = (ge(k) for k in ("hidden_size", "num_attention_heads",
                                       "num_key_value_heads", "image_size"))
    merge = 1 / ge("downsample_ratio")
    if (e.get("pixel_shuffle_loc", "pre") != "pre" or abs(merge - round(merge)) > 1e-6
            or (hf.get("force_image_size") or size) != size or D % H or H % Hkv):
        raise InputError("config.json: implemented are a pixel shuffle by 1/downsample_ratio "
                         "before the embedding stack, force_image_size == image_size, and heads "
                         "that divide hidden_size")
    kinds = block_kinds(e, "embedding_config") + block_kinds(l, "llm_config")
    return Config(vocab_size=gl("vocab_size"), n_layer=len(kinds), d_model=D, n_head=H,
                  n_kv_head=Hkv, head_dim=D // H, d_mlp=ge("intermediate_size"),
                  max_seq_len=min(limits), rope_theta=gl("rope_theta"),
                  norm_eps=gl("rms_norm_eps"), n_embed_layer=ge("num_hidden_layers"),
                  embed_rope_theta=ge("rope_theta"), embed_norm_eps=ge("rms_norm_eps"),
                  img_size=size, img_patch=ge("patch_size"), img_merge=round(merge), img_dim=D,
                  img_token_id=ge("img_context_token_id"), layout=kinds if "M" in kinds else "",
                  conv_kernel=conv_kernel)


# -----------------------------------------------------------------------------
# the copy table

E, L = "embedding_model.", "language_model."


def table(cfg, n_text):
    """[(our keys, their keys, theirs -> ours, ours -> theirs)]. n_text: rows of HoVLE's text
    embedding table; ids from n_text on read its special-token table (<img>, <IMG_CONTEXT>, ...),
    so our one table is the two stacked."""
    H, Hkv, hd, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
    G = H // Hkv
    copy = (lambda t: (t,), lambda t: (t,))

    def split_wqkv(w):  # rows per KV head g: its G query heads, then its k, then its v
        w = w.view(Hkv, G + 2, hd, D)
        return w[:, :G].reshape(H * hd, D), w[:, G].reshape(-1, D), w[:, G + 1].reshape(-1, D)

    def join_wqkv(q, k, v):
        return torch.cat([q.view(Hkv, G, hd, D), k.view(Hkv, 1, hd, D), v.view(Hkv, 1, hd, D)],
                         1).reshape(-1, D),

    tables = [E + "llm_text_embeddings.weight", E + "special_text_embeddings.weight"]
    tables = tables[:1 + (n_text < cfg.vocab_size)]
    rows = [(["tok_embeddings.weight"], tables, lambda *t: (torch.cat(t),),
             lambda t: (t[:n_text], t[n_text:])[:len(tables)]),
            (["vision.pos"], [E + "vision_embeddings.position_embedding"],
             lambda p: (p[0, 1:],),                     # row 0: an unused class token's place
             lambda p: (torch.cat([p.new_zeros(1, D), p])[None],))]
    names = {"norm.weight": L + "model.norm.weight", "output.weight": L + "output.weight"}
    for ours, theirs in (("patch", "vision_embeddings.patch_embedding"),
                         ("proj.0", "pixel_shuffle_proj.0"), ("proj.2", "pixel_shuffle_proj.2")):
        names.update({f"vision.{ours}.{p}": f"{E}{theirs}.{p}" for p in ("weight", "bias")})
    # the released Mamba-2 layer packs its input projections as rows v, k, q, gate, dt: our x
    # (from W_V), B (from W_K), C (from W_Q), W_G, W_dt (arXiv 2502.13145 Sec. 4.1;
    # docs/method.md §2, §4); its conv runs over [v, k, q] = our [x, B, C]: a plain copy
    sizes = [Hkv * hd, Hkv * hd, H * hd, H * hd, H]
    mamba = {"conv1d.weight": "conv1d.weight", "conv1d.bias": "conv1d.bias", "dt_bias": "dt_bias",
             "A_log": "A_log_bias", "norm.weight": "g_norm_swish_gate.weight",
             "o_proj.weight": "o_proj.weight"}
    for i, kind in enumerate(cfg.kinds):
        j = i - cfg.n_embed_layer
        src, dst = f"{E}encoder.{i}." if j < 0 else f"{L}model.layers.{j}.", f"layers.{i}."
        names.update({f"{dst}{n}.weight": f"{src}{n}.weight" for n in ("attention_norm",
                                                                      "ffn_norm")})
        names.update({f"{dst}mlp.{w}.weight": f"{src}feed_forward.{w}.weight"
                      for w in ("w1", "w2", "w3")})
        if kind == "A":
            rows.append(([dst + f"mixer.{p}_proj.weight" for p in "qkv"],
                         [src + "attention.wqkv.weight"], split_wqkv, join_wqkv))
            names[dst + "mixer.o_proj.weight"] = src + "attention.wo.weight"
        else:
            rows.append(([dst + f"mixer.{p}_proj.weight" for p in ("x", "b", "c", "g", "dt")],
                         [src + "attention.wvkqgdt.weight"], lambda w: w.split(sizes),
                         lambda *t: (torch.cat(t),)))
            names.update({dst + "mixer." + a: src + "attention." + b for a, b in mamba.items()})
    return rows + [([a], [b], *copy) for a, b in names.items()]


# in the files but never read by the forward: a class token, and the LLM's own embedding table
# (HoVLE's embedding stack embeds the text); what export writes for them, so nothing is missing
UNUSED = {E + "vision_embeddings.class_embedding": lambda sd: sd["vision.pos"][:1, None] * 0,
          L + "model.tok_embeddings.weight": lambda sd: sd["tok_embeddings.weight"]}


def load_hf(path, dtype=None, device="cpu"):
    """A HoVLE or released mmMamba folder -> (our Model in eval mode, its HFTokenizer).
    dtype None keeps the file's (bf16); torch.float32 on a CPU."""
    hf, files = open_folder(path)
    conv = next((files[k][2]["shape"][-1] for k in files if k.endswith("conv1d.weight")), 2)
    cfg = config_of(hf, conv)
    with torch.device("meta"):                      # shapes only: nothing allocated, no init
        model = Model(cfg)
    ours, state = model.state_dict(), {}
    text = files.get(E + "llm_text_embeddings.weight")
    rows = table(cfg, min(text[2]["shape"][0], cfg.vocab_size) if text else cfg.vocab_size)
    for our_keys, their_keys, to_ours, to_theirs in rows:
        tensors = []
        for key, want in zip(their_keys, to_theirs(*(ours[k] for k in our_keys))):
            if key not in files:
                raise InputError(f"{path}: no tensor {key}: the weights do not match config.json "
                                 "(its layers_block_type says which layers are Mamba-2)")
            t = read_tensor(*files[key])
            if t.shape != want.shape:
                raise InputError(f"{path}: {key} has shape {list(t.shape)} but config.json makes "
                                 f"it {list(want.shape)}: the weights do not match config.json")
            tensors.append(t.to(dtype or t.dtype))
        state.update({k: t.contiguous() for k, t in zip(our_keys, to_ours(*tensors))})
    unknown = sorted(set(files) - {k for row in rows for k in row[1]} - set(UNUSED))
    if unknown:
        raise InputError(f"{path}: {len(unknown)} tensor(s) this loader does not know, e.g. "
                         f"{unknown[0]}: a format other than HoVLE's or mmMamba's")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval(), HFTokenizer(path, hf)


# -----------------------------------------------------------------------------
# export: our model -> their folder, by the same table


def hf_config(cfg):
    """Our Config as HoVLE's config.json (no special-token table: all our ids are text ids)."""
    stack = dict(hidden_size=cfg.d_model, num_attention_heads=cfg.n_head, hidden_act="silu",
                 num_key_value_heads=cfg.n_kv_head, intermediate_size=cfg.d_mlp,
                 max_position_embeddings=cfg.max_seq_len, rope_scaling=None)
    e = dict(stack, model_type="holistic_embedding", num_hidden_layers=cfg.n_embed_layer,
             rope_theta=cfg.embed_rope_theta, rms_norm_eps=cfg.embed_norm_eps, use_ls=False,
             attention_bias=False, mlp_bias=False, num_channels=3, image_size=cfg.img_size,
             patch_size=cfg.img_patch, downsample_ratio=1 / cfg.img_merge,
             use_pixel_shuffle_proj=True, pixel_shuffle_loc="pre", llm_vocab_size=cfg.vocab_size,
             llm_hidden_size=cfg.d_model, special_token_maps={},
             img_context_token_id=cfg.img_token_id)
    l = dict(stack, model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False,
             num_hidden_layers=cfg.n_layer - cfg.n_embed_layer, rope_theta=cfg.rope_theta,
             rms_norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size)
    # template "mmmamba": our chat template and image preprocessing (data.py), not HoVLE's
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "template": "mmmamba", "embedding_config": e, "llm_config": l}


SHAPE = ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_mlp",
         "rope_theta", "norm_eps", "n_embed_layer", "embed_rope_theta", "embed_norm_eps",
         "img_size", "img_patch", "img_merge", "img_dim", "img_token_id", "layout", "conv_kernel")


def export_hf(model, path, tokenizer=None, like=None, dtype=torch.bfloat16, shard_bytes=5e9):
    """Write `model` as a HoVLE folder (all attention) or a released-mmMamba one (any Mamba-2
    layer; arXiv 2502.13145 Sec. 4.5; docs/method.md §6). like: the HFTokenizer of the folder
    it was distilled from (load_hf's second value, or HFTokenizer(dir)), whose config.json and
    tokenizer files are carried over; else tokenizer (ours) is saved as tokenizer.json.
    Weights of more than shard_bytes are written as shards (write_weights)."""
    cfg = model.cfg
    hf = deepcopy(like.config) if like is not None else hf_config(cfg)
    e, l = hf["embedding_config"], hf["llm_config"]
    kinds, n = ["mha" if k == "A" else "mamba2" for k in cfg.kinds], cfg.n_embed_layer
    for c in (e, l):
        c.pop("layers_block_type", None)
    if "M" in cfg.kinds:  # what mmMamba's conversion writes into config.json
        e.update(layers_block_type=kinds[:n], model_type="mmMamba_embedding")
        l.update(layers_block_type=kinds[n:], model_type="mmMamba",
                 architectures=["mmMambaForCausalLM"])
        hf.update(architectures=["mmMambaChatModel"], model_type="mmMamba_chat")
    try:  # HoVLE's patch features are d_model wide, its head dim d_model / n_head
        theirs = asdict(config_of(hf, cfg.conv_kernel))
        wrong = [f"{k} {v} != {theirs[k]}" for k, v in asdict(cfg).items()
                 if k in SHAPE and v != theirs[k]]
        if wrong:
            raise InputError(", ".join(wrong))
    except InputError as err:
        raise InputError(f"the model does not fit {like.folder if like else 'HoVLE'}'s format "
                         f"({err})") from None
    sd, tensors = model.state_dict(), {}
    for our_keys, their_keys, _, to_theirs in table(cfg, e.get("llm_vocab_size", cfg.vocab_size)):
        tensors.update(zip(their_keys, to_theirs(*(sd[k] for k in our_keys))))
    tensors.update({k: make(sd) for k, make in UNUSED.items()})
    os.makedirs(path, exist_ok=True)
    write_weights(path, tensors, dtype, shard_bytes)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, ensure_ascii=False)
    for name in TOKENIZER_FILES if like is not None else ():
        if os.path.isfile(os.path.join(like.folder, name)):
            shutil.copyfile(os.path.join(like.folder, name), os.path.join(path, name))
    if like is None and tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))
    return path


# -----------------------------------------------------------------------------
# the tokenizer, HoVLE's chat template (InternLM2's "internlm2-chat"), image preprocessing


class HFTokenizer:
    """A folder's tokenizer and settings: tokenizer.json (`tokenizers`) where it exists, else
    tokenizer.model (`sentencepiece`). Special-token ids come from the folder (added tokens,
    the embedding config's special-token map), never from our ids 0..5."""

    def __init__(self, folder, hf=None):
        file = lambda name: os.path.join(folder, name)                    # noqa: E731
        self.folder, self.config = folder, hf or read_json(file("config.json"))
        self.template = self.config.get("template", "internlm2-chat")
        tc, self.special = read_json(file("tokenizer_config.json"), True), read_json(
            file("added_tokens.json"), True)
        added = tc.get("added_tokens_decoder", {})                    # {"92542": {"content": ...}}
        self.special.update({v["content"]: int(k) for k, v in added.items()})
        self.special.update(self.config.get("embedding_config", {}).get("special_token_maps", {}))
        self.tok = self.sp = None
        if os.path.isfile(file("tokenizer.json")):
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_file(file("tokenizer.json"))
            added = self.tok.get_added_tokens_decoder()                # {id: AddedToken}
            self.special.update({t.content: i for i, t in added.items() if t.special})
        elif os.path.isfile(file("tokenizer.model")):
            try:
                import sentencepiece
            except ImportError:
                raise InputError(f"{folder} has a sentencepiece tokenizer: pip install "
                                 "sentencepiece") from None
            self.sp = sentencepiece.SentencePieceProcessor(model_file=file("tokenizer.model"))
            self.bos = [self.sp.bos_id()] if tc.get("add_bos_token", True) else []

    def encode(self, text, bos=True):
        """Ids of text, special tokens in it included; bos=False: no BOS (text that continues)."""
        if self.tok is not None:  # tokenizer.json knows its special tokens and BOS itself
            return self.tok.encode(text, add_special_tokens=bos).ids
        if self.sp is None:
            raise InputError(f"{self.folder} has no tokenizer.json or tokenizer.model")
        # as transformers' slow tokenizer does: special tokens split out, the text between
        # them through sentencepiece
        pattern = "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True))
        ids = list(self.bos) if bos else []
        for piece in re.split(f"({pattern})", text) if self.special else [text]:
            ids += [self.special[piece]] if piece in self.special else self.sp.encode(piece)
        return ids

    def plain(self, text):
        """Ids of user text as text, no BOS: a special token typed into it ("<IMG_CONTEXT>")
        stays text (data.plain_pieces, with the folder's special tokens)."""
        return [i for piece in data.plain_pieces(text, self.special)
                for i in self.encode(piece, bos=False)]

    def decode(self, ids, skip_special_tokens=True):  # special tokens are always skipped
        if self.tok is not None:
            return self.tok.decode(ids, skip_special_tokens=True)
        special = set(self.special.values())
        return self.sp.decode([i for i in ids if i not in special and i < self.sp.get_piece_size()])

    def id(self, name):
        i = self.special.get(name, self.tok.token_to_id(name) if self.tok else None)
        if i is None:
            raise InputError(f"the tokenizer of {self.folder} has no token {name}")
        return i


# InternVL's system message for "internlm2-chat", the template HoVLE's config names
SYSTEM = ("你是由上海人工智能实验室联合商汤科技"
          "开发的书生多模态大模型，"
          "英文名叫InternVL, 是一个有用无害的人工智能助手。")


def prompt_ids(tok, question, n_img_tokens, system=SYSTEM):
    """Ids of one turn about one image tile, up to the assistant's header, in internlm2-chat
    (ChatML with a system message): the image is <img>, n_img_tokens <IMG_CONTEXT> (the slots
    the model fills with the tile's tokens), </img>, then the question, as plain text (a special
    token typed into it stays text). A folder we exported (template "mmmamba") gets our own
    template, data.prompt_text."""
    if tok.template == "mmmamba" and tok.tok is not None:
        return data.encode_prompt(tok.tok, question, n_img_tokens)
    if tok.template not in ("internlm2-chat", "mmmamba"):
        raise InputError(f"{tok.folder}: chat template {tok.template!r} is not implemented")
    image = "<img>" + "<IMG_CONTEXT>" * n_img_tokens + "</img>"
    # the question is the text between </img> and <|im_end|>: encoded alone, as it would be
    # in the whole string (the tokenizers split at special tokens first)
    ids = (tok.encode(f"<|im_start|>system\n{system}<|im_end|><|im_start|>user\n{image}")
           + tok.plain("\n" + question) + tok.encode("<|im_end|><|im_start|>assistant\n", False))
    slot = tok.config["embedding_config"]["img_context_token_id"]
    if ids.count(slot) != n_img_tokens:
        raise InputError(f"the tokenizer of {tok.folder} does not map <IMG_CONTEXT> to "
                         f"config.json's img_context_token_id {slot}")
    return ids


class HFChat:
    """A folder's chat format, with data.Chat's interface, which batches and evaluation read:
    prompt ids in its template, answer ids ending with its end-of-turn token, an example's
    image as its tile, the id that stops an answer, the ids never sampled (the image markers),
    decoding with its tokenizer. The folder is kept absolute: checkpoints record it."""

    def __init__(self, folder, tok=None):
        self.tok, self.folder = tok or HFTokenizer(folder), os.path.abspath(folder)
        if self.tok.tok is None and self.tok.sp is None:
            raise InputError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model): "
                             "copy the release's tokenizer files into it")
        self.stop_id, self.decode = self.tok.id("<|im_end|>"), self.tok.decode
        marks = ("<pad>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>")       # ours, HoVLE's
        self.never = tuple(self.tok.special[m] for m in marks if m in self.tok.special)

    def prompt(self, question, n_img_tokens):
        return prompt_ids(self.tok, question, n_img_tokens)

    def answer(self, answer):
        """The answer continues the prompt's "assistant\n": encoded with it, as the whole turn
        is in training (a sentencepiece tokenizer would start a lone answer with a space)."""
        if self.tok.template == "mmmamba" and self.tok.tok is not None:
            return data.encode_chat(self.tok.tok, data.answer_text, answer)
        head, ids = self.tok.encode("assistant\n", False), self.tok.plain("assistant\n" + answer)
        ids = ids[len(head):] if ids[:len(head)] == head else self.tok.plain(answer)
        return ids + [self.stop_id]

    def image(self, ex, size=None):
        """A data.py example's image (drawn from its scene, or read from its path) as a tile."""
        img = data.draw_scene(ex["scene"]) if "scene" in ex else read_image(ex["path"])
        return tile(img, self.tok)


def load_teacher(path, device="cpu"):
    """distill.py --teacher-hf: a HoVLE folder as the frozen teacher, in float32 (the students
    train as float32 copies of it; on a GPU autocast computes in bf16), and its chat format.
    A released mmMamba student, or a folder without a tokenizer, is refused before the weights
    are read."""
    chat = HFChat(path)
    if "M" in config_of(chat.tok.config).kinds:
        raise InputError(f"{path} is an mmMamba student (its layers_block_type has mamba2 "
                         "layers): --teacher-hf takes the HoVLE teacher, all attention")
    model, _ = load_hf(path, torch.float32, device)
    return model.requires_grad_(False), chat


def checkpoint_chat(ckpt, where):
    """The chat format a distill.py checkpoint was trained in: ours (its tokenizer inside), or
    its --teacher-hf folder's (recorded as "hf": the tokenizer is there)."""
    if "hf" not in ckpt:
        return data.Chat(tokenizer_from_checkpoint(ckpt, where))
    if not os.path.isdir(ckpt["hf"]):
        raise InputError(f"{where} was distilled from {ckpt['hf']}, which is not there: it holds "
                         "the tokenizer; put the folder back")
    return HFChat(ckpt["hf"])


def sample_model(path, device):
    """sample.py --hf: the model (float32 on a CPU, the folder's bf16 on a GPU), its chat."""
    model, tok = load_hf(path, torch.float32 if device.type == "cpu" else None, device)
    return model, HFChat(path, tok)


MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet


def image_tiles(path, tok):
    """An image file -> (1, 3, S, S), one tile (HoVLE also cuts large images into up to 12
    tiles and a thumbnail; not implemented, docs/real_checkpoints.md)."""
    return tile(read_image(path), tok)[None]


def tile(img, tok):
    """An RGB PIL image -> (3, S, S) as HoVLE preprocesses a tile: a bicubic resize of the whole
    image to S px (448), x / 255, ImageNet mean and std."""
    S = tok.config["embedding_config"]["image_size"]
    if tok.template == "mmmamba":
        return data.image_tensor(img, S)
    x = torch.from_numpy(np.asarray(img.resize((S, S), Image.BICUBIC), dtype=np.float32).copy())
    return ((x / 255 - MEAN) / STD).permute(2, 0, 1).contiguous()               # (3, S, S)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    ap = ArgumentParser(description="Write a checkpoint of ours as a HoVLE folder (all "
                        "attention) or a released-mmMamba folder (any Mamba-2 layer).")
    ap.add_argument("command", choices=["export"], help="what to do")
    ap.add_argument("--ckpt", required=True, help="e.g. out/stage3_linear.pt")
    ap.add_argument("--out", required=True, help="the folder to write")
    ap.add_argument("--like", help="the HoVLE folder it was distilled from: its config.json "
                    "and tokenizer are carried over (default: the --teacher-hf it records)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="of the weights")
    ap.add_argument("--shard-gb", type=number(float, 1e-9), default=5.0,
                    help="larger weights are written as shards of at most this many GB")
    args = ap.parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, args.ckpt)
    like = args.like or ckpt.get("hf")           # distilled with --teacher-hf: that folder's
    like = HFTokenizer(like) if like else None
    tok = tokenizer_from_checkpoint(ckpt, args.ckpt) if not like and "tokenizer" in ckpt else None
    export_hf(model, args.out, tok, like, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
              args.shard_gb * 1e9)
    n_mamba = model.cfg.kinds.count("M")
    print(f"wrote {args.out}: {n_mamba} Mamba-2 + {model.cfg.n_layer - n_mamba} attention "
          f"layers ({model.cfg.kinds}), {args.dtype}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
