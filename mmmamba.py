"""
The models of mmMamba (arXiv 2502.13145): a decoder-only multimodal transformer (the
teacher), the Mamba-2 layer carved out of its attention (the student), and one model class
whose layers are each attention or Mamba-2, so the teacher, the linear student and any
hybrid are the same code.

Read in the paper's order: config and special tokens; the teacher's pieces (RMSNorm, RoPE,
SwiGLU MLP, attention, the image embedding; docs/method.md §1); the Mamba-2 layer, steps
1-8 (§2); the decoder layer and the model, with decoding last.

Dimension glossary (paper letters in brackets):
    B  batch                 T  sequence length [L]      D  model width (hidden)
    H  query heads           Hkv  key/value heads        hd head dim; in Mamba-2 P = N = hd
    P  Mamba-2 head dim of x (= v)   N  Mamba-2 state size (of B = k and C = q)
    K  causal conv kernel size (2)   V  vocabulary       Np image tokens per image
    G  patch grid side (img_size / img_patch)            m  pixel shuffle factor (img_merge)
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_kernel import ssd
from util import InputError

# -----------------------------------------------------------------------------
# config

# special tokens: fixed ids 0..5, so the model and the tokenizer agree without a lookup
SPECIAL_TOKENS = ["<pad>", "<image>", "<img>", "</img>", "<|im_start|>", "<|im_end|>"]
PAD_ID, IMAGE_ID, IMG_START_ID, IMG_END_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
NEVER_SAMPLED = (PAD_ID, IMAGE_ID, IMG_START_ID, IMG_END_ID)    # padding and image markers


@dataclass
class Config:
    # language model
    vocab_size: int = 1024
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 32
    d_mlp: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02             # a new model's Linear and Embedding weights: N(0, std^2)
    # HoVLE's first layers are its "holistic embedding" stack, with their own RoPE base and
    # RMSNorm eps; layers i < n_embed_layer use these (0: one stack, as in our own teachers)
    n_embed_layer: int = 0
    embed_rope_theta: float = 10000.0
    embed_norm_eps: float = 1e-5
    # image input: conv patches, learned positions, pixel shuffle, MLP projector (no encoder)
    img_size: int = 32
    img_patch: int = 4
    img_merge: int = 1                 # pixel shuffle: m x m patches -> one token (HoVLE: 2)
    img_dim: int = 128                 # width of the patch features before the projector
    img_token_id: int = IMAGE_ID       # the slots the image tokens overwrite (HoVLE: <IMG_CONTEXT>)
    # student: which layers are Mamba-2 ("A" attention, "M" Mamba-2), one letter per layer;
    # "" means all attention (the teacher)
    layout: str = ""
    conv_kernel: int = 2
    scan_backend: str = "auto"         # "auto" (Triton on CUDA), "torch", "triton"
    chunk_size: int = 128

    @property
    def n_img_tokens(self):
        return (self.img_size // self.img_patch) ** 2 // self.img_merge ** 2

    @property
    def kinds(self):
        return self.layout or "A" * self.n_layer


PRESETS = {
    # the classroom default: 0.76M parameters in 2 layers, trains on a 2-core CPU in 5 minutes.
    # 8 px patches merged 2 x 2 by the pixel shuffle, as HoVLE's are: 4 image tokens, one per
    # shape cell, so the teacher learns which cell a question names in 3000 steps, for every
    # seed tried (16 tokens: 2000-8000, by seed); with the wider initialisation, which learns
    # the captions sooner. 2 layers bind as reliably as 4 at 60% of the step (3 do not, in
    # fewer steps); short sequences, each one scan chunk (docs/cpu_study.md).
    "tiny": Config(n_layer=2, img_patch=8, img_merge=2, chunk_size=64, init_std=0.05),
    # a GPU model of tens of millions of parameters; 16 px patches of 64 px images: 16 image
    # tokens, 4 per shape cell (no merge: its recipe was tuned so, docs/small_gpu/README.md)
    "small": Config(n_layer=8, d_model=512, n_head=8, n_kv_head=4, head_dim=64, d_mlp=1536,
                    max_seq_len=512, img_size=64, img_patch=16, img_dim=256, vocab_size=2048),
    # HoVLE's shape (arXiv 2502.13145 Sec. 3; docs/method.md §1) with random weights, for
    # speed and memory: 8 embedding + 24 LLM layers; a 448 px image is 32 x 32 patches of
    # 14 px, merged 2 x 2 by the pixel shuffle into 256 tokens
    "paper": Config(n_layer=32, n_embed_layer=8, d_model=2048, n_head=16, n_kv_head=8,
                    head_dim=128, d_mlp=8192, vocab_size=92553, max_seq_len=131072 + 1024,
                    rope_theta=1e6, embed_rope_theta=1e4, norm_eps=1e-5, embed_norm_eps=1e-5,
                    img_size=448, img_patch=14, img_merge=2, img_dim=2048),
}


def expand_image_placeholder(ids, n_img_tokens):
    """One <image> placeholder -> <img> + n_img_tokens image slots + </img> (docs/method.md
    §1). The slots keep the <image> id; the model overwrites their embeddings with patches."""
    if ids.count(IMAGE_ID) != 1:
        raise InputError(f"the text must hold exactly one <image> placeholder, found "
                         f"{ids.count(IMAGE_ID)}: put one '<image>' where the picture goes")
    i = ids.index(IMAGE_ID)
    return ids[:i] + [IMG_START_ID] + [IMAGE_ID] * n_img_tokens + [IMG_END_ID] + ids[i + 1:]


# -----------------------------------------------------------------------------
# the teacher's pieces: a decoder-only VLM, InternLM2 layers (arXiv 2502.13145 Sec. 3;
# docs/method.md §1)


def _up(x):
    """Upcast bf16/fp16 to float32 for norms and rotations; leave float32/64 as they are."""
    return x.float() if x.element_size() < 4 else x


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = _up(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).type_as(x)


def angles(T, hd, pos, theta, dtype, device):
    """cos and sin of positions pos..pos+T-1 times the hd/2 frequencies, each (T, hd)."""
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, device=device, dtype=dtype) / hd)
    phase = torch.arange(pos, pos + T, device=device, dtype=dtype)[:, None] * freqs  # T, hd/2
    return phase.cos().repeat(1, 2), phase.sin().repeat(1, 2)


rope_angles = functools.lru_cache(maxsize=64)(angles)  # every layer's q, k: the same angles


def rope(x, pos, theta):
    """Rotary position embedding (rotate-half form). x: (B, nh, T, hd); pos: first position.
    The angles are kept (every layer's q and k use the same), except while a CUDA graph records:
    its kernels do not run then, so a tensor kept would hold no values yet."""
    make = angles if x.is_cuda and torch.cuda.is_current_stream_capturing() else rope_angles
    return rotate(x, *make(x.shape[-2], x.shape[-1], pos, theta,
                           torch.promote_types(x.dtype, torch.float32), x.device))


def rotate(x, cos, sin):
    """x's pairs (i, i + hd/2) turned by the angles, in at least fp32 (as _up)."""
    xf = _up(x)
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)      # rotate half


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), InternLM2's naming."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.w2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# Both sequence mixers have mix(u) -> per-head outputs before the output projection (what
# stages 1-2 of the distillation compare) and forward(u, pos, cache) = o_proj(mix).


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and a KV cache."""

    def __init__(self, cfg, rope_theta):
        super().__init__()
        self.cfg, self.rope_theta = cfg, rope_theta
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, cfg.d_model, bias=False)

    def new_cache(self, batch, max_len, device, dtype):
        shape = (batch, self.cfg.n_kv_head, max_len, self.cfg.head_dim)
        return {name: torch.zeros(shape, device=device, dtype=dtype) for name in ("k", "v")}

    def mix(self, u, pos=0, cache=None):
        cfg, (B, T, _) = self.cfg, u.shape
        q = self.q_proj(u).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.k_proj(u).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)   # (B, Hkv, ...)
        v = self.v_proj(u).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        if cache is not None:
            # write into the preallocated cache, attend over everything up to pos + T
            cache["k"][:, :, pos:pos + T] = k
            cache["v"][:, :, pos:pos + T] = v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]
        # one query sees every key; a chunk after a prefix: query i sees keys up to pos + i
        causal = pos == 0 and T > 1
        mask = None if causal or T == 1 else torch.ones(T, pos + T, dtype=torch.bool,
                                                        device=u.device).tril(pos)
        y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)          # (B, T, H*hd)

    def forward(self, u, pos=0, cache=None):
        return self.o_proj(self.mix(u, pos, cache))


def pixel_shuffle(p, grid, m):
    """(B, G*G, C) patches in raster order -> (B, (G/m)^2, m*m*C): merged token R * (G/m) + c
    is the features of patches (m R + dr, m c + dc) side by side, dr-major, i.e. channel
    (dr * m + dc) * C + ch (HoVLE's order; not m*m consecutive patches of one row)."""
    B, _, C = p.shape
    g = grid // m
    p = p.view(B, g, m, g, m, C).permute(0, 1, 3, 2, 4, 5)             # (B, R, c, dr, dc, C)
    return p.reshape(B, g * g, m * m * C)


class ImageEmbed(nn.Module):
    """Image -> Np tokens with no vision encoder: a conv with kernel = stride = patch, a
    learned position per patch, the pixel shuffle, and an MLP projector to the model width."""

    def __init__(self, cfg):
        super().__init__()
        self.grid, self.merge = cfg.img_size // cfg.img_patch, cfg.img_merge
        self.patch = nn.Conv2d(3, cfg.img_dim, cfg.img_patch, stride=cfg.img_patch)
        # random, at about the scale of the patch features: each image token then carries its
        # place in its content, which "where is the square?" needs (zeros: the teacher answered
        # it with the first shape's place)
        self.pos = nn.Parameter(torch.randn(self.grid ** 2, cfg.img_dim) * 0.3)
        self.proj = nn.Sequential(nn.Linear(cfg.img_merge ** 2 * cfg.img_dim, cfg.d_model),
                                  nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))

    def forward(self, images):                                          # (B, 3, S, S) in [-1, 1]
        p = self.patch(images).flatten(2).transpose(1, 2) + self.pos    # (B, G*G, img_dim), raster
        return self.proj(pixel_shuffle(p, self.grid, self.merge))       # (B, Np, D)


