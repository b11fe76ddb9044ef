"""The whole pipeline on a micro model: every stage of distill.py runs, trains what it must,
writes loadable checkpoints and results.json, resumes exactly where it stopped, refuses what
would lose work (a second run in the same out-dir, an overwrite, a Ctrl-C mid-update), runs
data-parallel under torchrun as one process does; ablate.py composes the stages; batched
greedy evaluation equals Model.generate and sample.py."""
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

import ablate
import data
import distill
import evaluate
import mmmamba
from mmmamba import Config
from seed import hybrid_layout
from util import InputError, load_checkpoint, model_from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = Config(vocab_size=400, n_layer=4, d_model=32, n_head=2, n_kv_head=1, head_dim=16,
               d_mlp=64, max_seq_len=128, img_size=16, img_patch=8, img_dim=16, chunk_size=16,
               scan_backend="torch")
N_TRAIN = 300                   # shapes-world training images in these runs (distill: more)
FAST = ["--preset", "micro", "--batch-size", "4", "--eval-samples", "12", "--scan", "torch",
        "--device", "cpu"]
STEPS = ["--steps0", "6", "--steps1", "3", "--steps2", "3", "--steps3", "3", "--save-every", "2"]
# distill.py with the micro preset, for subprocesses: the command line itself (util.run_cli)
WRAPPER = f"""import sys
sys.path.insert(0, {ROOT!r})
import mmmamba
from mmmamba import Config
mmmamba.PRESETS["micro"] = {MICRO!r}
import distill, util
distill.N_TRAIN_IMAGES = {N_TRAIN}
{{patch}}
util.run_cli(lambda: distill.main(sys.argv[1:]))
"""
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro models run fastest on one thread, and far faster when other work shares the
    cores (threads of one op then wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def micro(monkeypatch):
    """The micro preset, and a smaller shapes world (a faster start), in this process."""
    monkeypatch.setitem(mmmamba.PRESETS, "micro", MICRO)
    monkeypatch.setattr(distill, "N_TRAIN_IMAGES", N_TRAIN)


def distill_main(monkeypatch, argv):
    micro(monkeypatch)
    distill.main(FAST + STEPS + argv)


def micro_script(tmp_path, patch=""):
    """The wrapper as a file; `patch` runs before distill.py's command line does."""
    path = tmp_path / "distill_micro.py"
    path.write_text(WRAPPER.format(patch=patch))
    return str(path)


@pytest.fixture(scope="module")
def run_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        distill_main(mp, ["--out-dir", str(out)])
    return out


def state(path):
    return load_checkpoint(str(path))["model"]


def copy_run(run_all, dst, names):
    dst.mkdir()
    for name in names:
        shutil.copy(run_all / name, dst / name)
    return dst


# -----------------------------------------------------------------------------
# the stages


def test_every_stage_writes_a_finished_loadable_checkpoint(run_all):
    expect = {"stage0_teacher.pt": (0, "teacher", "AAAA"),
              "stage1_linear.pt": (1, "linear", "MMMM"), "stage2_linear.pt": (2, "linear", "MMMM"),
              "stage3_linear.pt": (3, "linear", "MMMM"),
              "stage3_hybrid.pt": (3, "hybrid", hybrid_layout(4, attn_every=4))}
    for name, (stage, kind, layout) in expect.items():
        ckpt = load_checkpoint(str(run_all / name))
        assert (ckpt["stage"], ckpt["kind"], ckpt["done"]) == (stage, kind, True), name
        assert ckpt["step"] == ckpt["steps"] == len(ckpt["losses"]) and "optimizer" in ckpt
        model = model_from_checkpoint(ckpt)
        assert model.cfg.kinds == layout
        tok = Tokenizer.from_str(ckpt["tokenizer"])
        assert [tok.token_to_id(s) for s in mmmamba.SPECIAL_TOKENS] == list(range(6))
    assert sorted(os.listdir(run_all)) == sorted([*expect, "results.json", ".lock"])  # no .tmp


def test_results_json_records_every_stage(run_all, monkeypatch):
    records = json.loads((run_all / "results.json").read_text())
    assert [(r["stage"], r["model"], r["layout"], r["stages"]) for r in records] == [
        (0, "teacher", "AAAA", None), (1, "linear", "MMMM", "1"), (2, "linear", "MMMM", "1+2"),
        (3, "linear", "MMMM", "1+2+3"), (3, "hybrid", "AMMM", "1+2+3")]
    # each record is its checkpoint's model evaluated on this run's held-out set, exactly
    train = data.shapes_split("train", N_TRAIN)
    qa, captions, blind = evaluate.held_out(train, data.shapes_split("test", 12), 12)
    tok = Tokenizer.from_str(load_checkpoint(str(run_all / "stage0_teacher.pt"))["tokenizer"])
    names = ["stage0_teacher", "stage1_linear", "stage2_linear", "stage3_linear", "stage3_hybrid"]
    for r, name in zip(records, names):
        ckpt = load_checkpoint(str(run_all / f"{name}.pt"))
        again = evaluate.evaluate(model_from_checkpoint(ckpt), qa, captions, tok)
        assert (r["qa_accuracy"], r["caption_loss"], r["qa_by_template"]) == (
            again["qa_accuracy"], again["caption_loss"], again["qa_by_template"]), name
        assert (r["train_s"], r["blind_qa_accuracy"], r["eval_samples"]) == (
            ckpt["train_s"], blind, 12)
    assert set(records[0]["qa_by_template"]) == {
        "color", "shape", "count", "where", "exists", "size"}
    # the caption losses differ from stage to stage: each record is of another model
    assert len({r["caption_loss"] for r in records}) == len(records)


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
        assert not torch.equal(s1[p + "A_log"], torch.ones_like(s1[p + "A_log"]))  # from mimic's 1
        assert not torch.equal(s2[p + "x_proj.weight"], s1[p + "x_proj.weight"])   # stage 2 does
        assert not torch.equal(s3[p + "c_proj.weight"], s2[p + "c_proj.weight"])   # and stage 3
        assert not torch.equal(s3[p + "dt_bias"], s2[p + "dt_bias"])    # dt_bias too, in stage 3
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
    lr = distill.RECIPE[0]["tiny"][0]              # the micro preset trains with tiny's recipe
    recipe = re.escape(f"(lr, batch, steps) {[lr, 4, 6]}")
    with pytest.raises(InputError, match=recipe + ".*flags it was"):
        distill_main(monkeypatch, ["--stage", "0", "--resume", "--steps0", "7",
                                   "--out-dir", str(cut)])
    distill_main(monkeypatch, ["--stage", "0", "--resume", "--out-dir", str(cut)])
    a, b = (load_checkpoint(str(d / "stage0_teacher.pt")) for d in (full, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["losses"] == b["losses"] and len(a["losses"]) == 6


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
    batched = evaluate.greedy_answers(model, examples, tok, max_new_tokens=6)
    for ex, got in zip(examples, batched):
        prompt = torch.tensor([data.encode_prompt(tok, ex["question"], model.cfg.n_img_tokens)])
        image = data.example_image(ex, model.cfg.img_size)[None]
        ids = [t for t in model.generate(prompt, image, max_new_tokens=6) if t != mmmamba.IM_END_ID]
        assert got == tok.decode(ids)
    assert len(set(batched)) > 5 and all(len(a) > 0 for a in batched)


def test_missing_input_checkpoint_names_the_command(tmp_path, command):
    # in this process, through distill.py's __main__ wrapper (real distill.py processes: the
    # Ctrl-C, SIGKILL and torchrun tests)
    code, _, err = command("distill", "--stage", "2", "--out-dir", str(tmp_path))
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "python distill.py --stage 0" in err


# -----------------------------------------------------------------------------
# what would lose work or fail late fails at once, in one line


def test_one_run_per_out_dir(run_all, tmp_path, monkeypatch):
    out = copy_run(run_all, tmp_path / "busy", ["stage0_teacher.pt", "stage1_linear.pt"])
    with open(out / ".lock", "w") as held:          # another run holds the out-dir
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242, started yesterday")
        held.flush()
        with pytest.raises(InputError, match=r"in use by another distill.py run \(pid 4242, st"):
            distill_main(monkeypatch, ["--stage", "2", "--out-dir", str(out)])
        assert not (out / "stage2_linear.pt").exists()
    distill_main(monkeypatch, ["--stage", "2", "--out-dir", str(out)])      # free again: it runs
    assert load_checkpoint(str(out / "stage2_linear.pt"))["done"]


def test_a_finished_stage_is_not_overwritten(run_all, tmp_path, monkeypatch):
    out = copy_run(run_all, tmp_path / "again", ["stage0_teacher.pt", "stage1_linear.pt",
                                                 "stage2_linear.pt", "results.json"])
    before = (out / "stage2_linear.pt").read_bytes()
    with pytest.raises(InputError, match="stage2_linear.pt exists: add --resume to keep it"):
        distill_main(monkeypatch, ["--stage", "2", "--out-dir", str(out)])
    with pytest.raises(InputError, match="stage0_teacher.pt exists"):   # checked before stage 0
        distill_main(monkeypatch, ["--out-dir", str(out)])
    results = (out / "results.json").read_text()
    distill_main(monkeypatch, ["--stage", "2", "--resume", "--out-dir", str(out)])
    assert (out / "stage2_linear.pt").read_bytes() == before            # kept as it was
    assert (out / "results.json").read_text() == results                # and not evaluated again
    (out / "results.json").unlink()                                     # unless its record is gone
    distill_main(monkeypatch, ["--stage", "2", "--resume", "--out-dir", str(out)])
    records = json.loads((out / "results.json").read_text())
    assert [(r["stage"], r["model"]) for r in records] == [(0, "teacher"), (2, "linear")]
    assert records[1]["qa_accuracy"] == json.loads(results)[2]["qa_accuracy"]   # the same model


@pytest.mark.parametrize("flags, words", [
    (["--attn-every", "1"], "layout AAAA is the teacher"),
    (["--attn-layers", ""], "layout MMMM is the linear student"),
    (["--attn-layers", "0,1,2,3"], "layout AAAA is the teacher"),
    (["--attn-every", "0"], "attention every 0 layers is not possible"),
])
def test_a_hybrid_that_is_not_one_fails_before_training(tmp_path, monkeypatch, flags, words):
    with pytest.raises(InputError, match=words):
        distill_main(monkeypatch, ["--out-dir", str(tmp_path), *flags])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".pt")]    # nothing trained


@pytest.mark.parametrize("flags, words", [
    (["--seed", str(2 ** 70)], "--seed 1180591620717411303424: give a seed from 0 to"),
    (["--seed", "-1"], "--seed -1: give a seed from 0"),
    (["--device", "meta"], "--device meta"),
    (["--steps2", "0"], "--steps2 0: give at least 1"),
])
def test_nonsense_flags_fail_in_one_line(tmp_path, monkeypatch, flags, words):
    with pytest.raises(InputError, match=words):
        distill_main(monkeypatch, ["--out-dir", str(tmp_path), *flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the triton scan runs on this GPU")
def test_triton_scan_without_cuda_fails_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="--scan triton needs a CUDA GPU.*--scan torch"):
        distill_main(monkeypatch, ["--out-dir", str(tmp_path), "--scan", "triton"])


def test_results_json_is_written_atomically_and_fsynced(tmp_path, monkeypatch):
    path, events = str(tmp_path / "results.json"), []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):                           # which file, and what it holds by then
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        fsync(fd)

    def logged_replace(a, b):
        events.append(("replace", a, b))
        replace(a, b)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    for records in ([{"a": 1}], [{"a": 1}, {"b": 2}]):
        evaluate.write_json(path, records)
        assert json.loads(open(path).read()) == records
    size = os.path.getsize(path)
    # each time: the whole file flushed to disk under a temporary name, then renamed over
    assert [e[:2] for e in events] == [("fsync", path + ".tmp"), ("replace", path + ".tmp")] * 2
    assert [e[2] for e in events] == [events[0][2], path, size, path] and events[0][2] < size
    assert os.listdir(tmp_path) == ["results.json"]


def test_an_image_that_does_not_decode_fails_before_training(tmp_path, monkeypatch):
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "good.png")
    raw = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[:len(raw) // 2])   # its header reads, its pixels not
    turns = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    records = [{"image": "good.png", "conversations": turns} for _ in range(12)]
    records[7]["image"] = "cut.png"
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(InputError, match=r"cut.png is not an image.*truncated.*remove its records"):
        distill_main(monkeypatch, ["--data", str(tmp_path / "data.json"), "--image-root",
                                   str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert os.listdir(tmp_path / "out") == [".lock"]                    # nothing trained


# the run waits inside step 6 (its 6th batch) until a signal has come, and says so (the
# marker): the Ctrl-C lands in the middle of a known step, however fast or slow the machine
WAIT_IN_STEP_6 = """
import signal, time
import data
make_batch, calls = data.make_batch, []
def make_batch_waiting(*a, **k):
    calls.append(None)
    if len(calls) == 6:
        handler = signal.getsignal(signal.SIGINT)
        open({marker!r}, "w").close()
        while signal.getsignal(signal.SIGINT) == handler:   # Ctrl-C's handler puts back the old
            time.sleep(0.01)
    return make_batch(*a, **k)
data.make_batch = make_batch_waiting
"""


def test_ctrl_c_stops_after_a_whole_step_and_resume_continues(tmp_path, monkeypatch, capsys):
    out, marker, log = tmp_path / "out", tmp_path / "in_step_6", open(tmp_path / "stderr.txt", "w+")
    ckpt = out / "stage0_teacher.pt"
    args = [*FAST, "--stage", "0", "--steps0", "10", "--save-every", "4", "--out-dir", str(out)]
    script = micro_script(tmp_path, WAIT_IN_STEP_6.format(marker=str(marker)))
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.DEVNULL,
                            stderr=log, env=ONE_THREAD)
    try:
        # wait on the run's own progress, never on a clock; the bound only stops a run that hangs
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None, "the run ended before step 6"
            assert time.time() < deadline, "not at step 6 after 10 minutes: the run hangs"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=600) == 130
    finally:
        proc.kill()
    log.seek(0)
    stderr = log.read()
    stops = [line for line in stderr.splitlines() if line.startswith("stopped")]
    stopped = load_checkpoint(str(ckpt))              # written at the step Ctrl-C ended
    assert "Traceback" not in stderr
    # step 6 was finished and saved (the last save before it was at step 4)
    assert stops == [f"stopped (Ctrl-C) after step 6 of stage 0 teacher, kept in {ckpt}: "
                     "continue with --resume"]
    assert stopped["step"] == 6 and not stopped["done"] and len(stopped["losses"]) == 6
    # --resume is not about the process: in this one
    capsys.readouterr()
    micro(monkeypatch)
    distill.main([*args, "--resume"])
    assert "resuming at step 6 of 10" in capsys.readouterr().out
    done = load_checkpoint(str(ckpt))
    assert done["done"] and done["losses"][:6] == stopped["losses"] and len(done["losses"]) == 10


def torchrun(script, *args, **kw):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", script, *args], capture_output=True, text=True,
                          env=ONE_THREAD, **kw)


