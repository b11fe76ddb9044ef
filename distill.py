"""
Train a multimodal transformer teacher, then distill it into a Mamba-2 student in the three
stages of mmMamba (arXiv 2502.13145, PAPER.md sections 3-5). One flat training loop,
train_stage, serves every stage; what changes is the loss and which parameters train.

    python distill.py                         # stages 0-3, linear and hybrid: minutes on a CPU
    python distill.py --stage 2               # one stage, from the previous stage's checkpoint
    python distill.py --stage 3 --attn-every 2                 # a hybrid student of your choice
    python distill.py --resume                # continue an interrupted run where it stopped
    python distill.py --stages 1,3 --out-dir X  # ablation: only these stages (ablate.py runs the tables)
    python distill.py --data llava.json --image-root images/   # your own data
    torchrun --nproc_per_node=2 distill.py ...   # data-parallel: the same result as one process

stage  trains                                         loss                            writes
0      the whole teacher                              cross-entropy on the answers    stage0_teacher.pt
       seeding (seed.py, PAPER.md 3): the teacher's q/k/v/o -> C/B/x/W_O, mimic init for the rest
1      new Mamba-2 params (conv1d, W_dt, dt_bias, a,  layer-wise MSE x 1000, teacher stage1_linear.pt
       W_G, gate norm)                                forcing (PAPER.md 4)
2      + x/B/C projections (W_V, W_K, W_Q copies)     same                            stage2_linear.pt
3      all Mamba-2 params but W_O                     KL(teacher || student), T = 1   stage3_linear.pt
       (hybrid: from stage 2, kept layers are the teacher's attention, frozen)       stage3_hybrid.pt
Everything outside the Mamba-2 mixers (embeddings, norms, MLPs, head, vision, kept attention)
stays the teacher's and frozen in stages 1-3. Each stage is evaluated on held-out images
(question-answer exact match by greedy decoding, caption loss) and appended to results.json.
"""
import json
import os
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

import data
from mmmamba import IM_END_ID, IM_START_ID, IMAGE_ID, IMG_START_ID, PAD_ID, PRESETS, Model
from seed import INITS, hybrid_layout, parse_layers, seed_student
from util import (ArgumentParser, InputError, checkpoint_of, get_device, load_checkpoint,
                  model_from_checkpoint, run_cli, save_checkpoint)

# per preset and stage: learning rate and default steps. tiny: tuned on a 2-core CPU; small:
# on one H100, where a teacher at lr 5e-4 stalled at 78% QA and at 2e-4 reaches 100%
# (docs/small_gpu/teacher_study.md). The paper's are 1e-3, 5e-4, 5e-5 at batch 128/128/64
# for a pretrained 2.6B model.
STAGES = {"tiny": {0: dict(lr=5e-4, steps=8000), 1: dict(lr=3e-3, steps=200),
                   2: dict(lr=1e-3, steps=200), 3: dict(lr=1e-3, steps=400)},
          "small": {0: dict(lr=2e-4, steps=4000), 1: dict(lr=3e-3, steps=300),
                    2: dict(lr=1e-3, steps=300), 3: dict(lr=1e-3, steps=1000)}}
STAGES["paper"] = STAGES["small"]
# the Mamba-2 parameters each stage trains (PAPER.md 4); W_O (o_proj) never trains
NEW = ("conv1d", "dt_proj", "dt_bias", "A_log", "g_proj", "norm")
TRAINABLE = {1: NEW, 2: NEW + ("x_proj", "b_proj", "c_proj"), 3: NEW + ("x_proj", "b_proj", "c_proj")}
N_TRAIN_IMAGES = 20000          # shapes world: 7 conversations each


