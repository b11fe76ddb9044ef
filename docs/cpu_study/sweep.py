"""One run of `distill.py` with the tiny preset, its recipe or its initialisation changed, for
the CPU recipe study (docs/cpu_study.md). Everything else is distill.py's own code path.

    python docs/cpu_study/sweep.py --set img_size=64 --set img_patch=16 --init-std 0.05 \
        --recipe 0=1e-3,32,1000 --threads 1 -- --stage 0 --out-dir /tmp/cs/v1

--set K=V       a field of mmmamba.PRESETS["tiny"] (int or float)
--recipe S=LR,BATCH,STEPS   distill.RECIPE[S]["tiny"]
--init-std S    every Linear and Embedding of a new teacher drawn from N(0, S^2) (default 0.02)
--qk-std S      then W_Q and W_K from N(0, S^2)
--loss seq      stage 0's loss: each conversation's mean over its answer tokens, then the mean
                over conversations (distill.answer_ce: the mean over all answer tokens)
--image-first   the image before the question in the prompt (data.prompt_text: after)
--curve N       also evaluate (300 questions, 100 captions) every N steps of stage 0
Writes OUT_DIR/sweep.json: the settings, the wall-clock seconds and results.json's rows."""
import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.getcwd())
import data                                                     # noqa: E402
import distill                                                  # noqa: E402
import evaluate                                                 # noqa: E402
import mmmamba                                                  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--set", action="append", default=[], help="K=V: a field of the tiny preset")
ap.add_argument("--recipe", action="append", default=[], help="S=LR,BATCH,STEPS")
ap.add_argument("--init-std", type=float)
ap.add_argument("--threads", type=int)
ap.add_argument("--qk-std", type=float)
ap.add_argument("--loss", default="token", choices=["token", "seq"])
ap.add_argument("--image-first", action="store_true")
ap.add_argument("--curve", type=int)
args, rest = ap.parse_known_args()
rest = [a for a in rest if a != "--"]
if args.threads:
    torch.set_num_threads(args.threads)
fields = {}
for kv in args.set:
    k, v = kv.split("=")
    fields[k] = float(v) if "." in v or "e" in v else int(v)
mmmamba.PRESETS["tiny"] = replace(mmmamba.PRESETS["tiny"], **fields)
for r in args.recipe:
    s, v = r.split("=")
    lr, batch, steps = v.split(",")
    distill.RECIPE[int(s)]["tiny"] = (float(lr), int(batch), int(steps))
STATE = {"curve": []}


def new_model(cfg, _model=mmmamba.Model):
    m = _model(cfg)
    for mod in m.modules():
        if args.init_std and isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(mod.weight, std=args.init_std)
    for layer in m.layers if args.qk_std else []:
        for lin in (layer.mixer.q_proj, layer.mixer.k_proj):
            torch.nn.init.normal_(lin.weight, std=args.qk_std)
    STATE["model"] = m
    return m


distill.Model = new_model
if args.image_first:
    data.prompt_text = lambda q: (f"<|im_start|>user\n<image>\n{q}<|im_end|>\n"
                                  "<|im_start|>assistant\n")
if args.loss == "seq":
    def seq_ce(model, tokens, targets, images):
        logits = model(tokens, images)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                               ignore_index=-1, reduction="none")
        scored = (targets != -1).float()
        per_seq = (ce.view(targets.shape) * scored).sum(1) / scored.sum(1)
        return per_seq.sum(), torch.tensor(len(tokens))
    distill.answer_ce = seq_ce
_load_data, _wsd = distill.load_data, distill.wsd_lr


def load_data(run):
    _load_data(run)
    STATE["run"] = run


def wsd_lr(step, steps, lr):
    m = STATE.get("model")
    if args.curve and step and step % args.curve == 0 and m is not None and m.training \
            and STATE.get("last") != step:                     # once per step, not per group
        STATE["last"] = step
        qa, captions, _ = STATE["run"].evalset
        r = evaluate.evaluate(m, qa[:300], captions[:100], STATE["run"].tok)
        m.train()
        STATE["curve"].append({"step": step, "qa": r["qa_accuracy"],
                               "caption_loss": round(r["caption_loss"], 4),
                               "by": {k: round(v, 3) for k, v in r["qa_by_template"].items()}})
        print(json.dumps(STATE["curve"][-1]), flush=True)
    return _wsd(step, steps, lr)


distill.load_data, distill.wsd_lr = load_data, wsd_lr
out = rest[rest.index("--out-dir") + 1]
t0 = time.time()
distill.main(rest)
rows = json.load(open(os.path.join(out, "results.json")))
init_std = args.init_std or mmmamba.PRESETS["tiny"].init_std
json.dump({"set": fields, "recipe": args.recipe, "init_std": init_std,
           "threads": torch.get_num_threads(),
           "qk_std": args.qk_std, "loss": args.loss, "image_first": args.image_first,
           "curve": STATE["curve"], "argv": rest, "wall_s": round(time.time() - t0, 1),
           "rows": rows}, open(os.path.join(out, "sweep.json"), "w"), indent=1)
