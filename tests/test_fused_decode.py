"""fused_decode.Decoder against the model's own decode step (mmmamba.py).

CPU (CI): the kernels in Triton's interpreter, float32, against the same model in float64:
the logits and every cache entry the step writes (K and V at pos, the conv and SSM states),
on awkward sizes (widths and vocabularies that are not powers of two, grouped and ungrouped
heads, conv widths 2 and 3, HoVLE's two stacks with their own RoPE base and norm eps), and
greedy decoding against Model.generate. Every weight and cache entry is random, never zeros
or the ones of a fresh RMSNorm. GPU: bf16 at the paper's layer shapes, compiled kernels
inside a CUDA graph. On any machine: the weight packing changes nothing but speed.
"""
import copy
import os
from dataclasses import replace

import pytest
import torch

import fused_decode as fd
from bench import rel_err as rel
from mmmamba import Config, Model
from util import InputError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (INTERPRET and fd.HAS_TRITON),
                                       reason="interpreter tests: CPU-only machines with triton")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fd.HAS_TRITON),
                                reason="needs a CUDA GPU and triton")

BASE = Config(vocab_size=300, n_layer=3, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_mlp=96,
              max_seq_len=64, layout="AMA")
CASES = {
    "attention-mamba-attention": BASE,
    "conv-3-ungrouped": replace(BASE, layout="MAM", n_kv_head=4, conv_kernel=3),
    "odd-widths": replace(BASE, n_layer=2, layout="MA", d_model=80, d_mlp=200, vocab_size=257,
                          n_head=2, n_kv_head=1, head_dim=32),
    # layers 0-1 are the embedding stack: RoPE base 300 and eps 2e-3; layer 2 base 1e6 and eps
    # 3e-2. Any kernel given another layer's base or eps (the gated norm's is 1e-5 whatever)
    # is off by 7e-3 to 1.5 (measured by swapping each in turn), far above the 1e-5 allowed.
    "embedding-stack": replace(BASE, n_embed_layer=2, embed_rope_theta=300.0, embed_norm_eps=2e-3,
                               rope_theta=1e6, norm_eps=3e-2),
}


def random_model(cfg, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))          # not the ones of a fresh norm
            elif "A_log" not in name and "dt_bias" not in name:        # those are random already
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
    return model.to(dtype).eval()


def random_caches(models, max_len, pos):
    """One cache per model, all holding the same random entries (~N(0, 0.5)), at `pos`."""
    caches = [m.new_cache(1, max_len) for m in models]
    for layer in zip(*(c.layers for c in caches)):
        for key, t in layer[0].items():
            t.normal_(0, 0.5)
            for other in layer[1:]:
                other[key].copy_(t)
    for c in caches:
        c.pos = pos
    return caches


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_float64(case, pdl=False):
    model = random_model(CASES[case])
    ref = copy.deepcopy(model).double()
    cache, ref_cache = random_caches([model, ref], max_len=16, pos=5)
    token = torch.tensor([[7]])
    dec = fd.Decoder(model)
    dec.pdl = pdl                                   # True: see pdl_in_the_interpreter
    logits = dec.step(token, cache)
    want = ref(token, None, ref_cache)
    errs = {"logits": rel(logits, want)}
    for i, (c, rc) in enumerate(zip(cache.layers, ref_cache.layers)):
        errs.update({f"layer {i} {key}": rel(c[key], rc[key]) for key in c})
    bad = {k: v for k, v in errs.items() if not v < 1e-5}
    assert not bad, f"fused step off the float64 model ({case}): {bad}"
    assert cache.pos == 6


def pdl_in_the_interpreter(monkeypatch):
    """The interpreter cannot run PDL's two instructions or its launch option: no-ops for them,
    so a kernel's PDL=True code (what it reads before and after the wait) runs on the CPU too.
    The ordering itself only a GPU shows."""
    import triton
    import triton.language.extra.cuda as cuda

    @triton.jit
    def nothing():
        pass
    monkeypatch.setattr(cuda, "gdc_wait", nothing)
    monkeypatch.setattr(cuda, "gdc_launch_dependents", nothing)
    monkeypatch.setattr(fd, "_launch", lambda pdl: dict(PDL=pdl))


