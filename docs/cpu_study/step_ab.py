"""What each of the step's speed changes buys on this machine: a tiny-preset teacher step
(wall-clock ms, two threads, the median of 40 steps) with the changes taken away one at a
time, each way in blocks of steps taken in turn, twice, so that the machine's drift hits them
alike. (Student steps with the scan's chunks as before and now: student_step.py 32 64.)

    python docs/cpu_study/step_ab.py

Ways: "now" is distill.py's step; "-cache" builds batches with the plain chat (every text
encoded, every image drawn anew); "-fused" uses the foreach AdamW; "-scored" takes the LM
head at every position; "-angles" makes RoPE's angles at every call; "4 layers" the
previous preset's depth."""
import os
import random
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.getcwd())
import data                                                     # noqa: E402
import distill                                                  # noqa: E402
import mmmamba                                                  # noqa: E402
import train_fast                                               # noqa: E402

cfg = mmmamba.PRESETS["tiny"]
train = data.shapes_split("train", 20000)
tok = data.train_tokenizer(train[:50000], cfg.vocab_size)
cached, plain = data.CachedChat(tok), data.Chat(tok)
cached_angles = mmmamba.rope_angles


WAYS = {"now": {}, "-cache": {"chat": plain}, "-fused": {"fused": False},
        "-scored": {"loss": lambda m, *b: train_fast.stage_loss(0, None, m, *b)},  # every row
        "-angles": {"angles": mmmamba.angles}, "4 layers": {"n_layer": 4}}


def make(way):
    o = WAYS[way]
    torch.manual_seed(0)
    model = mmmamba.Model(replace(cfg, n_layer=o.get("n_layer", cfg.n_layer)))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=o.get("fused", True))
    return model, opt, o.get("chat", cached), o.get("loss", distill.answer_ce), o.get("angles")


def teacher_steps(rounds=3, n=25, warm=5):
    """Each way for the same n batches in turn, the turns repeated (ABC...ABC), the first
    round only warming up: blocks, not single steps, so that one way's tensors do not evict
    another's from the caches; the cached chat holds the batches' texts and images already,
    as it does after the first part of a run."""
    rng = random.Random(0)
    examples = [rng.sample(train, 32) for _ in range(n)]
    for ex in examples:
        data.make_batch(ex, cached, cfg)
    runs, times = {w: make(w) for w in WAYS}, {w: [] for w in WAYS}
    for r in range(rounds):
        for way, (model, opt, chat, loss, angles) in runs.items():
            mmmamba.rope_angles = angles or cached_angles
            for i, ex in enumerate(examples):
                t0 = time.perf_counter()
                total, count = loss(model, *data.make_batch(ex, chat, model.cfg))
                (total / count).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r and i >= warm:
                    times[way].append(time.perf_counter() - t0)
    mmmamba.rope_angles = cached_angles
    for way, ts in times.items():
        print(f"teacher step, {way:9s} {1e3 * statistics.median(ts):6.1f} ms")


teacher_steps()