# Three runs of distill.py in one torchrun (its start, three imports of torch, is most of the
# time): stage 0 in one out-dir and the other stages in a second, their stderr (progress bars)
# to a log; then a run that fails on its input, on the torchrun's own stderr. The runs share
# one process group, as torch does not re-create its default group reliably once destroyed
# (seen to hang when one process reached the next run while the other still evaluated).
THREE_RUNS = """
import torch.distributed as dist
init, destroy = dist.init_process_group, dist.destroy_process_group
dist.init_process_group = lambda *a, **k: dist.is_initialized() or init(*a, **k)
dist.destroy_process_group = lambda *a, **k: None
def three_runs(argv, main=distill.main):
    try:
        sys.stderr = open({log!r} + os.environ["RANK"], "w")
        main([*argv, *STEPS, "--stage", "0", "--out-dir", {zero!r}])
        main([*argv, *STEPS, "--resume", "--out-dir", {rest!r}])
        sys.stderr = sys.__stderr__
        main([*argv, "--batch-size", "7", "--out-dir", {bad!r}])
    finally:
        destroy()
distill.main = three_runs
"""


@pytest.fixture(scope="module")
def under_torchrun(run_all, tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    zero, rest, bad = d / "zero", d / "rest", d / "bad"
    copy_run(run_all, rest, ["stage0_teacher.pt", "stage2_linear.pt", "results.json"])
    runs = THREE_RUNS.format(log=str(d / "stderr"), zero=str(zero), rest=str(rest), bad=str(bad))
    script = micro_script(d, f"import os\nSTEPS = {STEPS!r}\n{runs}")
    r = torchrun(script, *FAST, timeout=600)
    return r, zero, rest, bad, d


def test_torchrun_input_error_is_one_line(under_torchrun):
    r, _, _, bad, _ = under_torchrun
    # torchrun turns a process's non-zero exit into a traceback of its own: every process
    # exits 0, and process 0 alone prints the line
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: stage 0's batch of 7 does not split over 2 processes: give "
                     "--batch-size a multiple of 2"], r.stderr
    assert not (bad / "stage0_teacher.pt").exists()


