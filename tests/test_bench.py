"""bench.py on the CPU: the floor's byte counts against the real cache tensors, one timed decode
point of a tiny model, and the table and CSV writers (the GPU runs need `python bench.py`)."""
import copy
import csv

import torch

from bench import (decode_table, markdown, measure, paper_table, state_bytes, weight_bytes,
                   write_csv, build)
from mmmamba import Config

CFG = Config(vocab_size=50, n_layer=4, d_model=32, n_head=4, n_kv_head=2, head_dim=8, d_mlp=48,
             max_seq_len=128, img_size=8, img_patch=4, img_dim=8, chunk_size=8,
             scan_backend="torch")


def test_state_bytes_count_the_cache():
    model = build(CFG, "hybrid", "cpu", torch.float32)            # attention every 4th layer
    assert model.cfg.kinds == "AMMM"
    T = 20
    cache = model.new_cache(1, T + 1)
    attn = sum(t.nbytes for c in cache.layers[:1] for t in c.values())
    mamba = sum(t.nbytes for c in cache.layers[1:] for t in c.values())
    assert state_bytes(model, T) == attn + 2 * mamba               # Mamba states: read + written
    # one more token of context costs K and V of 2 KV heads x 8 dims in the attention layer
    assert state_bytes(model, T + 1) - state_bytes(model, T) == 2 * (2 * 8) * 4
    linear = build(CFG, "linear", "cpu", torch.float32)
    assert state_bytes(linear, 10) == state_bytes(linear, 100)    # O(1) in the context


def test_weight_bytes_leave_out_the_embedding_table_and_image_projector():
    model = build(CFG, "teacher", "cpu", torch.bfloat16)
    everything = sum(p.numel() for p in model.parameters())
    unused = sum(p.numel() for p in model.vision.parameters()) + (CFG.vocab_size - 1) * CFG.d_model
    assert weight_bytes(model) == 2 * (everything - unused)


def step_bytes_by_hand(kind, context, bytes_per_value=4):
    """What one decode step of CFG must move, counted from the config alone: the weights of
    every layer, the final norm, the LM head and one embedding row; per attention layer K and
    V of context + 1 tokens; per Mamba-2 layer the conv and SSM states, read and written."""
    D, H, Hkv, hd, F, V = CFG.d_model, CFG.n_head, CFG.n_kv_head, CFG.head_dim, CFG.d_mlp, 50
    mlp_norms = 3 * D * F + 2 * D
    attention = D * (H + 2 * Hkv) * hd + H * hd * D
    conv = (2 * Hkv + H) * hd
    # conv (2 taps and a bias per channel), W_dt, dt_bias and A_log, W_G, the gated norm
    mamba = attention + 3 * conv + D * H + 2 * H + D * H * hd + hd
    kinds = {"teacher": "AAAA", "hybrid": "AMMM", "linear": "MMMM"}[kind]
    weights = sum(mlp_norms + (attention if k == "A" else mamba) for k in kinds) + D + V * D + D
    states = sum(2 * Hkv * hd * (context + 1) if k == "A" else 2 * (conv + H * hd * hd)
                 for k in kinds)
    return (weights + states) * bytes_per_value


def test_decode_point_and_outputs(tmp_path):
    rows = []
    for kind in ("teacher", "hybrid", "linear"):
        model = build(CFG, kind, "cpu", torch.float32)
        row = measure(model, kind, 64, bw=1e10, iters=3, cuda=False)
        assert row["eager_ms"] > 0 and row["best_ms"] == row["eager_ms"]
        nbytes = step_bytes_by_hand(kind, 64)
        assert row["step_gb"] == nbytes / 1e9, kind
        assert abs(row["floor_ms"] - nbytes / 1e10 * 1e3) < 1e-12, kind       # bytes / bandwidth
        row["mem_gb"] = 0.1                                         # a GPU-only number
        rows.append(row)
    rows.append({"model": "teacher", "context": 128 * 1024, "floor_ms": 1.0, "status": "OOM"})
    table = decode_table(rows)
    assert table.count("\n") == 1 + 2 and "OOM" in table and "| 0K |" in table
    assert "speedup" in paper_table(rows, context=64)
    assert markdown(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    write_csv(rows, tmp_path / "d.csv")
    back = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(back) == 4 and back[-1]["status"] == "OOM" and back[0]["model"] == "teacher"


def test_curves_reads_the_losses_of_a_run(tmp_path, monkeypatch):
    import json
    import sys

    import bench
    from mmmamba import Model
    from util import checkpoint_of, save_checkpoint
    model = Model(CFG)
    save_checkpoint(tmp_path / "stage0_teacher.pt", checkpoint_of(model, losses=[3.5, 2.25, 1.0]))
    save_checkpoint(tmp_path / "stage1_linear.pt", checkpoint_of(model, losses=[9.0, 4.0]))
    monkeypatch.setattr(sys, "argv", ["bench.py", "curves", "--run-dir", str(tmp_path),
                                      "--out-dir", str(tmp_path / "c")])
    bench.main()
    curves = json.load(open(tmp_path / "c" / "losses.json"))
    assert curves == {"stage0_teacher": [3.5, 2.25, 1.0], "stage1_linear": [9.0, 4.0]}


def test_a_copy_of_a_built_model_embeds_with_its_own_table():
    # fused_study's accuracy mode runs a float64 copy of bench.build's bf16 model: the copy's
    # graph-safe embed must read the copy's table, not the original's
    model = build(CFG, "hybrid", torch.device("cpu"), torch.bfloat16)
    ref = copy.deepcopy(model).double()
    tok = torch.tensor([[11]])
    assert ref.embed(tok).dtype == torch.float64
    assert ref(tok, None, ref.new_cache(1, 8)).dtype == torch.float64
    assert torch.equal(model.embed(tok), model.tok_embeddings(tok))
