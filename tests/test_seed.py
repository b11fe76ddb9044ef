"""Seeding: copied weights are equal; a freshly seeded layer is the decayed linear attention
it is meant to mimic (computed here independently, with loops); inherit and scratch start
from the released code's initialisation; on a trained micro teacher, mimic starts closest to
the teacher's attention; the stage-3 hybrid takes each part from the right model."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import distill
from mmmamba import Config, Model
from util import InputError, checkpoint_of, load_checkpoint, model_from_checkpoint, save_checkpoint
from seed import COPY, seed_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = Config(vocab_size=50, n_layer=3, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=48,
             max_seq_len=40, img_size=8, img_patch=4, img_dim=8, chunk_size=4,
             scan_backend="torch")


def teacher(seed=0):
    torch.manual_seed(seed)
    t = Model(CFG).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return t


@pytest.mark.parametrize("init", ["mimic", "inherit", "scratch"])
def test_copied_weights_are_equal(init):
    t = teacher()
    s = seed_student(t, "MAM", init)
    t_sd, s_sd = t.state_dict(), s.state_dict()
    for name in ["tok_embeddings.weight", "output.weight", "layers.0.mlp.w1.weight",
                 "layers.2.ffn_norm.weight", "vision.patch.weight"]:
        assert torch.equal(t_sd[name], s_sd[name])
    for name, p in t.layers[1].state_dict().items():               # the kept attention layer
        assert torch.equal(p, s.layers[1].state_dict()[name])
    for i in (0, 2):
        for tn, sn in COPY.items():
            at = f"layers.{i}.mixer."
            same = torch.equal(t_sd[f"{at}{tn}.weight"], s_sd[f"{at}{sn}.weight"])
            assert same == (init != "scratch" or tn == "o_proj"), (init, tn)


def test_mimic_layer_is_decayed_linear_attention():
    torch.manual_seed(1)
    s = seed_student(teacher(), "MMM", "mimic")
    mixer = s.layers[1].mixer
    T, H, Hkv, hd = 9, CFG.n_head, CFG.n_kv_head, CFG.head_dim
    u = torch.randn(2, T, CFG.d_model, dtype=torch.float64)
    got = mixer(u)
    # independently: identity conv + SiLU, so q, k, v are silu of the copied projections
    q = F.silu(u @ mixer.c_proj.weight.T).view(2, T, H, hd)
    k = F.silu(u @ mixer.b_proj.weight.T).view(2, T, Hkv, hd)
    v = F.silu(u @ mixer.x_proj.weight.T).view(2, T, Hkv, hd)
    dt = F.softplus(mixer.dt_bias)                                  # W_dt = 0: one dt per head
    A = -torch.e                                                    # A_log = 1
    y = torch.zeros(2, T, H, hd, dtype=torch.float64)
    for h in range(H):
        g = h // (H // Hkv)                                         # the KV head serving head h
        for t in range(T):
            for s_ in range(t + 1):
                w = (q[:, t, h] * k[:, s_, g]).sum(-1) * dt[h] * torch.exp(A * dt[h] * (t - s_))
                y[:, t, h] += w[:, None] * v[:, s_, g]
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)   # per-head RMSNorm, eps 1e-5
    y = y.reshape(2, T, H * hd) * F.silu(u @ mixer.g_proj.weight.T)      # SiLU gate
    expected = y @ mixer.o_proj.weight.T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # mimic: dt is small and A = -e, so the decay per step stays close to 1
    assert (torch.exp(A * dt) > 0.75).all()


def test_seeding_a_student_again_is_refused():
    s = seed_student(teacher(), "MMM")
    with pytest.raises(InputError, match="needs a teacher"):
        seed_student(s, "MMM")


def test_seed_command_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)                     # the paths below are relative to it
    t = teacher().float()
    save_checkpoint(tmp_path / "teacher.pt", checkpoint_of(
        t, kind="teacher", stage=0, done=True, losses=[1.0], tokenizer="{}", preset="tiny"))
    code, out, err = command("seed", "--teacher", "teacher.pt", "--out", "hybrid.pt",
                             "--attn-every", "2")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "hybrid.pt")
    assert ckpt["config"]["layout"] == "AMA" and ckpt["init"] == "mimic"
    assert (ckpt["tokenizer"], ckpt["preset"]) == ("{}", "tiny")          # kept from the teacher
    # it says what it is, not what the teacher was
    assert (ckpt["kind"], ckpt["stage"]) == ("hybrid", "seeded") and "done" not in ckpt
    assert "losses" not in ckpt and "not distilled" in out
    s = model_from_checkpoint(ckpt)
    assert torch.equal(s.layers[1].mixer.c_proj.weight, t.layers[1].mixer.q_proj.weight)
    # bad input: one line on stderr, exit code 2, no traceback, nothing written
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for args, msg in [(["--teacher", "missing.pt"], "no checkpoint"),
                      (["--teacher", "teacher.pt", "--attn-layers", "0,7"], "out of range"),
                      (["--teacher", "teacher.pt", "--attn-layers", "x"], "comma-separated"),
                      (["--teacher", "teacher.pt", "--attn-every", "0"], "1 or more"),
                      (["--teacher", "junk.pt"], "not a readable")]:
        code, out, err = command("seed", *args, "--out", "bad.pt")
        assert code == 2 and msg in err, (args, err)
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad.pt").exists()


def test_seed_py_bad_input_as_a_process(tmp_path):
    """`python seed.py` itself (its __main__ block, in a process of its own): one line."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "seed.py"), "--teacher", "missing.pt",
                        "--out", "bad.pt"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.pt").exists()


