"""What each of the step's speed changes buys on this machine: a tiny-preset teacher step
(wall-clock ms, two threads, the median of 40 steps) with the changes taken away one at a
time, each way in blocks of steps taken in turn, twice, so that the machine's drift hits them
alike; then a student step (stage 1 and stage 3) with the scan's chunks as before and now.

    python docs/cpu_study/step_ab.py                # from a fresh teacher; students need one:
    python docs/cpu_study/step_ab.py out/stage0_teacher.pt

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
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
import data                                                     # noqa: E402
import distill                                                  # noqa: E402
import mmmamba                                                  # noqa: E402

cfg = mmmamba.PRESETS["tiny"]
train = data.shapes_split("train", 20000)
tok = data.train_tokenizer(train[:50000], cfg.vocab_size)
cached, plain = data.CachedChat(tok), data.Chat(tok)
cached_angles = mmmamba.rope_angles


def all_logits_ce(model, tokens, targets, images):
    logits = model(tokens, images)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                           reduction="sum"), (targets != -1).sum()


WAYS = {"now": {}, "-cache": {"chat": plain}, "-fused": {"fused": False},
        "-scored": {"loss": all_logits_ce}, "-angles": {"angles": mmmamba.angles},
        "4 layers": {"n_layer": 4}}


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


def student_steps(path, n=14, warm=4):
    from seed import seed_student
    from util import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
    ckpt = load_checkpoint(path)
    teacher = model_from_checkpoint(ckpt).eval().requires_grad_(False)
    chat = data.CachedChat(tokenizer_from_checkpoint(ckpt, path))
    # before: chunks of 32, a 33-token sequence padded to 64; now: one chunk of its length.
    # (Timing only: raw dt padded with 0 is not dt = 0, but later tokens change nothing
    # before them, and the final state is not used in training.)
    chunked = mmmamba.ssd.__globals__["ssd_chunked"]

    def padded(x, dt, A, B, C, dt_bias=None, initial_state=None, chunk_size=128):
        l, Q = x.shape[1], 32
        pad = (-l) % Q
        y, final = chunked(F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad)), A,
                           *(F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B, C)), dt_bias,
                           initial_state, Q)
        return y[:, :l], final
    for name, fn in (("chunks of 32", padded), ("one chunk", chunked)):
        mmmamba.ssd.__globals__["ssd_chunked"] = fn
        torch.manual_seed(0)
        student, rng = seed_student(teacher, "M" * teacher.cfg.n_layer), random.Random(0)
        for stage in (1, 3):
            distill.freeze_for(student, stage)
            opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad],
                                    lr=1e-4, fused=True)
            loss_of, ts = distill.StageLoss(stage, student), []
            for i in range(n):
                batch = data.make_batch(rng.sample(train, 32), chat, student.cfg)
                t0 = time.perf_counter()
                total, count = loss_of(teacher, *batch)
                (total / count).backward()
                opt.step()
                opt.zero_grad()
                if i >= warm:
                    ts.append(time.perf_counter() - t0)
            print(f"student stage {stage}, {name:12s} {1e3 * statistics.median(ts):6.1f} ms")
    mmmamba.ssd.__globals__["ssd_chunked"] = chunked


teacher_steps()
if len(sys.argv) > 1:
    student_steps(sys.argv[1])