@needs_interpreter
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("heads,kv_heads,hd,pos", [(4, 2, 16, 0), (4, 2, 16, 31), (4, 2, 16, 32),
                                                   (6, 2, 32, 257), (8, 1, 16, 150), (2, 2, 16, 8)])
def test_split_attention_matches_float64(heads, kv_heads, hd, pos, pdl, monkeypatch):
    # fused_decode.attend (the split-KV kernels) against scaled_dot_product_attention in
    # float64: one key (pos 0), a block of keys exactly full (31) and one past it (32), three
    # query heads a KV head (padded to 4), one KV head for 8, no grouping; several splits
    # (the CPU counts as 4 SMs: 2 to 4 splits here; at 257 two blocks a split, pos in the
    # first), the cache longer than pos. pdl: the first block read before the wait, pos after
    if pdl:
        pdl_in_the_interpreter(monkeypatch)
    torch.manual_seed(pos)
    q = torch.randn(heads * hd)
    k, v = (torch.randn(1, kv_heads, pos + 9, hd) for _ in "kv")
    got = fd.attend(q, k, v, pos, heads, pdl)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double().view(1, heads, 1, hd), k.double()[:, :, :pos + 1], v.double()[:, :, :pos + 1],
        enable_gqa=True).reshape(-1)
    assert rel(got, want) < 1e-6, rel(got, want)


@needs_interpreter
@pytest.mark.parametrize("case", ["attention-mamba-attention", "embedding-stack"])
def test_step_with_split_attention(case, monkeypatch):
    monkeypatch.setattr(fd, "ATTENTION", "split")
    test_step_matches_float64(case)


@needs_interpreter
@pytest.mark.parametrize("case", ["attention-mamba-attention", "conv-3-ungrouped"])
def test_step_with_pdl_code(case, monkeypatch):
    # every kernel's PDL=True code (the weights, and the attention's first keys and values,
    # read before the wait), the split attention launched early, against float64
    pdl_in_the_interpreter(monkeypatch)
    monkeypatch.setattr(fd, "ATTENTION", "split")
    test_step_matches_float64(case, pdl=True)