def parse_args(argv):
    ap = ArgumentParser(description="Train a teacher and distill it into Mamba-2 (mmMamba).")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--stage", default="all", choices=["0", "1", "2", "3", "all"],
                       help="stage to run (0 trains the teacher); 'all' runs 0-3, linear and hybrid")
    which.add_argument("--stages", help="ablation (paper Table 3): distill with only these stages, e.g. "
                       "1,3, the first from the freshly seeded student; 'none' evaluates the seeded student")
    ap.add_argument("--preset", choices=list(PRESETS), help="model size of the teacher (default tiny; "
                    "stages 1-3 take it from the teacher checkpoint)")
    ap.add_argument("--out-dir", default="out", help="where checkpoints and results.json go")
    ap.add_argument("--data", help="LLaVA-style conversation JSON (default: the built-in shapes world)")
    ap.add_argument("--image-root", default=".", help="folder the 'image' paths in --data are relative to")
    for s in range(4):
        ap.add_argument(f"--steps{s}", type=int, help=f"training steps of stage {s} (default: the preset's, "
                        f"tiny {STAGES['tiny'][s]['steps']}, small {STAGES['small'][s]['steps']})")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per training step")
    ap.add_argument("--seed", type=int, default=0, help="random seed (model init, batches, seeding)")
    ap.add_argument("--eval-samples", type=int, default=500, help="held-out questions (and captions) per evaluation")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--attn-every", type=int, help="hybrid at stage 3: keep layers 0, K, 2K, ... as attention")
    group.add_argument("--attn-layers", help="hybrid at stage 3: comma-separated layer indices kept as attention")
    ap.add_argument("--init", default="mimic", choices=INITS, help="initialisation of the new Mamba-2 params (seed.py)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted stage; skip finished ones")
    ap.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps inside a stage")
    ap.add_argument("--device", help="cuda, cpu, ... (default: cuda if available, else cpu)")
    ap.add_argument("--scan", default="auto", choices=["auto", "torch", "triton"],
                    help="SSD scan backend; 'torch' forces the PyTorch reference")
    args = ap.parse_args(argv)
    for s in range(4):
        if getattr(args, f"steps{s}") is not None and getattr(args, f"steps{s}") < 1:
            raise InputError(f"--steps{s} {getattr(args, f'steps{s}')}: a stage needs at least 1 step")
    for flag in ("batch_size", "eval_samples", "save_every"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive number")
    args.attn_layers = parse_layers(args.attn_layers)
    if args.stages is not None:
        args.stages = parse_stages(args.stages)
    # a hybrid layer index out of range fails now, not after training the teacher; without a
    # teacher to train the layer count comes from its checkpoint (checked in run)
    trains_teacher = args.stage in ("0", "all") and args.stages is None
    if (args.attn_every is not None or args.attn_layers is not None) and (args.preset or trains_teacher):
        hybrid_layout(PRESETS[args.preset or "tiny"].n_layer, args.attn_every, args.attn_layers)
    return args


def parse_stages(text):
    """'1,3' -> [1, 3]; 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    try:
        stages = [int(s) for s in text.split(",")]
    except ValueError:
        stages = None
    if not stages or stages != sorted(set(stages)) or not set(stages) <= {1, 2, 3}:
        raise InputError(f"--stages {text!r}: give distillation stages in order, e.g. 1,3 or 2,3 or 3, or 'none'")
    return stages


def stage_settings(args, stage):
    """Learning rate and steps of a stage: the preset's defaults, steps overridden by --steps{stage}."""
    settings = STAGES.get(args.preset, STAGES["tiny"])[stage]
    lr, steps = settings["lr"], settings["steps"]
    return lr, getattr(args, f"steps{stage}") or steps


# -----------------------------------------------------------------------------
# losses, one per kind of stage. tokens, targets: (B, T), right-padded; images: (B, 3, S, S).
# Each returns (sum, count): the loss is sum / count, with the count taken over the whole
# global batch, so that N data-parallel processes compute exactly what one process would.


def answer_ce(model, tokens, targets, images):
    """Stage 0: next-token cross-entropy on the assistant's tokens only (targets -1 elsewhere)."""
    logits = model(tokens, images)                                              # (B, T, V)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="sum")
    return ce, (targets != -1).sum()


def layerwise_mse(teacher, student, tokens, images):
    """Stages 1-2: each Mamba-2 layer reads the teacher's input u of that layer (teacher
    forcing) and must reproduce the teacher attention's per-head output, before W_O."""
    with torch.no_grad():
        ios = teacher.layer_io(tokens, images)                                  # per layer (u, y)
    real = tokens != PAD_ID                                                     # (B, T)
    errs = [F.mse_loss(layer.mixer.mix(u)[real].float(), y[real].float(), reduction="sum")
            for layer, (u, y) in zip(student.layers, ios) if layer.kind == "M"]
    # the mean over layers, tokens and channels of the squared error, times 1000 (PAPER.md 4)
    return torch.stack(errs).sum() * 1000, real.sum() * len(errs) * ios[0][1].shape[-1]


def kl_teacher_student(teacher, student, tokens, images):
    """Stage 3: forward KL(teacher || student) of the next-token distributions, temperature 1,
    summed over the vocabulary and averaged over every text position (not only the answer).
    The prompt positions are free extra signal: predicting "the ___" in "What color is the"
    already depends on which shapes are in the image, so the student learns to look."""
    with torch.no_grad():
        t_logp = teacher(tokens, images).float().log_softmax(-1)                # (B, T, V)
    s_logp = student(tokens, images).float().log_softmax(-1)
    count = (tokens != PAD_ID) & (tokens != IMAGE_ID) & (tokens != IMG_START_ID)  # not pad, not predicting an image slot
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)   # (B, T)
    return kl[count].sum(), count.sum()