def test_make_hybrid_takes_attention_from_the_teacher_and_mamba_from_the_student():
    from seed import make_hybrid
    t = teacher()
    s = seed_student(t, "MMM", "mimic")
    with torch.no_grad():                                   # as if stages 1-2 had trained it
        for name, p in s.named_parameters():
            if ".mixer." in name:
                p.add_(torch.randn_like(p) * 0.1)
    h = make_hybrid(s, t, "AMA")
    assert h.cfg.kinds == "AMA" and h.layers[0].kind == "A"
    h_sd, t_sd, s_sd = h.state_dict(), t.state_dict(), s.state_dict()
    assert set(h_sd) == {k for k in t_sd if not k.startswith("layers.1.mixer.")} | \
        {k for k in s_sd if k.startswith("layers.1.mixer.")}
    for name, p in h_sd.items():
        src = s_sd if name.startswith("layers.1.mixer.") else t_sd
        assert torch.equal(p, src[name]), name
    tokens = torch.randint(6, CFG.vocab_size, (2, 7))
    assert not torch.allclose(h(tokens), t(tokens)) and not torch.allclose(h(tokens), s(tokens))
    with pytest.raises(InputError, match="linear student"):
        make_hybrid(h, t, "AMA")


@pytest.mark.parametrize("init", ["inherit", "scratch"])
def test_without_mimic_the_new_parameters_start_as_the_released_code(init):
    """dt_bias 0, W_dt (and for scratch the x, B, C projections) at PyTorch's default Linear
    init, U(-1/sqrt(D), 1/sqrt(D)), not the model's N(0, 0.02); conv1d at PyTorch's default;
    A = -U(1, 16); W_G Xavier-uniform with gain 2^-2.5; the norm weight ones."""
    torch.manual_seed(0)
    big = Config(**{**CFG.__dict__, "d_model": 256, "n_head": 8, "n_kv_head": 4, "head_dim": 32})
    t = Model(big).double()
    m = seed_student(t, "MMM", init).layers[1].mixer
    D, bound = big.d_model, 1 / math.sqrt(big.d_model)

    def default_linear(w):                  # uniform on +-1/sqrt(D): std 1/sqrt(3 D), here 0.036
        return w.abs().max() <= bound and abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1

    assert torch.equal(m.dt_bias, torch.zeros_like(m.dt_bias)) and default_linear(m.dt_proj.weight)
    assert (m.A_log >= 0).all() and (m.A_log <= math.log(16)).all() and m.A_log.std() > 0.3
    xavier = 2 ** -2.5 * math.sqrt(6 / (D + big.n_head * big.head_dim))
    assert m.g_proj.weight.abs().max() <= xavier and m.g_proj.weight.abs().max() > 0.9 * xavier
    conv = 1 / math.sqrt(big.conv_kernel)                  # fan-in of a depthwise tap pair
    assert m.conv1d.weight.abs().max() <= conv and m.conv1d.bias.abs().max() <= conv
    assert m.conv1d.weight.std() > 0.3 and torch.equal(m.norm.weight, torch.ones(big.head_dim))
    for s_name, t_name in (("x_proj", "v_proj"), ("b_proj", "k_proj"), ("c_proj", "q_proj")):
        w, teacher_w = getattr(m, s_name).weight, getattr(t.layers[1].mixer, t_name).weight
        assert torch.equal(w, teacher_w) == (init == "inherit")
        if init == "scratch":
            assert default_linear(w), s_name


def markov_teacher(steps=100):
    """A 2-layer micro teacher trained on a Markov chain of tokens (the next token is a fixed
    permutation of the last one, 70% of the time), so that its attention has learnt something."""
    cfg = Config(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, head_dim=8,
                 d_mlp=64, max_seq_len=64, chunk_size=16, img_size=8, img_patch=4, img_dim=8,
                 scan_backend="torch")
    perm = torch.randperm(58, generator=torch.Generator().manual_seed(5)) + 6

    def batch(g, B):
        x = torch.randint(6, 64, (B, 24), generator=g)
        for t in range(1, 24):
            x[:, t] = torch.where(torch.rand(B, generator=g) < 0.7, perm[x[:, t - 1] - 6], x[:, t])
        return x

    torch.manual_seed(0)
    model = Model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = batch(g, 16)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), batch(torch.Generator().manual_seed(1), 64), loss.item()


def test_mimic_starts_closest_to_the_teacher():
    """The paper's reason for mimic (arXiv 2502.13145 Sec. 4.1): at step 0, before any
    distillation, its layer-wise loss is the lowest of the three initialisations, in the mean
    over 4 seeds of the new parameters (over 12 seeds: mimic 1.20-1.23, inherit 6.1-7.0,
    scratch 6.2-7.1). inherit against scratch is not tested: at step 0 with the released
    code's initialisation the two are level (inherit lower for 7 of 12 seeds, the means 0.5%
    apart; its random conv scrambles the channels of the inherited x, B, C), and the paper's
    Table 4 compares them after training."""
    teacher, tokens, loss = markov_teacher()
    assert loss < 2.5                                   # it learnt the chain (blind: ln 58 = 4.06)
    losses = {init: [] for init in ("mimic", "inherit", "scratch")}
    for seed in range(4):
        for init in losses:
            torch.manual_seed(seed)
            with torch.no_grad():
                total, count = distill.layerwise_mse(teacher, seed_student(teacher, "MM", init),
                                                     tokens, None)
            losses[init].append(float(total / count))
    mean = {k: sum(v) / len(v) for k, v in losses.items()}
    assert mean["mimic"] < 0.5 * min(mean["inherit"], mean["scratch"]), mean