def test_torchrun_matches_one_process(run_all, under_torchrun):
    """Two gloo processes under DistributedDataParallel, each with half the global batch, train
    as the one process of run_all did, with the same flags and from the same models: stage 0
    (cross-entropy) from scratch; in a second run, stage 1 (layer-wise MSE) from run_all's
    teacher and stage 3 (KL per token), linear and hybrid (frozen attention in layer 0), from
    run_all's stage-2 student, which --resume keeps. The same losses and weights."""
    r, zero, rest, _, d = under_torchrun
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in (d / "stderr0").read_text() + (d / "stderr1").read_text()
    # each run logs its device once: one process of the two logs
    assert r.stdout.count("rank 0 of 2") == 3 and r.stdout.count("device cpu") == 3, r.stdout
    assert "stage2_linear.pt: finished already, kept" in r.stdout
    for out, name in [(zero, "stage0_teacher.pt"), (rest, "stage1_linear.pt"),
                      (rest, "stage3_linear.pt"), (rest, "stage3_hybrid.pt")]:
        one, two = load_checkpoint(str(run_all / name)), load_checkpoint(str(out / name))
        assert len(two["losses"]) == len(one["losses"]) > 0, name
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]),
                                   rtol=1e-4, atol=1e-5)
        for k in one["model"]:
            torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-3, atol=1e-5,
                                       msg=f"{name} {k}")


