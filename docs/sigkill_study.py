"""
SIGKILL study (not a CI test): kill a micro-model `distill.py --stage all --resume` run at
random moments, hundreds of times, restarting it after each kill, and check that

- every checkpoint on disk loads after every kill, with as many losses as steps, and
  results.json parses;
- each restart with --resume continues (the run always finishes, however often it is killed);
- no temporary file is left behind once the run has finished;
- the killed run ends with exactly the checkpoints (weights, losses) and accuracies of one
  run that was never killed.

Checkpoints are written every step (--save-every 1), so a good share of the kills land in the
middle of a save. docs/training.md has the command and the result of one run.

    python docs/sigkill_study.py --kills 150 --out /tmp/sigkill     # about 10 minutes, 2 cores
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from util import load_checkpoint  # noqa: E402

# distill.py with a micro preset and a small shapes world, so that a restart takes seconds
WRAPPER = f"""import sys
sys.path.insert(0, {ROOT!r})
import mmmamba
from mmmamba import Config
mmmamba.PRESETS["micro"] = Config(vocab_size=400, n_layer=4, d_model=32, n_head=2, n_kv_head=1,
    head_dim=16, d_mlp=64, max_seq_len=128, img_size=16, img_patch=8, img_dim=16, chunk_size=16)
import distill, util
distill.N_TRAIN_IMAGES = 500
util.run_cli(lambda: distill.main(sys.argv[1:]))
"""
FLAGS = ["--preset", "micro", "--batch-size", "4", "--eval-samples", "12", "--scan", "torch",
         "--device", "cpu", "--steps0", "400", "--steps1", "150", "--steps2", "150", "--steps3",
         "150", "--save-every", "1", "--resume"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def snapshot(out):
    """{name: (size, mtime)} of the files a run writes as it trains (not its lock)."""
    files = {}
    for f in os.listdir(out) if os.path.isdir(out) else []:
        if f == ".lock":
            continue
        try:
            st = os.stat(os.path.join(out, f))
        except FileNotFoundError:                       # renamed while we looked
            continue
        files[f] = (st.st_size, st.st_mtime_ns)
    return files


def check_on_disk(out):
    """Every checkpoint loads and holds one loss per step; results.json parses. Returns the
    temporary files present (a kill in the middle of a save leaves one) with their times."""
    for f in sorted(os.listdir(out)):
        if f.endswith(".pt"):
            ckpt = load_checkpoint(os.path.join(out, f))
            assert len(ckpt["losses"]) == ckpt["step"] <= ckpt["steps"], f
    if os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            json.load(f)
    return {(f, t) for f, (_, t) in snapshot(out).items() if ".tmp" in f}


def same_run(a, b):
    """The two out-dirs hold the same checkpoints (weights and losses) and results."""
    for f in sorted(x for x in os.listdir(a) if x.endswith(".pt")):
        ca, cb = load_checkpoint(os.path.join(a, f)), load_checkpoint(os.path.join(b, f))
        assert ca["done"] and cb["done"] and ca["losses"] == cb["losses"], f
        assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"]), f
    keys = ("stage", "model", "layout", "qa_accuracy", "caption_loss", "qa_by_template")
    ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (a, b))
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=150, help="how many times to SIGKILL the run")
    ap.add_argument("--out", default="/tmp/sigkill_study", help="scratch folder (wiped first)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    script = os.path.join(args.out, "distill_micro.py")
    with open(script, "w") as f:
        f.write(WRAPPER)
    ref, out = os.path.join(args.out, "never_killed"), os.path.join(args.out, "killed")
    t0 = time.time()
    subprocess.run([sys.executable, script, *FLAGS, "--out-dir", ref], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"reference run: {time.time() - t0:.0f} s")
    rng, kills, mid_save, restarts, t0 = random.Random(args.seed), 0, 0, 0, time.time()
    while True:
        before = snapshot(out)
        proc = subprocess.Popen([sys.executable, script, *FLAGS, "--out-dir", out], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        restarts += 1
        if kills < args.kills:
            while snapshot(out) == before and proc.poll() is None:   # wait for progress
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        code = proc.wait()
        old_tmp = {(f, t) for f, (_, t) in before.items() if ".tmp" in f}
        mid_save += bool(check_on_disk(out) - old_tmp)          # a new one: killed in a save
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"the run failed by itself (exit code {code})"
        if kills % 25 == 0:
            print(f"{kills} kills, {mid_save} of them during a save, {time.time() - t0:.0f} s")
    left = [f for f in os.listdir(out) if ".tmp" in f]
    assert not left, f"temporary files left behind: {left}"
    same_run(ref, out)
    print(f"{kills} kills ({mid_save} during a save, leaving a temporary file), {restarts} "
          f"starts, {time.time() - t0:.0f} s: every checkpoint loaded after every kill, the "
          "run finished, no temporary file left, and it equals the run never killed, bit for bit")


if __name__ == "__main__":
    main()
