"""Hard to break: bad input gets one line and exit code 2, a SIGKILL mid-stage loses nothing,
a non-finite loss stops the stage, the same seed gives the same losses, and two torchrun
processes train exactly as one process with the same global batch."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import distill
import mmmamba
from mmmamba import Config
from util import InputError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = "Config(vocab_size=400, n_layer=2, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_mlp=64, " \
        "max_seq_len=96, img_size=16, img_patch=8, img_dim=16, chunk_size=16)"
FAST = ["--preset", "micro", "--batch-size", "4", "--eval-samples", "8", "--scan", "torch", "--device", "cpu"]
# a stand-in for distill.py / sample.py with the micro preset, so subprocesses stay small
WRAPPER = f"""import sys
sys.path.insert(0, {ROOT!r})
import mmmamba
from mmmamba import Config
from util import run_cli
mmmamba.PRESETS["micro"] = {MICRO}
import {{script}}
run_cli(lambda: {{script}}.main(sys.argv[1:]))
"""


def script(tmp_path, name):
    path = tmp_path / f"{name}_micro.py"
    path.write_text(WRAPPER.format(script=name))
    return str(path)


def run(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, **kw)


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), r.stderr
    return last


def distill_in_process(monkeypatch, argv):
    monkeypatch.setitem(mmmamba.PRESETS, "micro", eval(MICRO))
    distill.main(FAST + argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished micro teacher (stage 0) and linear stage-1 student."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        distill_in_process(mp, ["--stage", "0", "--steps0", "3", "--out-dir", str(out)])
        distill_in_process(mp, ["--stage", "1", "--steps1", "2", "--out-dir", str(out)])
    return out


# --- bad input: one line, exit code 2, no traceback --------------------------------------


def test_sample_bad_input(tmp_path, trained):
    sample = script(tmp_path, "sample")
    ckpt = ["--ckpt", str(trained / "stage0_teacher.pt")]
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    assert run([sample, "--image", str(good), *ckpt, "--max-new-tokens", "3"]).returncode == 0
    # truncated: a real PNG cut in half
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[:len(raw) // 2])
    one_line_error(run([sample, "--image", str(tmp_path / "cut.png"), *ckpt]), "not an image", "truncated")
    # a decompression bomb: a small file that claims ~96M pixels
    Image.new("1", (12000, 8000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    one_line_error(run([sample, "--image", str(tmp_path / "bomb.png"), *ckpt]), "too large")
    one_line_error(run([sample, "--image", str(good), *ckpt, "--prompt", "  "]), "--prompt is empty")
    one_line_error(run([sample, "--image", str(good), *ckpt, "--prompt", "word " * 200]), "longer than")
    (tmp_path / "corrupt.pt").write_bytes(raw[:1000])
    one_line_error(run([sample, "--image", str(good), "--ckpt", str(tmp_path / "corrupt.pt")]), "not a readable")
    if not torch.cuda.is_available():
        one_line_error(run([sample, "--image", str(good), *ckpt, "--device", "cuda"]), "--device cuda")
    one_line_error(run([sample, "--image", str(good), *ckpt, "--temperature", "hot"]), "--temperature")


@pytest.mark.parametrize("argv, words", [
    (["--steps0", "-5"], ["--steps0", "at least 1"]),
    (["--preset", "huge"], ["--preset", "invalid choice"]),
    (["--attn-layers", "0,9"], ["out of range"]),
    (["--attn-every", "0"], ["1 or more"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--stage", "3", "--device", "nonsense"], ["--device nonsense"]),
])
def test_distill_nonsense_flags(tmp_path, argv, words):
    one_line_error(run([script(tmp_path, "distill"), "--out-dir", str(tmp_path / "o"), *argv]), *words)
    assert not (tmp_path / "o" / "stage0_teacher.pt").exists()


def test_distill_wrong_checkpoints(tmp_path, trained):
    distill_script = script(tmp_path, "distill")
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    # another preset than the teacher's
    one_line_error(run([distill_script, "--stage", "1", "--preset", "tiny", "--out-dir", str(out)]),
                   "'micro' preset", "--preset tiny")
    # the wrong stage: a teacher where the stage-1 student should be
    shutil.copy(out / "stage0_teacher.pt", out / "stage1_linear.pt")
    one_line_error(run([distill_script, *FAST, "--stage", "2", "--out-dir", str(out)]),
                   "stage 0 teacher", "--stage 1")
    # a corrupt one: nothing is overwritten
    (out / "stage0_teacher.pt").write_bytes(b"\x80garbage")
    one_line_error(run([distill_script, *FAST, "--stage", "1", "--out-dir", str(out)]), "not a readable")
    assert (out / "stage0_teacher.pt").read_bytes() == b"\x80garbage"


def test_distill_bad_data_file(tmp_path):
    (tmp_path / "bad.json").write_text('[{"image": "a.png", "conversations": [')
    one_line_error(run([script(tmp_path, "distill"), *FAST, "--data", str(tmp_path / "bad.json"),
                        "--out-dir", str(tmp_path / "o")]), "not valid JSON")
    (tmp_path / "missing.json").write_text('[{"image": "nowhere.png", "conversations": '
                                           '[{"from": "human", "value": "<image>\\nhi"}, {"from": "gpt", "value": "yo"}]}]')
    one_line_error(run([script(tmp_path, "distill"), *FAST, "--data", str(tmp_path / "missing.json"),
                        "--out-dir", str(tmp_path / "o")]), "nowhere.png", "not found")


# --- crashes and numerics ----------------------------------------------------------------


def test_sigkill_mid_stage_then_resume(tmp_path):
    distill_script, out = script(tmp_path, "distill"), tmp_path / "out"
    ckpt = out / "stage0_teacher.pt"
    args = [distill_script, *FAST, "--stage", "0", "--steps0", "400", "--save-every", "10", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    # wait on the run's own progress (its checkpoint's step), however slow the machine is;
    # the bound only stops a run that hangs
    deadline = time.time() + 900
    while not ckpt.exists() or load_checkpoint(str(ckpt))["step"] < 30:
        assert proc.poll() is None, "the run ended before its checkpoint reached step 30"
        assert time.time() < deadline, "no checkpoint at step 30 after 15 minutes: the run hangs"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)                        # no chance to clean up
    proc.wait()
    killed = load_checkpoint(str(ckpt))                     # the file on disk always loads
    assert killed["step"] % 10 == 0 and 30 <= killed["step"] < 400 and not killed["done"]
    assert len(killed["losses"]) == killed["step"]
    r = run([*args, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at step {killed['step']} of 400" in r.stdout
    done = load_checkpoint(str(ckpt))
    assert done["done"] and done["step"] == 400 and len(done["losses"]) == 400
    assert done["losses"][:killed["step"]] == killed["losses"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # no temporary files left behind


def test_non_finite_loss_stops_the_stage(tmp_path, monkeypatch):
    calls = {"n": 0}
    answer_ce = distill.answer_ce

    def explodes_at_step_5(*a):
        calls["n"] += 1
        total, count = answer_ce(*a)
        return (total * float("nan") if calls["n"] == 6 else total), count

    monkeypatch.setattr(distill, "answer_ce", explodes_at_step_5)
    with pytest.raises(InputError, match=r"loss is nan at step 5; stopped.*\(step 4\)"):
        distill_in_process(monkeypatch, ["--stage", "0", "--steps0", "8", "--save-every", "2",
                                         "--out-dir", str(tmp_path)])
    ckpt = load_checkpoint(str(tmp_path / "stage0_teacher.pt"))
    assert ckpt["step"] == 4 and not ckpt["done"]
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


def test_same_seed_same_losses(tmp_path, monkeypatch):
    losses = []
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        distill_in_process(monkeypatch, ["--stage", "0", "--steps0", "5", "--seed", seed,
                                         "--out-dir", str(tmp_path / name)])
        losses.append(load_checkpoint(str(tmp_path / name / "stage0_teacher.pt"))["losses"])
    assert losses[0] == losses[1] and len(losses[0]) == 5
    assert losses[0] != losses[2]


# --- torchrun ---------------------------------------------------------------------------


def test_two_processes_match_one(tmp_path):
    distill_script = script(tmp_path, "distill")
    common = [*FAST, "--batch-size", "8", "--steps0", "6", "--steps1", "4", "--save-every", "100"]
    for stage in ("0", "1"):
        r1 = run([distill_script, *common, "--stage", stage, "--out-dir", str(tmp_path / "one")])
        assert r1.returncode == 0, r1.stderr[-2000:]
        r2 = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", distill_script,
                  *common, "--stage", stage, "--out-dir", str(tmp_path / "two")], timeout=600)
        assert r2.returncode == 0, r2.stderr[-3000:]
        assert "rank 0 of 2" in r2.stdout and r2.stdout.count("device cpu") == 1  # one process logs
    for name in ("stage0_teacher.pt", "stage1_linear.pt"):
        one, two = load_checkpoint(str(tmp_path / "one" / name)), load_checkpoint(str(tmp_path / "two" / name))
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5)
        for k in one["model"]:
            torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-3, atol=1e-5, msg=k)