# -----------------------------------------------------------------------------
# the training loop shared by all stages


def wsd_lr(step, steps, lr):
    """Warmup-stable-decay: linear warmup over the first 10%, flat, linear decay over the last 10%."""
    ramp = max(1, steps // 10)
    if step < ramp:
        return lr * (step + 1) / ramp
    return lr * min(1.0, (steps - step) / ramp)


def train_stage(name, model, loss_fn, train, tok, args, env, stage, path, extra):
    """Train model's parameters that require grad for --steps{stage} steps and write `path`
    (every --save-every steps and at the end, with done=True). With --resume, continue from
    `path` at its step with its optimizer and random state; a finished one is kept as is.
    Data-parallel under torchrun: every process draws the same global batch and takes its
    share; gradients are summed across processes, so N processes train as one would."""
    rank, world = env["rank"], env["world"]
    params = [p for p in model.parameters() if p.requires_grad]
    lr, steps = stage_settings(args, stage)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999))                          # no decay on biases, 1-D
    batches = torch.Generator().manual_seed(args.seed * 1000 + stage)
    start, losses = 0, []                       # losses: one per step, kept in the checkpoint
    if args.resume and os.path.exists(path):
        ckpt = load_checkpoint(path)
        if ckpt["config"]["layout"] != model.cfg.layout or ckpt.get("stage") != stage:
            raise InputError(f"{path} is a stage {ckpt.get('stage')} checkpoint with layout "
                             f"{ckpt['config']['layout']!r}, not stage {stage} {model.cfg.layout!r}: "
                             "delete it or run without --resume")
        model.load_state_dict(ckpt["model"])
        if ckpt.get("done"):
            print0(env, f"{name}: finished already in {path}, kept (--resume)")
            return model, None
        opt.load_state_dict(ckpt["optimizer"])
        batches.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start, losses = ckpt["step"], ckpt.get("losses", [])
        print0(env, f"{name}: resuming at step {start} of {steps} from {path}")
    n_train = sum(p.numel() for p in params)
    print0(env, f"{name}: {steps} steps, lr {lr:g}, batch {args.batch_size}"
           f"{f' ({args.batch_size // world} on each of {world} processes)' if world > 1 else ''}, "
           f"{n_train / 1e6:.2f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params train")

    saved = start

    def save(step, done):
        nonlocal saved
        saved = step
        if rank == 0:                                           # one writer; the others wait below
            save_checkpoint(path, checkpoint_of(model, **extra, stage=stage, step=step, steps=steps, done=done,
                                                losses=losses, optimizer=opt.state_dict(), tokenizer=tok.to_str(),
                                                rng={"batches": batches.get_state(), "torch": torch.get_rng_state()}))
        if world > 1:
            dist.barrier()

    t0 = time.time()
    model.train()
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, mininterval=2,
               dynamic_ncols=True, disable=rank != 0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = wsd_lr(step, steps, lr)
        idx = torch.randint(len(train), (args.batch_size,), generator=batches).tolist()[rank::world]
        tokens, targets, images = data.make_batch([train[i] for i in idx], tok, model.cfg, env["device"])
        with env["autocast"]:
            total, count = loss_fn(tokens, targets, images)
        count = count.float()
        if world > 1:                                           # normalise by the global count
            dist.all_reduce(count)
        (total / count).backward()
        loss = (total / count).detach()
        if world > 1:
            for p in params:                                    # sum of the shares = the whole batch
                dist.all_reduce(p.grad)
            dist.all_reduce(loss)
        if not torch.isfinite(loss):
            raise InputError(f"{name}: the loss is {loss.item()} at step {step}; stopped. {path} keeps "
                             f"the last good checkpoint (step {saved}): lower the learning rate or "
                             "fix the data, then run again with --resume")
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", gnorm=f"{norm.item():.2f}", refresh=False)
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            save(step + 1, done=False)
    save(steps, done=True)
    model.eval()
    return model, time.time() - t0


