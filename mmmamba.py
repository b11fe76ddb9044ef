"""
The models of mmMamba (arXiv 2502.13145): a decoder-only multimodal transformer (the
teacher), the Mamba-2 layer carved out of its attention (the student), and one model class
whose layers are each attention or Mamba-2, so the teacher, the linear student and any
hybrid are the same code.

Read in dependency order: config, special tokens, building blocks (RMSNorm, RoPE, MLP),
the two sequence mixers (Attention, Mamba2), the decoder layer, the model, decoding.

Dimension glossary (paper letters in brackets, PAPER.md sections 1-2):
    B  batch                 T  sequence length          D  model width (hidden)
    H  query heads           Hkv  key/value heads        hd head dim; in Mamba-2 P = N = hd
    P  Mamba-2 head dim of x (= v)   N  Mamba-2 state size (of B = k and C = q)
    K  causal conv kernel size (2)   V  vocabulary       Np image patches per image
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_kernel import ssd, ssd_step
from util import InputError

# -----------------------------------------------------------------------------
# config


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
    # image input: conv patches, learned positions, MLP projector (no vision encoder)
    img_size: int = 32
    img_patch: int = 4
    img_dim: int = 128                 # width of the patch features before the projector
    # student: which layers are Mamba-2 ("A" attention, "M" Mamba-2), one letter per layer;
    # "" means all attention (the teacher)
    layout: str = ""
    conv_kernel: int = 2
    scan_backend: str = "auto"         # "auto" (Triton on CUDA), "torch", "triton"
    chunk_size: int = 128

    @property
    def n_img_tokens(self):
        return (self.img_size // self.img_patch) ** 2

    @property
    def kinds(self):
        return self.layout or "A" * self.n_layer


PRESETS = {
    # the classroom default: about 1.1M parameters, trains on a 2-core CPU in minutes. 8 px
    # patches (16 image tokens, 4 per shape cell) and 32-token chunks keep a CPU step short.
    "tiny": Config(img_patch=8, chunk_size=32),
    # a GPU model of tens of millions of parameters; 16 px patches of 64 px images: again 16
    # image tokens, 4 per shape cell, with 4x the pixels in each
    "small": Config(n_layer=8, d_model=512, n_head=8, n_kv_head=4, head_dim=64, d_mlp=1536,
                    max_seq_len=512, img_size=64, img_patch=16, img_dim=256, vocab_size=2048),
    # HoVLE's dimensions (PAPER.md section 1), random weights, for benchmarks. 448 px / 14 px
    # patches without HoVLE's 2x2 pixel shuffle would give 1024 tokens; we take 28 px patches
    # so an image is 256 tokens, as after HoVLE's merge.
    "paper": Config(n_layer=32, d_model=2048, n_head=16, n_kv_head=8, head_dim=128, d_mlp=8192,
                    max_seq_len=131072 + 1024, rope_theta=1e6, img_size=448, img_patch=28,
                    img_dim=1024, vocab_size=92553),
}


# -----------------------------------------------------------------------------
# special tokens: fixed ids 0..5, so the model and the tokenizer agree without a lookup

SPECIAL_TOKENS = ["<pad>", "<image>", "<img>", "</img>", "<|im_start|>", "<|im_end|>"]
PAD_ID, IMAGE_ID, IMG_START_ID, IMG_END_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))


def expand_image_placeholder(ids, n_img_tokens):
    """One <image> placeholder -> <img> + n_img_tokens image slots + </img> (PAPER.md 1).
    The slots keep the <image> id; the model overwrites their embeddings with patches."""
    if ids.count(IMAGE_ID) != 1:
        raise InputError(f"the text must hold exactly one <image> placeholder, found "
                         f"{ids.count(IMAGE_ID)}: put one '<image>' where the picture goes")
    i = ids.index(IMAGE_ID)
    return ids[:i] + [IMG_START_ID] + [IMAGE_ID] * n_img_tokens + [IMG_END_ID] + ids[i + 1:]


# -----------------------------------------------------------------------------
# building blocks


def _up(x):
    """Upcast bf16/fp16 to float32 for norms and rotations; leave float32/64 as they are."""
    return x.float() if x.element_size() < 4 else x


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = _up(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).type_as(x)


def rope(x, pos, theta):
    """Rotary position embedding (rotate-half form). x: (B, nh, T, hd); pos: first position."""
    T, hd = x.shape[-2], x.shape[-1]
    xf = _up(x)
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=xf.dtype) / hd)
    angles = torch.arange(pos, pos + T, device=x.device, dtype=xf.dtype)[:, None] * freqs  # (T, hd/2)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)     # (T, hd)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), InternLM2's naming."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.w2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.register_buffer("packed", None, persistent=False)        # see pack_for_decoding

    def forward(self, x):
        gate, up = project(x, (self.w1, self.w3), self.packed)
        return self.w2(F.silu(gate) * up)


def project(u, linears, packed=None):
    """u through several bias-free Linear layers that read it: one matmul each, or one matmul
    in all over `packed`, their weights stacked (pack_for_decoding)."""
    if packed is None:
        return [lin(u) for lin in linears]
    return F.linear(u, packed).split([lin.out_features for lin in linears], dim=-1)


# -----------------------------------------------------------------------------
# the two sequence mixers. Both have mix(u) -> per-head outputs before the output
# projection (what stages 1-2 of the distillation compare), and forward = o_proj(mix).


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE and a KV cache (PAPER.md section 1)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, cfg.d_model, bias=False)
        self.register_buffer("packed", None, persistent=False)        # see pack_for_decoding

    def new_cache(self, batch, max_len, device, dtype):
        shape = (batch, self.cfg.n_kv_head, max_len, self.cfg.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    def mix(self, u, pos=0, cache=None):
        cfg = self.cfg
        B, T, _ = u.shape
        q, k, v = project(u, (self.q_proj, self.k_proj, self.v_proj), self.packed)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)                     # (B, H, T, hd)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)                  # (B, Hkv, T, hd)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
        if cache is not None:
            # write into the preallocated cache, attend over everything up to pos + T
            cache["k"][:, :, pos:pos + T] = k
            cache["v"][:, :, pos:pos + T] = v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]
        if T == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)              # one query sees all
        elif pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # a chunk after a prefix: query i sees keys up to pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=u.device).tril(pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)               # (B, T, H*hd)

    def forward(self, u, pos=0, cache=None):
        return self.o_proj(self.mix(u, pos, cache))


class Mamba2(nn.Module):
    """The student layer, PAPER.md section 2, steps 1-8. Projections are named after the SSM
    letters they feed; seed.py copies the teacher's q/k/v/o into c/b/x/o.
        x = W_V u (P per KV head)    B = W_K u (N per KV head)    C = W_Q u (N per head)
    The default initialisation here is Mamba-2's own; seed.py's "mimic" replaces it."""

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
        dt0 = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus^-1(dt0)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.g_proj = nn.Linear(D, H * hd, bias=False)                  # W_G, the output gate
        self.norm = RMSNorm(H * hd, cfg.norm_eps)                       # applied per head
        self.o_proj = nn.Linear(H * hd, D, bias=False)                  # from W_O
        self.register_buffer("packed", None, persistent=False)        # see pack_for_decoding

    def new_cache(self, batch, max_len, device, dtype):
        cfg = self.cfg
        return {"conv": torch.zeros(batch, cfg.conv_kernel - 1, self.conv_dim, device=device, dtype=dtype),
                "ssm": torch.zeros(batch, cfg.n_head, cfg.head_dim, cfg.head_dim, device=device,
                                   dtype=torch.promote_types(dtype, torch.float32))}  # fp32 or fp64

    def mix(self, u, pos=0, cache=None):
        cfg = self.cfg
        B_, T, _ = u.shape
        H, Hkv, hd, K = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.conv_kernel
        # 1-2. projections, then a depthwise causal conv over [x, B, C] and SiLU
        x, Bm, Cm, dt, gate = project(u, (self.x_proj, self.b_proj, self.c_proj, self.dt_proj,
                                          self.g_proj), self.packed)
        xBC = torch.cat([x, Bm, Cm], dim=-1)                                             # (B, T, conv_dim)
        past = cache["conv"] if cache is not None else xBC.new_zeros(B_, K - 1, self.conv_dim)
        xBC = torch.cat([past, xBC], dim=1)                                              # (B, K-1+T, conv_dim)
        if cache is not None:
            cache["conv"].copy_(xBC[:, -(K - 1):])
        if cache is not None and T == 1:  # decoding: the conv over the K-token window is a weighted sum
            xBC = (xBC * self.conv1d.weight[:, 0].t()).sum(1, keepdim=True) + self.conv1d.bias
        else:
            xBC = F.conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                           groups=self.conv_dim).transpose(1, 2)
        xBC = F.silu(xBC)                                                                # (B, T, conv_dim)
        x, Bm, Cm = xBC.split([Hkv * hd, Hkv * hd, H * hd], dim=-1)
        # 3. each KV head serves H / Hkv consecutive heads
        x = x.view(B_, T, Hkv, hd).repeat_interleave(H // Hkv, dim=2)                    # (B, T, H, P)
        Bm = Bm.view(B_, T, Hkv, hd).repeat_interleave(H // Hkv, dim=2)                  # (B, T, H, N)
        Cm = Cm.view(B_, T, H, hd)                                                       # (B, T, H, N)
        # 4. dt (softplus(W_dt u + dt_bias) inside the scan) and A = -exp(a)
        A = -torch.exp(_up(self.A_log))                                               # (H,)
        # 5-6. the SSD scan: recurrent for one cached token, chunked otherwise
        if cache is not None and T == 1:
            y, _ = ssd_step(cache["ssm"], x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], self.dt_bias,
                            inplace=True, backend=cfg.scan_backend)
            y = y[:, None]
        else:
            init = cache["ssm"] if cache is not None else None
            y, final = ssd(x, dt, A, Bm, Cm, self.dt_bias, init, cfg.chunk_size, cfg.scan_backend)
            if cache is not None:
                cache["ssm"].copy_(final)
        # 7. per-head RMSNorm, then the SiLU gate
        y = _up(y.reshape(B_, T, H, hd))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        y = (y.reshape(B_, T, H * hd) * self.norm.weight).type_as(u)
        return y * F.silu(gate)                                                          # (B, T, H*P)

    def forward(self, u, pos=0, cache=None):
        return self.o_proj(self.mix(u, pos, cache))                     # 8. W_O


# -----------------------------------------------------------------------------
# the decoder layer and the model


class Block(nn.Module):
    """Pre-norm decoder layer (InternLM2 style); only the mixer differs between kinds."""

    def __init__(self, cfg, kind):
        super().__init__()
        self.kind = kind
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg) if kind == "A" else Mamba2(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos=0, cache=None):
        x = x + self.mixer(self.attention_norm(x), pos, cache)
        return x + self.mlp(self.ffn_norm(x))


class ImageEmbed(nn.Module):
    """Image -> Np patch tokens: conv with kernel = stride = patch, learned positions, and
    an MLP projector to the model width (PAPER.md section 1; no vision encoder)."""

    def __init__(self, cfg):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.img_dim, cfg.img_patch, stride=cfg.img_patch)
        # random, at about the scale of the patch features: each image token then carries its
        # place in its content, which "where is the square?" needs (zeros: the teacher answered
        # it with the first shape's place)
        self.pos = nn.Parameter(torch.randn(cfg.n_img_tokens, cfg.img_dim) * 0.3)
        self.proj = nn.Sequential(nn.Linear(cfg.img_dim, cfg.d_model), nn.GELU(),
                                  nn.Linear(cfg.d_model, cfg.d_model))

    def forward(self, images):                                          # (B, 3, S, S) in [-1, 1]
        p = self.patch(images).flatten(2).transpose(1, 2)               # (B, Np, img_dim), raster order
        return self.proj(p + self.pos)                                  # (B, Np, D)


class Model(nn.Module):
    """Teacher, linear student and hybrid: cfg.layout says which layers are Mamba-2."""

    def __init__(self, cfg):
        super().__init__()
        if len(cfg.kinds) != cfg.n_layer or set(cfg.kinds) - {"A", "M"}:
            raise InputError(f"layout {cfg.layout!r} must have {cfg.n_layer} letters, each A or M")
        if cfg.n_head % cfg.n_kv_head:
            raise InputError(f"n_head {cfg.n_head} must be a multiple of n_kv_head {cfg.n_kv_head}")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.vision = ImageEmbed(cfg)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.kinds)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed(self, tokens, images=None):
        """Token embeddings with the image slots (the <image> id) overwritten by patches."""
        cfg = self.cfg
        x = self.tok_embeddings(tokens)                                 # (B, T, D)
        if images is None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return x  # counting slots syncs with the host, illegal in a CUDA graph (bench.py)
        slots = tokens == IMAGE_ID
        n_slots, n_images = int(slots.sum()), 0 if images is None else images.shape[0]
        if n_slots != n_images * cfg.n_img_tokens:
            raise InputError(f"{n_slots} image-token slots in the text but {n_images} image(s) of "
                             f"{cfg.n_img_tokens} patches each: expand each <image> with "
                             "expand_image_placeholder and pass one image per sequence")
        if n_images:
            if tuple(images.shape[1:]) != (3, cfg.img_size, cfg.img_size):
                raise InputError(f"images must be (B, 3, {cfg.img_size}, {cfg.img_size}), got "
                                 f"{tuple(images.shape)}: resize them first")
            patches = self.vision(images.to(x.dtype))                   # (B_img, Np, D)
            x = x.masked_scatter(slots[..., None], patches.reshape(-1, cfg.d_model).to(x.dtype))
        return x

    def forward(self, tokens, images=None, cache=None):
        """tokens: (B, T) int64; images: (B, 3, S, S) or None. Returns logits (B, T, V).
        With a cache (new_cache), continues from cache.pos and advances it."""
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
        return self.output(self.norm(x))

    def layer_io(self, tokens, images=None):
        """Teacher forcing for distillation stages 1-2: run this model and return, per layer,
        the normed input u of its mixer and the mixer's per-head output (before W_O)."""
        x = self.embed(tokens, images)
        ios = []
        for layer in self.layers:
            u = layer.attention_norm(x)
            y = layer.mixer.mix(u)
            ios.append((u, y))
            x = x + layer.mixer.o_proj(y)
            x = x + layer.mlp(layer.ffn_norm(x))
        return ios

    # --- decoding ---------------------------------------------------------------

    @torch.no_grad()
    def pack_for_decoding(self):
        """Inference only, after .to(device, dtype): stack the weights of the projections that
        read the same input (q, k, v; x, B, C, dt, gate; the MLP's w1, w3) into one matrix each
        and make each weight a view of its rows. The parameters and state_dict stay the same, no
        memory is added, and each group runs as one matmul: at one token a matmul costs ~3 us
        before it moves a byte, and these are small (docs/bench_log.md)."""
        for layer in self.layers:
            m, mlp = layer.mixer, layer.mlp
            mixer_group = ((m.q_proj, m.k_proj, m.v_proj) if isinstance(m, Attention) else
                           (m.x_proj, m.b_proj, m.c_proj, m.dt_proj, m.g_proj))
            for owner, group in ((m, mixer_group), (mlp, (mlp.w1, mlp.w3))):
                owner.packed = torch.cat([lin.weight for lin in group])
                for lin, w in zip(group, owner.packed.split([lin.out_features for lin in group])):
                    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
        return self

    def new_cache(self, batch, max_len=None, device=None, dtype=None):
        """Per-layer decoding state: a KV cache for attention layers, a conv state and an SSM
        state for Mamba-2 layers (O(1) in the context length)."""
        p = self.output.weight
        return Cache(self, batch, max_len or self.cfg.max_seq_len, device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def generate(self, tokens, images=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 stop_id=IM_END_ID, generator=None):
        """Stream new token ids: prefill the prompt once, then one cached step per token.
        temperature 0 is greedy. tokens: (1, T)."""
        cache = self.new_cache(tokens.shape[0], min(self.cfg.max_seq_len, tokens.shape[1] + max_new_tokens))
        never = torch.tensor([PAD_ID, IMAGE_ID, IMG_START_ID, IMG_END_ID], device=tokens.device)
        logits = self(tokens, images, cache)[:, -1]
        for _ in range(max_new_tokens):
            logits[:, never] = -torch.inf                               # image slots come from images
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits.float() / temperature
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
        self.layers = [layer.mixer.new_cache(batch, max_len, device, dtype) for layer in model.layers]