# -----------------------------------------------------------------------------
# ablations: ablate.py composes distill.py's stages


def with_teacher(run_all, path):
    path.mkdir(exist_ok=True)
    (path / "stage0_teacher.pt").symlink_to(run_all / "stage0_teacher.pt")
    return path


def ablate_row(monkeypatch, argv):
    micro(monkeypatch)
    ablate.row(FAST + STEPS + argv)


def test_ablation_row_skips_stages_and_starts_from_the_seeded_student(run_all, tmp_path,
                                                                       monkeypatch):
    out = with_teacher(run_all, tmp_path / "s13")
    ablate_row(monkeypatch, ["--out-dir", str(out), "--stages", "1,3"])
    assert not (out / "stage2_linear.pt").exists()
    # same seed, same teacher: this run's stage 1 is the full run's, bit for bit (reproducible)
    a, b = state(run_all / "stage1_linear.pt"), state(out / "stage1_linear.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = json.loads((out / "results.json").read_text())
    assert [(r["stage"], r["stages"]) for r in records] == [(0, None), (1, "1"), (3, "1+3")]
    # stage 3 started from this run's stage 1: its frozen-in-stage-3 weights (W_O) are stage 1's
    s1, s3 = state(out / "stage1_linear.pt"), state(out / "stage3_linear.pt")
    assert all(torch.equal(s1[k], s3[k]) for k in s3 if "o_proj" in k)
    assert not torch.equal(s3["layers.1.mixer.c_proj.weight"], a["layers.1.mixer.c_proj.weight"])
    # a hybrid stage 3 from the shared stage-2 student: the full run's hybrid, bit for bit
    out5 = with_teacher(run_all, tmp_path / "t5")
    (out5 / "stage2_linear.pt").symlink_to(run_all / "stage2_linear.pt")
    ablate_row(monkeypatch, ["--out-dir", str(out5), "--from-stage2", "--stages", "3",
                             "--attn-layers", "0"])
    a, b = state(run_all / "stage3_hybrid.pt"), state(out5 / "stage3_hybrid.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out5 / "results.json").read_text())[-1]["stages"] == "1+2+3"


def test_ablation_row_none_evaluates_the_seeded_student(run_all, tmp_path, monkeypatch):
    out = with_teacher(run_all, tmp_path / "none")
    ablate_row(monkeypatch, ["--out-dir", str(out), "--stages", "none"])
    rec = json.loads((out / "results.json").read_text())[-1]
    assert (rec["stage"], rec["stages"], rec["train_s"], rec["layout"]) == (None, "none", 0, "MMMM")
    assert not [f for f in os.listdir(out) if f.startswith("stage1")]


@pytest.mark.parametrize("bad", ["2,1", "4", "1,1", "x", ""])
def test_stages_bad_lists_fail_in_one_line(bad):
    with pytest.raises(InputError, match="--stages"):
        ablate.parse_stages(bad)


def test_ablation_plans_match_the_paper_tables():
    runs, rows = ablate.plan(3, 8)
    assert [r for r, _, _ in rows] == ["none", "1", "2", "3", "1+2", "1+3", "2+3", "1+2+3"]
    assert sorted(f[1] for _, f, _ in runs) == sorted(["1,2,3", "1,3", "2,3", "3", "none"])
    runs, rows = ablate.plan(5, 8)
    assert [label.split(":")[1].strip() for label, _, _ in rows[:-1]] == [
        "MMMMMMMM", "AMMMMMMM", "AMMMAMMM", "AMAMAMAM"]
    assert [key for _, key, _ in rows] == [0, 4, 8, 16, "teacher"]      # the paper's rows by share
    runs, rows = ablate.plan(6, 8)
    assert {label.split(":")[0]: label.split(": ")[1] for label, _, _ in rows} == {
        "head-stacked": "AAMMMMMM", "tail-stacked": "MMMMMMAA",
        "head-interleaved": "AMMMAMMM", "tail-interleaved": "MMMAMMMA"}
    assert all(shared for _, _, shared in runs)


# ablate.py for the runs that ablate.main starts (`python HERE/ablate.py row ...`): the real
# one, on this file's smaller shapes world
ABLATE = f"""import sys
sys.path[0] = {ROOT!r}
import distill
distill.N_TRAIN_IMAGES = {N_TRAIN}
import ablate, util
util.run_cli(ablate.main)
"""


def test_ablate_runs_a_table_from_one_teacher(run_all, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                         # for its runs' processes
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ablate.py").write_text(ABLATE)
    monkeypatch.setattr(ablate, "HERE", str(tmp_path / "bin"))
    run_dir = with_teacher(run_all, tmp_path / "run")
    shutil.copy(run_all / "results.json", run_dir / "results.json")    # holds the teacher's record
    flags = ["--batch-size", "4", "--eval-samples", "12", "--scan", "torch", "--device", "cpu",
             "--steps1", "2", "--steps2", "2", "--steps3", "2"]
    ablate.main(["--table", "6", "--run-dir", str(run_dir), "--jobs", "2", *flags])  # 1 of 4 kept
    rows = json.loads((run_dir / "ablate" / "table6.json").read_text())
    assert [r["layout"] for r in rows] == ["AMMM", "MMMA", "AMMM", "MMMA"]
    assert all(r["stage"] == 3 and r["stages"] == "1+2+3" for r in rows)
    assert sorted(os.listdir(run_dir / "ablate")) == [  # identical runs ran once; stages 1-2 once
        "shared", "t6-head-stacked", "t6-tail-stacked", "table6.json", "table6.md"]
    # no run evaluated the teacher again: its record is the run-dir's
    teacher = json.loads((run_all / "results.json").read_text())[0]
    for d in ("shared", "t6-head-stacked"):
        assert json.loads((run_dir / "ablate" / d / "results.json").read_text())[0] == teacher
    table = (run_dir / "ablate" / "table6.md").read_text()
    assert f"| head-stacked: AMMM | {rows[0]['qa_accuracy']:.3f} |" in table
    # finished runs are reused with the same flags, and refused with others (no silent mix-ups)
    ablate.main(["--table", "6", "--run-dir", str(run_dir), *flags])
    with pytest.raises(InputError, match="another --name"):
        ablate.main(["--table", "6", "--run-dir", str(run_dir), *flags, "--steps3", "3"])


@pytest.mark.parametrize("flags, words, process", [
    ([], "python distill.py --stage 0", True),                 # `python ablate.py` itself
    (["--steps3", "x"], "--steps3: invalid int value", False)])
def test_ablate_bad_input_fails_in_one_line(tmp_path, command, flags, words, process):
    argv = ["--run-dir", str(tmp_path), *flags]
    if process:
        r = subprocess.run([sys.executable, "ablate.py", *argv], cwd=ROOT, capture_output=True,
                           text=True, env=ONE_THREAD)
        code, err = r.returncode, r.stderr
    else:
        code, _, err = command("ablate", *argv)
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and words in err, err


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


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "GIF"])
def test_sample_answers_what_greedy_evaluation_answers(run_all, tmp_path, mode, capsys):
    import sample
    kind = "hybrid" if mode == "GIF" else "linear"
    image = odd_image(tmp_path, mode)
    sample.main(["--image", str(image), "--out-dir", str(run_all), "--model", kind,
                 "--max-new-tokens", "5", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("user: Describe the image.\nassistant: ")
    ckpt = load_checkpoint(str(run_all / f"stage3_{kind}.pt"))
    model, tok = model_from_checkpoint(ckpt).eval(), Tokenizer.from_str(ckpt["tokenizer"])
    expect = evaluate.greedy_answers(model, [{"path": str(image), "question": data.CAPTION}], tok,
                                     max_new_tokens=5)[0]
    assert out.split("assistant: ", 1)[1] == expect + "\n"


@pytest.mark.parametrize("case", ["missing", "not-an-image", "directory", "no-checkpoint"])
def test_sample_fails_in_one_line(run_all, tmp_path, command, case):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    image = {"missing": tmp_path / "nope.jpg", "not-an-image": text,
             "directory": tmp_path}.get(case, text)
    out_dir = tmp_path if case == "no-checkpoint" else run_all
    if case == "no-checkpoint":
        image = odd_image(tmp_path, "L")
    argv = ["--image", str(image), "--out-dir", str(out_dir)]
    # in this process, through sample.py's __main__ wrapper (sample.py as a real process:
    # test_robust's raw-bytes prompt)
    code, _, err = command("sample", *argv)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ")
    assert err.strip().count("\n") == 0
