# The teacher-recipe study of docs/small_gpu/README.md: a small-preset teacher trained with
# the stage-0 loss and schedule, with a held-out evaluation every 1000 steps.
# It ran at commit 2e98fa4 (2026-11-24); later commits moved the functions it borrows, so to
# repeat it exactly, check that commit out first. Usage, from the repository root:
#   [IMGFIRST=1] [NIMG=N] [DEV=cuda] [OUT=dir] \
#     python docs/small_gpu/teacher_study.py NAME PATCH BATCH LR STEPS BUDGET_S [THREADS]
# e.g. recipe K: python docs/small_gpu/teacher_study.py K 16 32 2e-4 5000 480
# Writes study_NAME.json (one record per evaluation) into OUT (default: here).
import contextlib
import dataclasses
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data      # noqa: E402  (the repository root is on the path only now)
import distill   # noqa: E402
import evaluate  # noqa: E402
from mmmamba import PRESETS, Model  # noqa: E402

name, patch, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lr, steps, budget = float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
torch.set_num_threads(int(sys.argv[7]) if len(sys.argv) > 7 else 4)
torch.manual_seed(0)
cfg = dataclasses.replace(PRESETS["small"], img_patch=patch)
if os.environ.get("IMGFIRST"):        # the earlier template, image before the question
    data.prompt_text = lambda q: (f"<|im_start|>user\n<image>\n{q}<|im_end|>\n"
                                  "<|im_start|>assistant\n")
dev = torch.device(os.environ.get("DEV", "cuda"))
amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
env = {"device": dev, "autocast": amp, "rank": 0, "world": 1}

train = data.shapes_split("train", int(os.environ.get("NIMG", distill.N_TRAIN_IMAGES)))
test = data.shapes_split("test", 500)
random.Random(0).shuffle(test)
qa = [e for e in test if e["kind"] == "qa"][:500]
caps = [e for e in test if e["kind"] == "caption"][:200]
train_qa = [e for e in train[:3500] if e["kind"] == "qa"][:500]   # overfitting check
tok = data.train_tokenizer(train[:50000], cfg.vocab_size)

m = Model(cfg).to(dev)
params = list(m.parameters())
opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                        lr=lr)
g = torch.Generator().manual_seed(0)
t0 = time.time()
log = []
for step in range(steps):
    for group in opt.param_groups:
        group["lr"] = distill.wsd_lr(step, steps, lr)
    idx = torch.randint(len(train), (bs,), generator=g).tolist()
    tokens, targets, images = data.make_batch([train[i] for i in idx], tok, cfg, dev)
    with env["autocast"]:
        tot, cnt = distill.answer_ce(m, tokens, targets, images)
    (tot / cnt).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    last = step + 1 == steps or time.time() - t0 > budget
    if (step + 1) % 1000 == 0 or last:
        r = evaluate.evaluate(m, qa, caps, tok)
        rt = evaluate.evaluate(m, train_qa, caps[:10], tok)
        m.train()
        rec = dict(step=step + 1, s=round(time.time() - t0), loss=round((tot / cnt).item(), 4),
                   acc=r["qa_accuracy"], train_acc=rt["qa_accuracy"],
                   cap=round(r["caption_loss"], 3),
                   by={k: round(v, 2) for k, v in r["qa_by_template"].items()})
        log.append(rec)
        print(name, json.dumps(rec), flush=True)
        with open(os.path.join(os.environ.get("OUT", "."), f"study_{name}.json"), "w") as f:
            json.dump(log, f)
    if last:
        break