def print0(env, *a, **k):
    if env["rank"] == 0:
        print(*a, **k)


def from_rank0(env, obj):
    """Process 0's `obj` on every process (torchrun); itself when there is one process."""
    if env["world"] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -----------------------------------------------------------------------------
# evaluation: exact-match answers by batched greedy decoding, and caption loss


def normalise(text):
    return " ".join(text.lower().strip().rstrip(".!").split())


@torch.no_grad()
def greedy_answers(model, examples, tok, env, max_new_tokens=8, batch_size=128):
    """Greedy answers, decoded as Model.generate does (prefill, then one cached step per
    token) but for many prompts at once: prompts of equal length go together, so no padding."""
    cfg, device = model.cfg, env["device"]
    prompts = [data.encode_prompt(tok, ex["question"], cfg.n_img_tokens) for ex in examples]
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    answers = [None] * len(examples)
    for length, group in by_length.items():
        for j in range(0, len(group), batch_size):
            ids = group[j:j + batch_size]
            tokens = torch.tensor([prompts[i] for i in ids], device=device)               # (B, T)
            images = torch.stack([data.example_image(examples[i], cfg.img_size) for i in ids]).to(device)
            cache = model.new_cache(len(ids), min(cfg.max_seq_len, length + max_new_tokens))
            out = []
            with env["autocast"]:
                logits = model(tokens, images, cache)[:, -1]                               # (B, V)
                while len(out) < max_new_tokens:
                    logits[:, :IM_START_ID] = -torch.inf               # never pad or image tokens
                    out.append(logits.argmax(-1, keepdim=True))                           # (B, 1)
                    if (torch.cat(out, 1) == IM_END_ID).any(1).all() or cache.pos >= cache.max_len:
                        break
                    logits = model(out[-1], None, cache)[:, -1]
            for i, row in zip(ids, torch.cat(out, 1).tolist()):
                answers[i] = tok.decode(row[:row.index(IM_END_ID)] if IM_END_ID in row else row)
    return answers


