"""Wall-clock milliseconds of a tiny-preset teacher step at several batch sizes, two threads
(as distill.py runs on this machine), and per 32 examples: does a bigger batch use the two
cores better? The median of 20 steps after 5.

    python docs/cpu_study/batch_cost.py 32 64 128"""
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import data                                                     # noqa: E402
import distill                                                  # noqa: E402
from mmmamba import PRESETS, Model                              # noqa: E402

torch.set_num_threads(2)
cfg = PRESETS["tiny"]
train = data.shapes_split("train", 2000)
tok = data.train_tokenizer(train, cfg.vocab_size)
for B in [int(a) for a in sys.argv[1:]] or [32, 64, 128]:
    torch.manual_seed(0)
    model = Model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    rng, times = random.Random(0), []
    for i in range(25):
        t0 = time.perf_counter()
        batch = data.make_batch([train[rng.randrange(len(train))] for _ in range(B)], tok, cfg)
        total, count = distill.answer_ce(model, *batch)
        (total / count).backward()
        opt.step()
        opt.zero_grad()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1e3
    print(f"batch {B}: {ms:.0f} ms a step, {ms / B * 32:.0f} ms per 32 examples")
