"""Would a teacher step run faster as two length groups? The same 32 examples the loop draws,
(a) as one batch padded to its longest row (distill.py's step before), (b) as two groups by
length (session.length_groups, distill.py's step now), each cut to its own longest row, their
(sum, count) losses added before one backward: the same loss and gradient, fewer positions.
Wall-clock ms, two threads, the median of 40 steps per way, the ways taken in turn in blocks
of 10 steps, twice. Checks that (b) gives (a)'s gradient first.

    python docs/cpu_study/step_groups.py"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import data                                                     # noqa: E402
import distill                                                  # noqa: E402
import mmmamba                                                  # noqa: E402
from session import length_groups                               # noqa: E402

cfg = mmmamba.PRESETS["tiny"]
train = data.shapes_split("train", 20000)
tok = data.train_tokenizer(train, cfg.vocab_size)
chat = data.CachedChat(tok)
cpu = torch.device("cpu")


def draws(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[train[i] for i in torch.randint(len(train), (32,), generator=g).tolist()]
            for _ in range(n)]


def groups(examples):
    """The examples as distill.py's loop takes them now: session.length_groups."""
    return length_groups(data.make_batch(examples, chat, cfg, cpu))


def loss(model, batches):
    total = count = 0
    for b in batches:
        t, c = distill.answer_ce(model, *b)
        total, count = total + t, count + c
    return total / count


def step(model, opt, batches):
    loss(model, batches).backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


torch.manual_seed(0)
model = mmmamba.Model(cfg)
ex = draws(1, seed=1)[0]
g1 = torch.autograd.grad(loss(model, [data.make_batch(ex, chat, cfg, cpu)]), model.parameters())
g2 = torch.autograd.grad(loss(model, groups(ex)), model.parameters())
rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(g2, g1) if b.norm() > 0)
print(f"the two ways' gradients differ by at most {rel:.1e} (relative, per tensor)")

opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=True)
batches = draws(80)
ways = {"one batch": lambda ex: [data.make_batch(ex, chat, cfg, cpu)], "two groups": groups}
for ex in batches[:5]:
    for make in ways.values():
        step(model, opt, make(ex))                               # warm-up, the caches filled
times = {w: [] for w in ways}
for block in range(4):
    for w, make in ways.items():
        for ex in batches[block * 10 + 5:block * 10 + 15]:
            t = time.perf_counter()
            step(model, opt, make(ex))
            times[w].append(time.perf_counter() - t)
for w, ts in times.items():
    print(f"{w:10s} {statistics.median(ts) * 1e3:.1f} ms")
