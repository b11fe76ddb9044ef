"""Where a tiny-preset teacher step's time goes on the CPU: the milliseconds of process CPU time
(not wall-clock, so that other work on a shared machine counts less) spent building the batch
(tokenizing, drawing), in the forward, the backward and the optimizer, on one thread.

    python docs/cpu_study/step_cost.py                              # the tiny preset
    python docs/cpu_study/step_cost.py d_model=64 head_dim=16 d_mlp=192 img_dim=64"""
import os
import random
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.getcwd())
import data                                                     # noqa: E402
import distill                                                  # noqa: E402
from mmmamba import PRESETS, Model                              # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
fields = dict(a.split("=") for a in sys.argv[1:])
cfg = replace(PRESETS["tiny"], **{k: int(v) for k, v in fields.items()})
train = data.shapes_split("train", 2000)
tok = data.train_tokenizer(train, cfg.vocab_size)
model = Model(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
rng, clock = random.Random(0), time.process_time


def step():
    t0 = clock()
    batch = data.make_batch(rng.sample(train, 32), tok, cfg)
    t1 = clock()
    total, count = distill.answer_ce(model, *batch)
    t2 = clock()
    (total / count).backward()
    t3 = clock()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, t3 - t2, clock() - t3


for _ in range(10):                                             # warm-up
    step()
ms = [1000 * sum(x) / 30 for x in zip(*[step() for _ in range(30)])]
print(fields or "tiny", "CPU ms per step: batch %.1f, forward %.1f, backward %.1f, optimizer %.1f, "
      "total %.1f" % (*ms, sum(ms)))