# -----------------------------------------------------------------------------
# the student's layer: Mamba-2 in place of attention (arXiv 2502.13145 Sec. 3, Eq. 2;
# docs/method.md §2)


class GatedRMSNorm(RMSNorm):
    """Step 7: each head's y divided by its RMS over the head dim, times ONE weight of
    head-dim size shared by all heads (an RMSNorm of head_dim), then times silu(gate)."""

    def forward(self, y, gate):                                         # (B, T, H, P), (B, T, H*P)
        return super().forward(y).flatten(2) * F.silu(gate)             # (B, T, H*P)


class Mamba2(nn.Module):
    """Projections are named after the SSM letters they feed; seed.py copies the teacher's
    q/k/v/o into c/b/x/o (docs/method.md §4):
        x = W_V u (P per KV head)    B = W_K u (N per KV head)    C = W_Q u (N per head)
    mix() runs a sequence (training, and a prefill when given a cache); step() decodes one
    token from the cache in O(1) of the context. seed.py initialises the parameters that
    attention does not have (the released code's initialisation, or "mimic")."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, Hkv, hd, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        self.x_proj = nn.Linear(D, Hkv * hd, bias=False)                # from W_V
        self.b_proj = nn.Linear(D, Hkv * hd, bias=False)                # from W_K
        self.c_proj = nn.Linear(D, H * hd, bias=False)                  # from W_Q
        self.conv_dim = (2 * Hkv + H) * hd                              # channels of [x, B, C]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim)
        self.dt_proj = nn.Linear(D, H, bias=False)                      # W_dt, bias is dt_bias
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())  # A = -exp(A_log)
        self.g_proj = nn.Linear(D, H * hd, bias=False)                  # W_G, the output gate
        self.norm = GatedRMSNorm(hd, eps=1e-5)          # 1e-5 whatever cfg.norm_eps: released code
        self.o_proj = nn.Linear(H * hd, D, bias=False)                  # from W_O

    def new_cache(self, batch, max_len, device, dtype):
        cfg = self.cfg
        return {"conv": torch.zeros(batch, cfg.conv_kernel - 1, self.conv_dim, device=device,
                                    dtype=dtype),
                "ssm": torch.zeros(batch, cfg.n_head, cfg.head_dim, cfg.head_dim, device=device,
                                   dtype=torch.promote_types(dtype, torch.float32))}  # fp32 or fp64

    def heads(self, xBC):
        """Step 3: split [x, B, C] into heads; KV head g serves the H / Hkv heads after g."""
        H, Hkv, hd = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        x, Bm, Cm = xBC.unflatten(-1, (-1, hd)).split([Hkv, Hkv, H], dim=-2)    # (B, T, heads, hd)
        return x.repeat_interleave(H // Hkv, -2), Bm.repeat_interleave(H // Hkv, -2), Cm

    def mix(self, u, cache=None):
        """Steps 1-7 over a sequence u: (B, T, D) -> (B, T, H*P). With a cache (a prefill),
        the conv and the scan start from its state and leave theirs in it."""
        cfg, (B_, T, _), K = self.cfg, u.shape, self.cfg.conv_kernel
        # 1. x, B, C from the inherited projections (x and B at KV-head width)
        xBC = torch.cat([self.x_proj(u), self.b_proj(u), self.c_proj(u)], dim=-1)  # B, T, conv_dim
        # 2. depthwise causal conv over [x, B, C] (after the cache's last K-1 inputs), SiLU
        past = cache["conv"] if cache is not None else xBC.new_zeros(B_, K - 1, self.conv_dim)
        xBC = torch.cat([past, xBC], dim=1)                                # (B, K-1+T, conv_dim)
        if cache is not None:
            cache["conv"].copy_(xBC[:, -(K - 1):])
        xBC = self.conv1d(xBC.transpose(1, 2)).transpose(1, 2)             # (B, T, conv_dim)
        x, Bm, Cm = self.heads(F.silu(xBC))                                # 3. (B, T, H, P or N)
        # 4. dt = softplus(W_dt u + dt_bias), taken inside the scan; A = -exp(a) per head
        dt, A = self.dt_proj(u), -torch.exp(_up(self.A_log))               # (B, T, H), (H,)
        # 5-6. S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T and y_t = S_t C_t, by the chunked
        # scan (docs/method.md §3); its input is x times dt, as in step() below
        init = cache["ssm"] if cache is not None else None
        y, final = ssd(x, dt, A, Bm, Cm, self.dt_bias, init, cfg.chunk_size, cfg.scan_backend)
        if cache is not None:
            cache["ssm"].copy_(final)
        return self.norm(y, self.g_proj(u))                                # 7. (B, T, H*P)

    def step(self, u, cache):
        """Steps 1-7 for one token u: (B, 1, D), decoding: the conv is a weighted sum over a
        window of the last K inputs and the scan one step of the recurrence, both in place."""
        # 1-2. the window: the cache's last K-1 inputs and this one
        xBC = torch.cat([self.x_proj(u), self.b_proj(u), self.c_proj(u)], dim=-1)  # B, 1, conv_dim
        window = torch.cat([cache["conv"], xBC], dim=1)                    # (B, K, conv_dim)
        cache["conv"].copy_(window[:, 1:])
        xBC = (window * self.conv1d.weight[:, 0].t()).sum(1, keepdim=True) + self.conv1d.bias
        # 3-4. heads, dt and A, in the state's precision (float32 at least)
        S = cache["ssm"]                                                   # (B, H, P, N)
        x, Bm, Cm = (t[:, 0].to(S.dtype) for t in self.heads(F.silu(xBC)))  # (B, H, P or N)
        dt = F.softplus(self.dt_proj(u)[:, 0].to(S.dtype) + self.dt_bias)                # (B, H)
        A = -torch.exp(self.A_log.to(S.dtype))                                           # (H,)
        # 5. decay the state, add the input. x is multiplied by dt here: this deviates from
        # the paper's Eq. 2 (no dt on the input) and follows the released code (docs/method.md §9)
        S.mul_(torch.exp(dt * A)[..., None, None])
        S.add_((dt[..., None] * x)[..., None] * Bm[..., None, :])
        y = (S @ Cm[..., None])[..., 0]                                    # 6. (B, H, P)
        return self.norm(y[:, None].to(u.dtype), self.g_proj(u))           # 7. (B, 1, H*P)

    def forward(self, u, pos=0, cache=None):
        """pos is attention's (a Mamba-2 layer has no positions)."""
        y = self.step(u, cache) if cache is not None and u.shape[1] == 1 else self.mix(u, cache)
        return self.o_proj(y)                                                            # 8. W_O