@needs_interpreter
def test_greedy_decoding_matches_generate():
    model = random_model(replace(BASE, layout="MAM"), seed=1)
    prompt = torch.randint(6, BASE.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    want = list(model.generate(prompt, max_new_tokens=6, stop_id=-1))
    cache = model.new_cache(1, 16)
    logits, got, dec = model(prompt, None, cache)[:, -1:], [], fd.Decoder(model)
    for _ in range(6):
        logits[..., :6] = -torch.inf                            # generate never picks these ids
        got.append(int(logits.argmax()))
        logits = dec.step(torch.tensor([[got[-1]]]), cache)
    assert got == want, f"fused greedy tokens {got} != Model.generate {want}"


@needs_interpreter
def test_clear_errors(monkeypatch):
    model = random_model(BASE)
    dec, cache = fd.Decoder(model), model.new_cache(2, 8)
    for tokens in (torch.zeros(2, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)):
        with pytest.raises(InputError, match="one token of one sequence"):
            dec.step(tokens, cache)                                     # a batch of 2
    cache = model.new_cache(1, 8)
    cache.pos = 8
    with pytest.raises(InputError, match="past the cache"):
        dec.step(torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(InputError, match="power of two"):
        fd.Decoder(random_model(replace(BASE, head_dim=24)))
    with pytest.raises(InputError, match="fp16, bf16 or fp32"):
        fd.Decoder(random_model(BASE, dtype=torch.float64))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InputError, match="CUDA GPU"):
        fd.Decoder(model)


@needs_cuda
@pytest.mark.parametrize("layout,attention", [("AM", "sdpa"), ("MA", "sdpa"), ("AM", "split")])
def test_gpu_bf16_paper_shapes_in_a_graph(layout, attention, monkeypatch):
    # bf16 against float64: at least as close as the PyTorch step in bf16 (the fused kernels
    # keep fp32 between the matmuls where PyTorch rounds to bf16 after every op)
    monkeypatch.setattr(fd, "ATTENTION", attention)
    cfg = replace(Config(n_layer=2, d_model=2048, n_head=16, n_kv_head=8, head_dim=128, d_mlp=8192,
                         vocab_size=32003, max_seq_len=4096, rope_theta=1e6), layout=layout)
    model = random_model(cfg, "cuda", torch.bfloat16)
    ref = copy.deepcopy(model).double()                         # the bf16 weights, in float64
    fd.pack_for_decoding(model)
    token = torch.tensor([[11]], device="cuda")
    dec = fd.Decoder(model)
    dec.step(token, random_caches([model], 3000, 2500)[0])             # compile outside the capture
    fused, eager, want = random_caches([model, model, ref], max_len=3000, pos=2500)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = dec.step(token, fused)
    graph.replay()
    eager_logits, want_logits = model(token, None, eager), ref(token, None, want)
    err, eager_err = rel(logits, want_logits), rel(eager_logits, want_logits)
    assert err <= 1.25 * eager_err + 1e-3, \
        f"fused bf16 logits {err:.3g} off float64, PyTorch bf16 {eager_err:.3g}"
    errs = {f"layer {i} {key}": rel(c[key], w[key])
            for i, (c, w) in enumerate(zip(fused.layers, want.layers)) for key in c}
    bad = {k: v for k, v in errs.items() if not v < 2e-2}
    assert not bad, f"bf16 fused step wrote caches off the float64 model: {bad}"
    assert fused.pos == 2501


def test_packing_changes_nothing_but_speed():
    """pack_for_decoding stacks each group of projections into one matrix: the parameters
    become views of it (no copy kept, the same state_dict), the model decodes exactly as
    before, packing again reuses the matrices, and after .to() it packs anew."""
    for layout in ("AAA", "MAM"):
        model = random_model(replace(BASE, layout=layout)).double()
        keys = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(6, BASE.vocab_size, (1, 9), generator=g)
        outs = []
        for packed in (False, True):
            if packed:
                mats = fd.pack_for_decoding(model)
            cache = model.new_cache(1)
            prefill = model(tokens[:, :5], None, cache)
            steps = [model(tokens[:, t:t + 1], None, cache) for t in range(5, 9)]
            outs.append(torch.cat([prefill] + steps, 1))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
        after = model.state_dict()
        assert after.keys() == keys.keys()
        assert all(torch.equal(after[k], v) for k, v in keys.items())
        for layer, (w_mix, w_mlp) in zip(model.layers, mats):
            m = layer.mixer
            group = ((m.q_proj, m.k_proj, m.v_proj) if layer.kind == "A" else
                     (m.x_proj, m.b_proj, m.c_proj, m.dt_proj, m.g_proj))
            assert torch.equal(w_mix, torch.cat([lin.weight for lin in group]))
            assert all(lin.weight.untyped_storage().data_ptr() == w_mix.untyped_storage().data_ptr()
                       for lin in group)
            assert torch.equal(w_mlp, torch.cat([layer.mlp.w1.weight, layer.mlp.w3.weight]))
            assert layer.mlp.w3.weight.data_ptr() == w_mlp[BASE.d_mlp:].data_ptr()
        again = fd.pack_for_decoding(model)
        assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(again, mats))
        model.float()                                          # new tensors: the views are gone
        anew = fd.pack_for_decoding(model)
        assert anew[0][0].dtype == torch.float32 and anew[0][0] is not mats[0][0]
        first = model.layers[0].mixer
        first = first.q_proj if isinstance(first, fd.Attention) else first.x_proj
        assert first.weight.data_ptr() == anew[0][0].data_ptr()
