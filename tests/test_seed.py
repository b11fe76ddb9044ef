"""Seeding: copied weights are equal, and a freshly seeded layer is the decayed linear
attention it is meant to mimic (computed here independently, with loops)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mmmamba import Config, Model
from util import InputError, checkpoint_of, load_checkpoint, model_from_checkpoint, save_checkpoint
from seed import COPY, seed_student

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = Config(vocab_size=50, n_layer=3, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=48,
             max_seq_len=40, img_size=8, img_patch=4, img_dim=8, chunk_size=4, scan_backend="torch")


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
            same = torch.equal(t_sd[f"layers.{i}.mixer.{tn}.weight"], s_sd[f"layers.{i}.mixer.{sn}.weight"])
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
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + CFG.norm_eps)   # per-head RMSNorm
    y = y.reshape(2, T, H * hd) * F.silu(u @ mixer.g_proj.weight.T)      # SiLU gate
    expected = y @ mixer.o_proj.weight.T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # mimic: dt is small and A = -e, so the decay per step stays close to 1
    assert (torch.exp(A * dt) > 0.75).all()


def test_seeding_a_student_again_is_refused():
    s = seed_student(teacher(), "MMM")
    with pytest.raises(InputError, match="needs a teacher"):
        seed_student(s, "MMM")


def run_seed(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "seed.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


def test_seed_command_line(tmp_path):
    t = teacher().float()
    save_checkpoint(tmp_path / "teacher.pt", checkpoint_of(t, kind="teacher", stage=0, tokenizer="{}"))
    r = run_seed("--teacher", "teacher.pt", "--out", "hybrid.pt", "--attn-every", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(tmp_path / "hybrid.pt")
    assert ckpt["config"]["layout"] == "AMA" and ckpt["tokenizer"] == "{}" and ckpt["init"] == "mimic"
    s = model_from_checkpoint(ckpt)
    assert torch.equal(s.layers[1].mixer.c_proj.weight, t.layers[1].mixer.q_proj.weight)
    # bad input: one line on stderr, exit code 2, no traceback, nothing written
    for args, msg in [(["--teacher", "missing.pt"], "no checkpoint"),
                      (["--teacher", "teacher.pt", "--attn-layers", "0,7"], "out of range"),
                      (["--teacher", "teacher.pt", "--attn-layers", "x"], "comma-separated"),
                      (["--teacher", "teacher.pt", "--attn-every", "0"], "1 or more")]:
        r = run_seed(*args, "--out", "bad.pt", cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad.pt").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = run_seed("--teacher", "junk.pt", "--out", "bad.pt", cwd=tmp_path)
    assert r.returncode == 2 and "not a readable" in r.stderr


def test_make_hybrid_takes_attention_from_the_teacher_and_mamba_from_the_student():
    from seed import make_hybrid
    t = teacher()
    s = seed_student(t, "MMM", "mimic")
    with torch.no_grad():                                           # as if stages 1-2 had trained it
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
