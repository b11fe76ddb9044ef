"""Milliseconds (wall-clock, one thread) of a stage-1 and a stage-3 student step from a
finished teacher, at the scan chunk sizes given: the mean of 10 steps after 2. PROFILE=1:
also the ops that take the most time in the first chunk size's stage-1 steps (torch.profiler).

    python docs/cpu_study/student_step.py out/stage0_teacher.pt 32 64"""
import os
import random
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.getcwd())
import data                                                     # noqa: E402
import distill                                                  # noqa: E402
from seed import seed_student                                   # noqa: E402
from util import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint  # noqa: E402

torch.set_num_threads(1)
path, chunks = sys.argv[1], [int(a) for a in sys.argv[2:]] or [32]
ckpt = load_checkpoint(path)
tok = tokenizer_from_checkpoint(ckpt, path)
train = data.shapes_split("train", 2000)
for Q in chunks:
    teacher = model_from_checkpoint(ckpt).eval().requires_grad_(False)
    torch.manual_seed(0)
    student = seed_student(teacher, "M" * teacher.cfg.n_layer)
    for layer in student.layers:
        layer.mixer.cfg = replace(layer.mixer.cfg, chunk_size=Q)
    rng = random.Random(0)
    for stage in (1, 3):
        distill.freeze_for(student, stage)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
        loss_of, times = distill.StageLoss(stage, student), []
        prof = os.environ.get("PROFILE") and stage == 1 and Q == chunks[0]
        profiler = torch.profiler.profile() if prof else None
        for i in range(12):
            if profiler and i == 2:
                profiler.start()
            batch = data.make_batch([train[rng.randrange(len(train))] for _ in range(32)], tok,
                                    student.cfg)
            t0 = time.perf_counter()
            total, count = loss_of(teacher, *batch)
            (total / count).backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        if profiler:
            profiler.stop()
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        print(f"chunk {Q}, stage {stage}: {sum(times) / len(times) * 1e3:.0f} ms a step")
