"""
Evaluation after every stage of distill.py: held-out question answering by batched greedy
decoding (exact match, overall and per question type), the caption loss, and results.json,
one record per evaluated model, written atomically and fsynced.

    evaluate(model, qa, captions, tok)   -> {"qa_accuracy", "caption_loss", "qa_by_template", ...}
    greedy_answers(model, examples, tok) -> one answer string per example
"""
import json
import os
import random
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
from util import InputError


def held_out(train, test, n):
    """The evaluation set: n held-out questions, n captions (the questions where the data has
    none), and the accuracy of the blind (text-only) baseline on those questions."""
    test = list(test)
    random.Random(0).shuffle(test)          # every question type in the first n
    qa = [ex for ex in test if ex["kind"] == "qa"][:n]
    captions = [ex for ex in test if ex["kind"] == "caption"][:n] or qa
    return qa, captions, data.blind_baseline(train, qa)


def autocast(device):
    """bf16 on a GPU, as in training; float32 elsewhere."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def normalise(text):
    return " ".join(text.lower().strip().rstrip(".!").split())


@torch.no_grad()
def greedy_answers(model, examples, tok, max_new_tokens=8, batch_size=128):
    """Greedy answers, decoded as Model.generate does (prefill, then one cached step per
    token) but for many prompts at once: prompts of equal length go together, so no padding.
    tok: our tokenizer, or a data.Chat / hf.HFChat (its template, images, stop and masked ids)."""
    cfg, device, chat = model.cfg, model.output.weight.device, data.as_chat(tok)
    prompts = [chat.prompt(ex["question"], cfg.n_img_tokens) for ex in examples]
    never, stop = torch.tensor([*chat.never, cfg.img_token_id], device=device), chat.stop_id
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    answers = [None] * len(examples)
    for length, group in by_length.items():
        for j in range(0, len(group), batch_size):
            ids = group[j:j + batch_size]
            tokens = torch.tensor([prompts[i] for i in ids], device=device)        # (B, T)
            images = torch.stack([chat.image(examples[i], cfg.img_size)
                                  for i in ids]).to(device)                       # (B, 3, S, S)
            cache = model.new_cache(len(ids), min(cfg.max_seq_len, length + max_new_tokens))
            out = []
            with autocast(device):
                logits = model(tokens, images, cache)[:, -1]                        # (B, V)
                while len(out) < max_new_tokens:
                    logits[:, never] = -torch.inf           # as Model.generate: never these
                    out.append(logits.argmax(-1, keepdim=True))                    # (B, 1)
                    if (torch.cat(out, 1) == stop).any(1).all() or cache.pos >= cache.max_len:
                        break
                    logits = model(out[-1], None, cache)[:, -1]
            for i, row in zip(ids, torch.cat(out, 1).tolist()):
                answers[i] = chat.decode(row[:row.index(stop)] if stop in row else row)
    return answers


@torch.no_grad()
def evaluate(model, qa, captions, tok, batch_size=128):
    """Exact-match accuracy of the greedy answers (overall and per question type) and the
    mean cross-entropy per caption token."""
    t0, device = time.time(), model.output.weight.device
    model.eval()
    answers = greedy_answers(model, qa, tok)
    right = [normalise(a) == normalise(ex["answer"]) for a, ex in zip(answers, qa)]
    by_template = defaultdict(list)
    for ok, ex in zip(right, qa):
        by_template[ex["template"]].append(ok)
    loss_sum, n = 0.0, 0
    for j in range(0, len(captions), batch_size):
        batch = captions[j:j + batch_size]
        tokens, targets, images = data.make_batch(batch, tok, model.cfg, device)
        with autocast(device):
            logits = model(tokens, images)                                        # (B, T, V)
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                    ignore_index=-1, reduction="sum").item()
        n += int((targets != -1).sum())
    return {"qa_accuracy": sum(right) / len(right), "caption_loss": loss_sum / max(n, 1),
            "qa_by_template": {k: sum(v) / len(v) for k, v in sorted(by_template.items())},
            "eval_s": round(time.time() - t0, 1)}


# -----------------------------------------------------------------------------
# results.json: a list of records, one per evaluated model, oldest first


def write_json(path, obj):
    """Atomically and durably: a temporary file beside `path`, flushed and fsynced, then
    renamed over it, so a crash at any moment leaves the old file or the new one whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_results(out_dir):
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is not valid JSON: move it away (a new one is started)") from None


def report(run, stage, kind, model, train_s, **labels):
    """Evaluate `model` on the run's held-out set, append its record to OUT/results.json and
    print the out-dir's results so far. `labels` override record fields (ablate.py names the
    stages that made a student). Under torchrun only process 0 evaluates and writes."""
    if run.rank != 0:
        return None
    results = read_results(run.args.out_dir)
    if train_s and any((r["stage"], r["model"], r["layout"], r["train_s"])
                       == (stage, kind, model.cfg.kinds, train_s) for r in results):
        return None             # a finished checkpoint kept by --resume, evaluated already
    qa, captions, blind = run.evalset
    chain = "+".join(str(s) for s in range(1, (stage or 0) + 1))        # stage k: 1+...+k
    rec = {"stage": stage, "model": kind, "layout": model.cfg.kinds, "preset": run.preset,
           "stages": None if kind == "teacher" else chain, "init": run.args.init, **labels,
           **evaluate(model, qa, captions, run.chat), "train_s": train_s,
           "blind_qa_accuracy": blind, "eval_samples": len(qa),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    results.append(rec)
    write_json(os.path.join(run.args.out_dir, "results.json"), results)
    print(f"\n{'stage':>5} {'model':<8} {'layout':<8} {'stages':<7} {'QA acc':>7} "
          f"{'caption loss':>13} {'train s':>8}")
    for r in results:
        print(f"{'-' if r['stage'] is None else r['stage']:>5} {r['model']:<8} {r['layout']:<8} "
              f"{r['stages'] or '':<7} {r['qa_accuracy']:>7.3f} {r['caption_loss']:>13.3f} "
              f"{r['train_s'] or 0:>8.0f}")
    print(f"{'':>5} {'blind':<8} {'(text)':<8} {'':<7} {blind:>7.3f}")
    print(f"{kind} QA accuracy by question: "
          + ", ".join(f"{k} {v:.2f}" for k, v in rec["qa_by_template"].items()) + "\n")
    return rec


def report_teacher(run, teacher):
    """The teacher's record, once per out-dir: the row every student is compared with."""
    if run.rank == 0 and not any(r["model"] == "teacher" for r in read_results(run.args.out_dir)):
        report(run, 0, "teacher", teacher, None)
