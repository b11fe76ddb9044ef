"""The whole pipeline on a micro model: every stage of distill.py runs, freezes what it must,
writes loadable checkpoints and results.json, resumes where it stopped; batched greedy
evaluation equals Model.generate; sample.py reads odd images and fails in one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

import data
import distill
import mmmamba
from mmmamba import Config
from seed import hybrid_layout
from util import InputError, load_checkpoint, model_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = Config(vocab_size=400, n_layer=4, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_mlp=64,
               max_seq_len=128, img_size=16, img_patch=8, img_dim=16, chunk_size=16, scan_backend="torch")
FAST = ["--preset", "micro", "--batch-size", "4", "--eval-samples", "12", "--scan", "torch", "--device", "cpu"]
STEPS = ["--steps0", "6", "--steps1", "3", "--steps2", "3", "--steps3", "3", "--save-every", "2"]


def distill_main(monkeypatch, argv):
    monkeypatch.setitem(mmmamba.PRESETS, "micro", MICRO)
    distill.main(FAST + STEPS + argv)


@pytest.fixture(scope="module")
def run_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        distill_main(mp, ["--out-dir", str(out)])
    return out


def state(path):
    return load_checkpoint(str(path))["model"]


def test_every_stage_writes_a_finished_loadable_checkpoint(run_all):
    expect = {"stage0_teacher.pt": (0, "teacher", "AAAA"), "stage1_linear.pt": (1, "linear", "MMMM"),
              "stage2_linear.pt": (2, "linear", "MMMM"), "stage3_linear.pt": (3, "linear", "MMMM"),
              "stage3_hybrid.pt": (3, "hybrid", hybrid_layout(4, attn_every=4))}
    for name, (stage, kind, layout) in expect.items():
        ckpt = load_checkpoint(str(run_all / name))
        assert (ckpt["stage"], ckpt["kind"], ckpt["done"]) == (stage, kind, True), name
        assert ckpt["step"] == ckpt["steps"] and "optimizer" in ckpt
        model = model_from_checkpoint(ckpt)
        assert model.cfg.kinds == layout
        tok = Tokenizer.from_str(ckpt["tokenizer"])
        assert [tok.token_to_id(s) for s in mmmamba.SPECIAL_TOKENS] == list(range(6))


def test_results_json_records_every_stage(run_all):
    records = json.loads((run_all / "results.json").read_text())
    assert [(r["stage"], r["model"]) for r in records] == [
        (0, "teacher"), (1, "linear"), (2, "linear"), (3, "linear"), (3, "hybrid")]
    for r in records:
        assert 0 <= r["qa_accuracy"] <= 1 and 0 <= r["blind_qa_accuracy"] <= 1
        assert np.isfinite(r["caption_loss"]) and r["caption_loss"] > 0 and r["train_s"] > 0


def test_stages_train_only_what_they_should(run_all):
    t = state(run_all / "stage0_teacher.pt")
    s1, s2, s3 = (state(run_all / f"stage{i}_linear.pt") for i in (1, 2, 3))
    hy = state(run_all / "stage3_hybrid.pt")
    for name in t:                                  # outside the mixers everything is the teacher's
        if ".mixer." not in name:
            for s in (s1, s2, s3, hy):
                assert torch.equal(s[name], t[name]), name
    for i in range(4):
        p = f"layers.{i}.mixer."
        for s in (s1, s2, s3):                       # W_O is shared and frozen throughout
            assert torch.equal(s[p + "o_proj.weight"], t[p + "o_proj.weight"])
        # stage 1 trains only the new parameters: x/B/C are still the copies of W_V/W_K/W_Q
        assert torch.equal(s1[p + "x_proj.weight"], t[p + "v_proj.weight"])
        assert torch.equal(s1[p + "c_proj.weight"], t[p + "q_proj.weight"])
        assert not torch.equal(s1[p + "A_log"], torch.ones_like(s1[p + "A_log"]))  # trained from mimic's 1.0
        assert not torch.equal(s2[p + "x_proj.weight"], s1[p + "x_proj.weight"])     # stage 2 does
        assert not torch.equal(s3[p + "c_proj.weight"], s2[p + "c_proj.weight"])     # and stage 3
        assert not torch.equal(s1[p + "g_proj.weight"], s2[p + "g_proj.weight"])
    # the hybrid keeps layer 0 as the teacher's attention; its Mamba layers start from stage 2
    for name in t:
        if name.startswith("layers.0.mixer."):
            assert torch.equal(hy[name], t[name]), name
    assert not torch.equal(hy["layers.1.mixer.b_proj.weight"], s2["layers.1.mixer.b_proj.weight"])
    assert torch.equal(hy["layers.1.mixer.o_proj.weight"], s2["layers.1.mixer.o_proj.weight"])


def test_resume_continues_an_interrupted_stage_exactly(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    distill_main(monkeypatch, ["--stage", "0", "--out-dir", str(full)])
    calls = {"n": 0}
    make_batch = data.make_batch

    def crash_after_five(*a, **k):                  # the process dies during step 5 of 6
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return make_batch(*a, **k)

    monkeypatch.setattr(data, "make_batch", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        distill_main(monkeypatch, ["--stage", "0", "--out-dir", str(cut)])
    monkeypatch.setattr(data, "make_batch", make_batch)
    ckpt = load_checkpoint(str(cut / "stage0_teacher.pt"))
    assert (ckpt["step"], ckpt["done"]) == (4, False)                        # the save at step 4
    with pytest.raises(InputError, match="unfinished stage 0.*--resume"):
        distill_main(monkeypatch, ["--stage", "1", "--out-dir", str(cut)])
    distill_main(monkeypatch, ["--stage", "0", "--resume", "--out-dir", str(cut)])
    a, b = state(full / "stage0_teacher.pt"), state(cut / "stage0_teacher.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batched_greedy_equals_generate(run_all):
    ckpt = load_checkpoint(str(run_all / "stage3_hybrid.pt"))
    # float64: with random weights two logits can tie to within float32 rounding (seen: 5e-6),
    # and batched and single-sequence arithmetic may then pick different tokens
    model, tok = model_from_checkpoint(ckpt).double().eval(), Tokenizer.from_str(ckpt["tokenizer"])
    torch.manual_seed(0)
    with torch.no_grad():                            # random weights: long answers that differ
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    examples = data.shapes_split("test", 3)
    env = {"device": torch.device("cpu"), "autocast": torch.autocast("cpu", enabled=False)}
    batched = distill.greedy_answers(model, examples, tok, env, max_new_tokens=6)
    for ex, got in zip(examples, batched):
        prompt = torch.tensor([data.encode_prompt(tok, ex["question"], model.cfg.n_img_tokens)])
        image = data.example_image(ex, model.cfg.img_size)[None]
        ids = [t for t in model.generate(prompt, image, max_new_tokens=6) if t != mmmamba.IM_END_ID]
        assert got == tok.decode(ids)
    assert len(set(batched)) > 5 and all(len(a) > 0 for a in batched)


def test_missing_input_checkpoint_names_the_command(tmp_path):
    r = subprocess.run([sys.executable, "distill.py", "--stage", "2", "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "python distill.py --stage 0" in r.stderr


# -----------------------------------------------------------------------------
# ablations: --stages (Table 3) and ablate.py


def with_teacher(run_all, path):
    path.mkdir(exist_ok=True)
    (path / "stage0_teacher.pt").symlink_to(run_all / "stage0_teacher.pt")
    return path


def test_stages_skip_and_start_from_the_seeded_student(run_all, tmp_path, monkeypatch):
    out = with_teacher(run_all, tmp_path / "s13")
    distill_main(monkeypatch, ["--out-dir", str(out), "--stages", "1,3"])
    assert not (out / "stage2_linear.pt").exists()
    # same seed, same teacher: this run's stage 1 is the full run's, bit for bit (reproducible)
    a, b = state(run_all / "stage1_linear.pt"), state(out / "stage1_linear.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = json.loads((out / "results.json").read_text())
    assert [(r["stage"], r["stages"]) for r in records if r["model"] != "teacher"] == [(1, "1"), (3, "1+3")]
    # stage 3 started from this run's stage 1: its frozen-in-stage-3 weights (W_O) are stage 1's
    s1, s3 = state(out / "stage1_linear.pt"), state(out / "stage3_linear.pt")
    o = [k for k in s3 if "o_proj" in k]
    assert o and all(torch.equal(s1[k], s3[k]) for k in o)
    out3 = with_teacher(run_all, tmp_path / "s3")
    distill_main(monkeypatch, ["--out-dir", str(out3), "--stages", "3"])
    assert [r["stages"] for r in json.loads((out3 / "results.json").read_text())] == [None, "3"]


def test_stages_none_evaluates_the_seeded_student(run_all, tmp_path, monkeypatch):
    out = with_teacher(run_all, tmp_path / "none")
    distill_main(monkeypatch, ["--out-dir", str(out), "--stages", "none"])
    rec = json.loads((out / "results.json").read_text())[-1]
    assert (rec["stage"], rec["stages"], rec["train_s"]) == (None, "none", 0) and 0 <= rec["qa_accuracy"] <= 1


@pytest.mark.parametrize("bad", ["2,1", "4", "1,1", "x", ""])
def test_stages_bad_lists_fail_in_one_line(bad):
    with pytest.raises(InputError, match="--stages"):
        distill.parse_args(["--stages", bad])


def test_ablation_plans_match_the_paper_tables():
    import ablate
    runs, rows = ablate.plan(3, 8)
    assert [r for r, _, _ in rows] == ["none", "1", "2", "3", "1+2", "1+3", "2+3", "1+2+3"]
    assert sorted(f[1] for _, f, _ in runs) == sorted(["1,2,3", "1,3", "2,3", "3", "none"])
    runs, rows = ablate.plan(5, 8)
    assert [label.split(":")[1].strip() for label, _, _ in rows[:-1]] == ["MMMMMMMM", "AMMMMMMM", "AMMMAMMM", "AMAMAMAM"]
    assert [key for _, key, _ in rows] == [0, 4, 8, 16, "teacher"]          # the paper's rows by share
    runs, rows = ablate.plan(6, 8)
    assert {label.split(":")[0]: label.split(": ")[1] for label, _, _ in rows} == {
        "head-stacked": "AAMMMMMM", "tail-stacked": "MMMMMMAA",
        "head-interleaved": "AMMMAMMM", "tail-interleaved": "MMMAMMMA"}
    assert all(shared for _, _, shared in runs)


def test_ablate_runs_a_table_from_one_teacher(run_all, tmp_path):
    import ablate
    run_dir = with_teacher(run_all, tmp_path / "run")
    flags = ["--batch-size", "4", "--eval-samples", "12", "--scan", "torch", "--device", "cpu",
             "--steps1", "2", "--steps2", "2", "--steps3", "2"]
    ablate.main(["--table", "6", "--run-dir", str(run_dir), "--jobs", "2", *flags])   # 4 layers: 1 kept
    rows = json.loads((run_dir / "ablate" / "table6.json").read_text())
    assert [r["layout"] for r in rows] == ["AMMM", "MMMA", "AMMM", "MMMA"]
    assert all(r["stage"] == 3 and 0 <= r["qa_accuracy"] <= 1 for r in rows)
    assert (run_dir / "ablate" / "shared" / "stage2_linear.pt").exists()      # stages 1-2 ran once
    assert "| head-stacked: AMMM |" in (run_dir / "ablate" / "table6.md").read_text()
    # finished runs are reused with the same flags, and refused with others (no silent mix-ups)
    ablate.main(["--table", "6", "--run-dir", str(run_dir), *flags])
    with pytest.raises(InputError, match="another --name"):
        ablate.main(["--table", "6", "--run-dir", str(run_dir), *flags, "--steps3", "3"])


def test_ablate_without_a_teacher_fails_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "ablate.py", "--run-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "python distill.py --stage 0" in r.stderr


# -----------------------------------------------------------------------------
# sample.py


def odd_image(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    if mode == "GIF":
        path = tmp_path / "anim.gif"
        frames = [rgb.convert("P"), Image.new("P", (50, 40), 3)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        return path
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 250)     # mode I;16
    else:
        img = rgb.convert(mode)
    path = tmp_path / f"img.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    return path


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "GIF"])
def test_sample_reads_any_image(run_all, tmp_path, mode):
    model = "hybrid" if mode == "GIF" else "linear"
    r = sample("--image", str(odd_image(tmp_path, mode)), "--out-dir", str(run_all), "--model", model,
               "--max-new-tokens", "5", "--temperature", "1.0", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("user: Describe the image.\nassistant: ")
    assert len(r.stdout.split("assistant: ", 1)[1].strip()) > 0                # sampled text came out


@pytest.mark.parametrize("case", ["missing", "not-an-image", "directory", "no-checkpoint"])
def test_sample_fails_in_one_line(run_all, tmp_path, case):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    image = {"missing": tmp_path / "nope.jpg", "not-an-image": text, "directory": tmp_path}.get(case, text)
    out_dir = tmp_path if case == "no-checkpoint" else run_all
    if case == "no-checkpoint":
        image = odd_image(tmp_path, "L")
    r = sample("--image", str(image), "--out-dir", str(out_dir))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    assert r.stderr.strip().count("\n") == 0