# -----------------------------------------------------------------------------
# the decoder layer and the model: teacher, linear student, and hybrid (arXiv 2502.13145
# Sec. 4.5; docs/method.md §6)


class Block(nn.Module):
    """Pre-norm decoder layer (InternLM2 style); only the mixer differs between kinds. Layer i
    of HoVLE's embedding stack (i < n_embed_layer) has that stack's RoPE base and norm eps."""

    def __init__(self, cfg, kind, i):
        super().__init__()
        self.kind = kind
        eps = cfg.embed_norm_eps if i < cfg.n_embed_layer else cfg.norm_eps
        theta = cfg.embed_rope_theta if i < cfg.n_embed_layer else cfg.rope_theta
        self.attention_norm = RMSNorm(cfg.d_model, eps)
        self.mixer = Attention(cfg, theta) if kind == "A" else Mamba2(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos=0, cache=None):
        x = x + self.mixer(self.attention_norm(x), pos, cache)
        return x + self.mlp(self.ffn_norm(x))


class Model(nn.Module):
    """Teacher, linear student and hybrid: cfg.layout says which layers are Mamba-2."""

    def __init__(self, cfg):
        super().__init__()
        if len(cfg.kinds) != cfg.n_layer or set(cfg.kinds) - {"A", "M"}:
            raise InputError(f"layout {cfg.layout!r} must have {cfg.n_layer} letters, each A or M")
        if cfg.n_head % cfg.n_kv_head:
            raise InputError(f"n_head {cfg.n_head} must be a multiple of n_kv_head {cfg.n_kv_head}")
        if (cfg.img_size // cfg.img_patch) % cfg.img_merge:
            raise InputError(f"a grid of {cfg.img_size // cfg.img_patch} patches does not merge "
                             f"{cfg.img_merge} x {cfg.img_merge}: change img_size or img_merge")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.vision = ImageEmbed(cfg)
        self.layers = nn.ModuleList(Block(cfg, kind, i) for i, kind in enumerate(cfg.kinds))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for m in self.modules():        # GPT-2's initialisation (its std 0.02 the default)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, tokens, images=None):
        """Token embeddings with the image slots (cfg.img_token_id) overwritten by the image
        tokens, in order."""
        cfg = self.cfg
        x = self.tok_embeddings(tokens)                                 # (B, T, D)
        slots = tokens == cfg.img_token_id
        n_slots, n_images = int(slots.sum()), 0 if images is None else images.shape[0]
        if n_slots != n_images * cfg.n_img_tokens:
            raise InputError(f"{n_slots} image-token slots in the text but {n_images} image(s) of "
                             f"{cfg.n_img_tokens} tokens each: expand each <image> with "
                             "expand_image_placeholder and pass one image per sequence")
        if n_images:
            if tuple(images.shape[1:]) != (3, cfg.img_size, cfg.img_size):
                raise InputError(f"images must be (B, 3, {cfg.img_size}, {cfg.img_size}), got "
                                 f"{tuple(images.shape)}: resize them first")
            patches = self.vision(images.to(x.dtype))                   # (B_img, Np, D)
            x = x.masked_scatter(slots[..., None], patches.reshape(-1, cfg.d_model).to(x.dtype))
        return x

    def forward(self, tokens, images=None, cache=None, at=None):
        """tokens: (B, T) int64; images: (B, 3, S, S) or None. Returns logits (B, T, V), or
        (K, V) at the K positions where the (B, T) mask `at` is True (training scores only the
        answers, and the LM head is a small model's largest matmul). With a cache (new_cache),
        continues from cache.pos and advances it."""
        pos = cache.pos if cache is not None else 0
        T = tokens.shape[1]
        limit = cache.max_len if cache is not None else self.cfg.max_seq_len
        if pos + T > limit:
            raise InputError(f"sequence of {pos + T} tokens is longer than the {limit} this model "
                             "supports: shorten the prompt or lower --max-new-tokens")
        x = self.embed(tokens, images)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        return self.output(x if at is None else x[at])

    def layer_io(self, tokens, images=None):
        """Teacher forcing for distillation stages 1-2: run this model and return, per layer,
        the normed input u of its mixer and the mixer's per-head output (before W_O)."""
        x, ios = self.embed(tokens, images), []
        for layer in self.layers:
            u = layer.attention_norm(x)
            y = layer.mixer.mix(u)
            ios.append((u, y))
            x = x + layer.mixer.o_proj(y)
            x = x + layer.mlp(layer.ffn_norm(x))
        return ios

    # --- decoding ---------------------------------------------------------------

    def new_cache(self, batch, max_len=None, device=None, dtype=None):
        """Per-layer decoding state: a KV cache for attention layers, a conv state and an SSM
        state for Mamba-2 layers (O(1) in the context length)."""
        p, max_len = self.output.weight, max_len or self.cfg.max_seq_len
        return Cache(self, batch, max_len, device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def generate(self, tokens, images=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 stop_id=IM_END_ID, never=NEVER_SAMPLED, generator=None):
        """Stream new token ids: prefill the prompt once, then one cached step per token.
        temperature 0 is greedy. tokens: (1, T). stop_id and never (ids never emitted, with the
        image slot) are the tokenizer's: ours by default, a HoVLE folder's from hf.HFChat."""
        cache = self.new_cache(tokens.shape[0],
                               min(self.cfg.max_seq_len, tokens.shape[1] + max_new_tokens))
        never = torch.tensor([*never, self.cfg.img_token_id], device=tokens.device)
        logits = self(tokens, images, cache)[:, -1]
        for _ in range(max_new_tokens):
            logits[:, never] = -torch.inf                     # first: no temperature revives them
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:  # from the best logit down, in float64: any temperature > 0 gives 0 or -inf
                logits = (logits.double() - logits.max(-1, keepdim=True).values) / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -torch.inf)
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            yield int(nxt[0])
            if int(nxt[0]) == stop_id or cache.pos >= cache.max_len:
                return
            logits = self(nxt, None, cache)[:, -1]


class Cache:
    """Decoding state of a whole model: one dict per layer, and the next position."""

    def __init__(self, model, batch, max_len, device, dtype):
        self.pos, self.max_len = 0, max_len
        self.layers = [b.mixer.new_cache(batch, max_len, device, dtype) for b in model.layers]