@torch.no_grad()
def evaluate(model, qa, captions, tok, env, batch_size=128):
    t0 = time.time()
    model.eval()
    answers = greedy_answers(model, qa, tok, env)
    right = [normalise(a) == normalise(ex["answer"]) for a, ex in zip(answers, qa)]
    by_template = defaultdict(list)
    for ok, ex in zip(right, qa):
        by_template[ex["template"]].append(ok)
    loss_sum, n = 0.0, 0
    for j in range(0, len(captions), batch_size):
        tokens, targets, images = data.make_batch(captions[j:j + batch_size], tok, model.cfg, env["device"])
        with env["autocast"]:
            logits = model(tokens, images)
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1,
                                    reduction="sum").item()
        n += int((targets != -1).sum())
    return {"qa_accuracy": sum(right) / len(right), "caption_loss": loss_sum / max(n, 1),
            "qa_by_template": {k: sum(v) / len(v) for k, v in sorted(by_template.items())},
            "eval_s": round(time.time() - t0, 1)}


def report(stage, kind, model, train_s, evalset, tok, env, args, extra_rows=()):
    """Evaluate, print a table against the teacher, and append the record to results.json.
    Under torchrun only process 0 evaluates and writes; the others go on to the next stage."""
    if env["rank"] != 0:
        return None
    qa, captions, blind = evalset
    rec = {"stage": stage, "model": kind, "layout": model.cfg.kinds, "preset": args.preset,
           "stages": stages_label(stage, args) if kind != "teacher" else None, "init": args.init,
           **evaluate(model, qa, captions, tok, env), "train_s": train_s,
           "blind_qa_accuracy": blind, "eval_samples": len(qa), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = os.path.join(args.out_dir, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    results.append(rec)
    with open(path + ".tmp", "w") as f:                         # atomic, like the checkpoints
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\n{'stage':>5} {'model':<8} {'layout':<8} {'QA acc':>7} {'caption loss':>13} {'train s':>8}")
    for r in [*extra_rows, rec]:
        print(f"{r['stage'] if r['stage'] is not None else '-':>5} {r['model']:<8} {r['layout']:<8} {r['qa_accuracy']:>7.3f} "
              f"{r['caption_loss']:>13.3f} {r['train_s'] or 0:>8.0f}")
    print(f"{'':>5} {'blind':<8} {'(text)':<8} {blind:>7.3f}")
    print(f"{kind} QA accuracy by question: "
          + ", ".join(f"{k} {v:.2f}" for k, v in rec["qa_by_template"].items()) + "\n")
    return rec


# -----------------------------------------------------------------------------
# the stages


def previous_stage(stage, args):
    """The distillation stage whose student `stage` starts from; None: the freshly seeded one."""
    if args.stages is not None:                                 # an ablation: only the stages listed
        earlier = [s for s in args.stages if s < stage]
        return earlier[-1] if earlier else None
    return stage - 1 if stage > 1 else None


def stages_label(stage, args):
    """Which stages made a student: '1+2+3' after a full run, '1+3' or 'none' in an ablation."""
    if stage is None:
        return "none"
    prev = previous_stage(stage, args)
    return f"{stages_label(prev, args)}+{stage}" if prev is not None else str(stage)


def load_finished(path, stage, args, kind):
    """The checkpoint a stage starts from; a missing, unfinished or wrong one names the fix."""
    if not os.path.exists(path):
        raise InputError(f"{path} not found: run 'python distill.py --stage {stage} --out-dir {args.out_dir}' first")
    ckpt = load_checkpoint(path)
    if (ckpt.get("stage"), ckpt.get("kind")) != (stage, kind):
        raise InputError(f"{path} holds a stage {ckpt.get('stage')} {ckpt.get('kind')} model, not the stage "
                         f"{stage} {kind} model this needs: rerun 'python distill.py --stage {stage}'")
    if args.preset and ckpt.get("preset") != args.preset:
        raise InputError(f"{path} is from the {ckpt.get('preset')!r} preset, not --preset {args.preset}: "
                         "drop --preset, or use another --out-dir for a new run")
    if not ckpt.get("done"):
        raise InputError(f"{path} is an unfinished stage {stage} (step {ckpt.get('step')}): run "
                         f"'python distill.py --stage {stage} --resume --out-dir {args.out_dir}'")
    return ckpt


def start_student(stage, teacher, args, env, path):
    """The linear student a stage starts from: the previous stage's checkpoint, or the student
    seeded from the teacher (seed.py: its q/k/v/o -> C/B/x/W_O, --init for the new params)."""
    prev = previous_stage(stage, args) if stage is not None else None
    if prev is None:
        torch.manual_seed(args.seed)
        student = seed_student(teacher, "M" * teacher.cfg.n_layer, args.init)
    else:
        student = model_from_checkpoint(load_finished(path(f"stage{prev}_linear.pt"), prev, args, "linear"))
    return to_env(student, args, env)


def to_env(model, args, env):
    model.cfg.scan_backend = args.scan                                  # every layer shares this cfg
    return model.to(env["device"])


def freeze_except(model, stage):
    """Only the Mamba-2 parameters named in TRAINABLE[stage] train; the rest is the teacher's."""
    for name, p in model.named_parameters():
        parts = name.split(".")                                 # layers.{i}.mixer.{param}[.weight]
        p.requires_grad = (parts[0] == "layers" and model.layers[int(parts[1])].kind == "M"
                           and parts[2] == "mixer" and parts[3] in TRAINABLE[stage])
    assert not any(p.requires_grad for n, p in model.named_parameters() if "o_proj" in n)


def setup_device(args):
    """Device (autodetected, or --device), dtype, and the data-parallel group under torchrun."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device:
        device, why = args.device, "--device"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        why = "a GPU is available" if device == "cuda" else "no GPU found"
    device = get_device(device)
    if world > 1:
        if args.batch_size % world:
            raise InputError(f"--batch-size {args.batch_size} does not split over {world} processes: "
                             f"use a multiple of {world}")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        why += f", rank {rank} of {world} (torchrun)"
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))   # torch may default to fewer
    amp = device.type == "cuda"
    env = {"device": device, "autocast": torch.autocast("cuda", torch.bfloat16) if amp else nullcontext(),
           "rank": rank, "world": world}
    print0(env, f"device {device} ({why}), {'bf16 autocast (tensor cores)' if amp else 'float32 (CPU)'}, "
           f"{torch.get_num_threads()} threads")
    return env


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    torch.manual_seed(args.seed)
    env = setup_device(args)
    device = env["device"]
    try:
        run(args, env, device, t_start)
    finally:
        if env["world"] > 1:
            dist.destroy_process_group()


def run(args, env, device, t_start):
    os.makedirs(args.out_dir, exist_ok=True)
    path = lambda name: os.path.join(args.out_dir, name)

    # data: the shapes world or your LLaVA JSON; the tokenizer lives in the teacher checkpoint
    if args.data:
        train, test = data.llava_splits(args.data, args.image_root)
    else:
        train, test = data.shapes_split("train", N_TRAIN_IMAGES), data.shapes_split("test", args.eval_samples)
    random.Random(0).shuffle(test)
    qa = [ex for ex in test if ex["kind"] == "qa"][:args.eval_samples]
    captions = [ex for ex in test if ex["kind"] == "caption"][:args.eval_samples] or qa
    blind = data.blind_baseline(train, qa)
    evalset = (qa, captions, blind)
    print0(env, f"data: {len(train)} training conversations, {len(qa)} held-out questions, "
          f"{len(captions)} captions; blind (text-only) baseline QA accuracy {blind:.3f}")

    if args.stages is not None:
        stages = args.stages or [None]          # None: no distillation stage, evaluate the seeded student
    else:
        stages = [0, 1, 2, 3] if args.stage == "all" else [int(args.stage)]
    hybrid_asked = args.attn_every is not None or args.attn_layers is not None
    teacher, teacher_row = None, None
    for stage in stages:
        if stage == 0:
            args.preset = args.preset or "tiny"
            cfg = replace(PRESETS[args.preset], scan_backend=args.scan)
            tok = data.train_tokenizer(train[:50000], cfg.vocab_size) if env["rank"] == 0 else None
            tok = Tokenizer.from_str(from_rank0(env, tok and tok.to_str()))  # one tokenizer for all
            teacher = Model(cfg).to(device)
            loss = lambda tokens, targets, images: answer_ce(teacher, tokens, targets, images)
            teacher, secs = train_stage("stage 0 teacher", teacher, loss, train, tok, args, env, 0,
                                        path("stage0_teacher.pt"), dict(kind="teacher", preset=args.preset))
            teacher_row = report(0, "teacher", teacher, secs, evalset, tok, env, args)
            teacher = None                              # the later stages read the finished checkpoint
            continue
        # stages 1-3 start from the teacher (frozen, loaded once) and the previous stage's student
        if teacher is None:
            t_ckpt = load_finished(path("stage0_teacher.pt"), 0, args, "teacher")
            tok = Tokenizer.from_str(t_ckpt["tokenizer"])
            args.preset = args.preset or t_ckpt.get("preset")
            teacher = to_env(model_from_checkpoint(t_ckpt), args, env).eval().requires_grad_(False)
            if hybrid_asked:                                    # a wrong layer index fails before training
                hybrid_layout(teacher.cfg.n_layer, args.attn_every, args.attn_layers)
            if teacher_row is None:
                teacher_row = report(0, "teacher", teacher, None, evalset, tok, env, args)
            extra = dict(preset=t_ckpt.get("preset"), init=args.init)
        source = start_student(stage, teacher, args, env, path)
        if stage is None:                                       # --stages none: the seeded student as is
            report(None, "linear", source, 0, evalset, tok, env, args, [teacher_row])
            continue
        if stage in (1, 2):
            student = source
            freeze_except(student, stage)
            loss = lambda tokens, targets, images: layerwise_mse(teacher, student, tokens, images)
            student, secs = train_stage(f"stage {stage} linear", student, loss, train, tok, args, env,
                                        stage, path(f"stage{stage}_linear.pt"), dict(extra, kind="linear"))
            report(stage, "linear", student, secs, evalset, tok, env, args, [teacher_row])
            continue
        # stage 3: the linear student, and/or the hybrid built from the same stage-2 student
        n = teacher.cfg.n_layer
        layers = args.attn_layers
        # --stage 3 with --attn-*: the hybrid only; a full run: both
        kinds = [] if hybrid_asked and args.stage == "3" else [("linear", "M" * n)]
        if hybrid_asked or (args.stage == "all" and args.stages is None):
            kinds.append(("hybrid", hybrid_layout(n, args.attn_every or (None if layers else 4), layers)))
        for kind, layout in kinds:
            student = Model(replace(teacher.cfg, layout=layout))
            sd = source.state_dict()
            for i in (i for i, c in enumerate(layout) if c == "A"):       # kept: the teacher's attention
                prefix = f"layers.{i}.mixer."
                sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
                sd.update({k: v for k, v in teacher.state_dict().items() if k.startswith(prefix)})
            student.load_state_dict(sd)                                 # strict: nothing left out
            student = to_env(student, args, env)
            freeze_except(student, 3)
            loss = lambda tokens, targets, images, student=student: kl_teacher_student(teacher, student, tokens, images)
            student, secs = train_stage(f"stage 3 {kind}", student, loss, train, tok, args, env, 3,
                                        path(f"stage3_{kind}.pt"), dict(extra, kind=kind))
            report(3, kind, student, secs, evalset, tok, env, args, [teacher_row])
    print0(env, f"done in {time.time() - t_start:.0f} s; results in {path('results.json')}")


if __name__ == "__main__":
    run_cli(main)
