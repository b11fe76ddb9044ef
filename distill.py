"""
Train a multimodal transformer teacher, then distill it into Mamba-2 in the three stages of
mmMamba (arXiv 2502.13145 Sec. 4.2-4.4; docs/method.md §5), and into the hybrid that keeps some
of the teacher's attention layers (Sec. 4.5; §6). Read top to bottom: the recipe (RECIPE),
the three losses, the one training loop (train_stage), then main, which runs the stages in
order. Evaluation is in evaluate.py, the paper's ablations (Tables 3-6) in ablate.py.

    python distill.py                          # the teacher, stages 1-3, linear and hybrid
    python distill.py --stage 2                # one stage, from the previous stage's checkpoint
    python distill.py --stage 3 --attn-every 2 # a hybrid of your choice (layers 0, 2, ... kept)
    python distill.py --resume                 # continue a stopped run where it stopped
    python distill.py --data llava.json --image-root images/   # your own data
    python distill.py --teacher-hf HoVLE --data llava.json     # the real teacher: stages 1-3
    torchrun --nproc_per_node=2 distill.py     # data-parallel: what one process computes

Stage 0 trains the teacher. Seeding (seed.py) copies its W_Q, W_K, W_V, W_O into C, B, x and
the output projection of a Mamba-2 layer in place of each attention layer. Stages 1-2 are
layer-wise with teacher forcing: each Mamba-2 layer reads the teacher's input to that layer
and must reproduce the teacher attention's output. Stage 3 trains the student end to end on
the teacher's next-token distributions. Everything outside the Mamba-2 mixers (embeddings,
norms, MLPs, head, W_O, kept attention) stays the teacher's, frozen. Each stage writes
OUT/stage{k}_{kind}.pt and appends its evaluation on held-out images to OUT/results.json.
"""
import math
import os
import time
from dataclasses import replace
from importlib import import_module

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import evaluate
import hf
from mmmamba import PAD_ID, PRESETS, Model
from seed import INITS, hybrid_layout, make_hybrid, parse_layers, seed_student
from session import CtrlC, Stopped, length_groups, open_run
from util import (ArgumentParser, InputError, checkpoint_of, load_checkpoint, model_from_checkpoint,
                  run_cli, tokenizer_from_checkpoint)

# -----------------------------------------------------------------------------
# the recipe (arXiv 2502.13145 Sec. 4.2-4.4; docs/method.md §5)

NEW = ("conv1d", "dt_proj", "dt_bias", "A_log", "g_proj", "norm")  # seeded fresh (seed.py)
XBC = ("x_proj", "b_proj", "c_proj")                             # the copies of W_V, W_K, W_Q
# Per stage: which Mamba-2 parameters train, the loss, and (learning rate, batch, steps) per
# preset. `paper` is the paper's own (for a 2.6B teacher; global batch over all GPUs); it has
# no stage 0, since the paper distils pretrained HoVLE: the paper preset takes small's. Ours
# are tuned: tiny on a 2-core CPU, small on one H100, where a teacher at lr 5e-4 stalled at
# 78% QA and at 2e-4 reaches 100% (docs/small_gpu/README.md). A preset not named here trains
# with tiny's. Every stage, as in the paper: AdamW (0.9, 0.999), weight decay 0.05 (none on
# 1-D parameters), warmup-stable-decay with 10% warmup and 10% decay. We clip gradients at norm
# 1 (the paper's clipping: docs/method.md §5).
RECIPE = {
    0: dict(trains="everything", loss="cross-entropy on the answer tokens",
            tiny=(5e-4, 32, 3000), small=(2e-4, 32, 4000), paper=(2e-4, 32, 4000)),
    1: dict(trains=NEW, loss="layer-wise MSE x 1000",
            tiny=(3e-3, 32, 150), small=(3e-3, 32, 300), paper=(1e-3, 128, 20000)),
    2: dict(trains=NEW + XBC, loss="layer-wise MSE x 1000",
            tiny=(1e-3, 32, 150), small=(1e-3, 32, 300), paper=(5e-4, 128, 20000)),
    # deviation: dt_bias and A_log (in NEW) train here too, as the paper's text says; the
    # released config leaves them out of stage 3
    3: dict(trains=NEW + XBC, loss="KL(teacher || student) per token",
            tiny=(1e-3, 32, 300), small=(1e-3, 32, 1000), paper=(5e-5, 64, 20000)),
}
N_TRAIN_IMAGES = 20000          # shapes world: 7 conversations each


def settings(run, stage):
    """(lr, batch, steps) of a stage: the recipe's for the preset; --batch-size, --steps{k}."""
    lr, batch, steps = RECIPE[stage].get(run.preset, RECIPE[stage]["tiny"])
    return lr, run.args.batch_size or batch, getattr(run.args, f"steps{stage}") or steps


def make_parser():
    ap = ArgumentParser(description="Train a teacher and distill it into Mamba-2 (mmMamba).")
    add = ap.add_argument
    add("--stage", default="all", choices=["0", "1", "2", "3", "all"],
        help="stage to run (0 trains the teacher); 'all' runs 0-3, linear and hybrid")
    add("--preset", choices=list(PRESETS),
        help="the teacher's size (default tiny; stages 1-3 read it from the teacher checkpoint;"
        " with --teacher-hf only RECIPE's rows, default paper)")
    add("--teacher-hf", help="a HoVLE folder as the teacher (docs/real_checkpoints.md): its "
        "tokenizer, chat template and images; stages 1-3")
    add("--out-dir", default="out", help="checkpoints and results.json (one run at a time)")
    add("--data", help="LLaVA-style conversation JSON (default: the built-in shapes world)")
    add("--image-root", default=".", help="the folder --data's image paths are relative to")
    for s in range(4):
        add(f"--steps{s}", type=int, help=f"training steps of stage {s} (default: RECIPE's)")
    add("--batch-size", type=int, help="sequences per training step (default: RECIPE's)")
    add("--seed", type=int, default=0, help="random seed (model init, batches, seeding)")
    add("--eval-samples", type=int, default=500, help="held-out questions (and captions)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--attn-every", type=int,
                       help="the hybrid keeps layers 0, K, 2K, ... as attention (default 4)")
    group.add_argument("--attn-layers", help="the hybrid keeps these layers, e.g. 0,2")
    add("--init", default="mimic", choices=INITS, help="how seed.py starts the new parameters")
    add("--resume", action="store_true", help="continue stopped stages, keep finished ones")
    add("--save-every", type=int, default=200, help="checkpoint every N steps of a stage")
    add("--device", help="cuda, cpu, ... (default: cuda if there is one, else cpu)")
    add("--scan", default="auto", choices=["auto", "torch", "triton"],
        help="SSD scan backend; 'torch' forces the PyTorch reference")
    return ap


def check_args(args):
    for flag in ("steps0", "steps1", "steps2", "steps3", "batch_size", "eval_samples",
                 "save_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    if not 0 <= args.seed < 2 ** 32:
        raise InputError(f"--seed {args.seed}: give a seed from 0 to {2 ** 32 - 1}")
    if args.teacher_hf and args.stage == "0":
        raise InputError("--stage 0 trains our own teacher; --teacher-hf's folder is the teacher: "
                         "give --stage 1, 2, 3 or all")
    args.attn_layers = parse_layers(args.attn_layers)
    return args


# -----------------------------------------------------------------------------
# the losses, one per kind of stage. tokens, targets: (B, T), right-padded; images: (B, 3, S, S).
# Each returns (sum, count): the loss is sum / count, with the count taken over the whole
# global batch, so that N data-parallel processes compute exactly what one process would.


def answer_ce(model, tokens, targets, images):
    """Stage 0: next-token cross-entropy on the assistant's tokens only (targets -1 elsewhere)."""
    scored = targets != -1
    logits = model(tokens, images, at=scored)              # (K, V): the LM head where scored
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), scored.sum()


def layerwise_mse(teacher, student, tokens, images):
    """Stages 1-2 (Sec. 4.2-4.4): each Mamba-2 layer reads the teacher's input u of that layer
    (teacher forcing) and must reproduce the teacher attention's per-head output, before W_O."""
    with torch.no_grad():
        ios = teacher.layer_io(tokens, images)                                  # per layer (u, y)
    real = tokens != PAD_ID                                                     # (B, T)
    errs = [F.mse_loss(layer.mixer.mix(u)[real].float(), y[real].float(), reduction="sum")
            for layer, (u, y) in zip(student.layers, ios) if layer.kind == "M"]
    # the mean over layers, tokens and channels of the squared error, times 1000 (Sec. 4.2-4.4)
    return torch.stack(errs).sum() * 1000, real.sum() * len(errs) * ios[0][1].shape[-1]


def kl_teacher_student(teacher, student, tokens, images):
    """Stage 3 (Sec. 4.2-4.4): forward KL(teacher || student) of the next-token distributions at
    temperature 1. Deviation, on purpose: per token (summed over the vocabulary, averaged over
    the counted positions) so that its values read like a loss, and every text position
    counts, not only the answer's: predicting "the ___" in "What color is the" already depends
    on which shapes the image holds, so the student learns to look. Not counted: padding, and
    positions whose next token is an image slot (the model never predicts those)."""
    count = kl_positions(tokens, student.cfg.img_token_id)                     # (B, T)
    with torch.no_grad():                                   # logits where counted: (K, V)
        t_logp = teacher(tokens, images, at=count).float().log_softmax(-1)
    s_logp = student(tokens, images, at=count).float().log_softmax(-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum"), count.sum()


def kl_positions(tokens, img_token_id):
    """Where stage 3 counts the KL: not padding, not an image slot (<image> ours,
    <IMG_CONTEXT> HoVLE's), and not the token before a slot."""
    slot = tokens == img_token_id                                               # (B, T)
    return (tokens != PAD_ID) & ~slot & ~slot.roll(-1, 1)


class StageLoss(nn.Module):
    """A stage's loss as a module, so that DistributedDataParallel can wrap it: the layer-wise
    stages call each layer's mixer directly, which would bypass DDP's forward if DDP wrapped
    the student. Its parameters are the student's; the frozen teacher is an argument, so DDP
    neither broadcasts nor watches it."""

    def __init__(self, stage, student):
        super().__init__()
        self.stage, self.student = stage, student

    def forward(self, teacher, tokens, targets, images):
        if self.stage == 0:
            return answer_ce(self.student, tokens, targets, images)
        if self.stage in (1, 2):
            return layerwise_mse(teacher, self.student, tokens, images)
        return kl_teacher_student(teacher, self.student, tokens, images)


# -----------------------------------------------------------------------------
# the training loop, the same for every stage


def wsd_lr(step, steps, lr):
    """Warmup-stable-decay: linear warmup over the first 10% of the steps, flat, then linear
    decay over the last 10%."""
    ramp = max(1, steps // 10)
    if step < ramp:
        return lr * (step + 1) / ramp
    return lr * min(1.0, (steps - step) / ramp)


def freeze_for(model, stage):
    """Stage 0 trains the whole teacher; stages 1-3 only the Mamba-2 parameters RECIPE names."""
    trains = RECIPE[stage]["trains"]
    for name, p in model.named_parameters():
        parts = name.split(".")                                 # layers.{i}.mixer.{param}[.weight]
        p.requires_grad = trains == "everything" or (
            parts[0] == "layers" and model.layers[int(parts[1])].kind == "M"
            and parts[2] == "mixer" and parts[3] in trains)


def train_stage(run, stage, kind, model, teacher=None):
    """Train `model` for one stage of RECIPE and keep it in OUT/stage{stage}_{kind}.pt: every
    --save-every steps, at a Ctrl-C, and at the end (done). With --resume, continue from that
    checkpoint exactly (model, optimizer, batch order, random state); a finished one is kept.
    Under torchrun every process draws the same global batch and trains on its share.
    Returns (model, seconds of training)."""
    if run.device.type == "cuda" and run.world == 1:    # the same loop, faster: train_fast.py
        return import_module("train_fast").train_stage(run, stage, kind, model, teacher)
    args, path = run.args, run.path(stage, kind)
    lr, batch, steps = settings(run, stage)
    freeze_for(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), fused=True)  # one pass per tensor
    batches = torch.Generator().manual_seed(args.seed * 1000 + stage)
    start = resume(run, path, stage, [lr, batch, steps], model, opt, batches)
    if start["done"]:
        run.print(f"{path}: finished already, kept (--resume)")
        return model.eval(), start["train_s"]
    losses, saved = start["losses"], start["step"]                      # losses: one per step
    n_train, n_all = (sum(p.numel() for p in ps) / 1e6 for ps in (params, model.parameters()))
    run.print(f"stage {stage} {kind}: {RECIPE[stage]['loss']}; {steps} steps, lr {lr:g}, "
              f"batch {batch} over {run.world} process(es); {n_train:.2f}M of {n_all:.2f}M "
              "params train")
    loss_of = StageLoss(stage, model)
    if run.world > 1:               # all-reduces the gradients during backward, bucket by bucket
        loss_of = DistributedDataParallel(loss_of)
    t0, train_s = time.time(), start["train_s"]
    model.train()
    with CtrlC() as ctrl_c, tqdm(range(start["step"], steps), desc=f"stage {stage} {kind}",
                                 initial=start["step"], total=steps, mininterval=2,
                                 disable=run.rank != 0) as bar:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = wsd_lr(step, steps, lr)
            idx = torch.randint(len(run.train), (batch,), generator=batches).tolist()
            drawn = data.make_batch([run.train[i] for i in idx[run.rank::run.world]], run.chat,
                                    model.cfg, run.device)
            total = count = 0       # by length, two groups: less padding, the same gradient; DDP
            for group in [drawn] if run.world > 1 else length_groups(drawn):  # runs one pass
                with run.autocast:
                    t, c = loss_of(teacher, *group)
                total, count = total + t, count + c
            count = run.all_sum(count.float())                     # over the whole global batch
            # DDP averages the N processes' gradients; times N makes that their sum, the
            # gradient of sum / count over the global batch, as one process computes it
            (total / count * run.world).backward()
            asked = torch.tensor(float(ctrl_c.asked), device=count.device)  # by any process
            loss, stop = run.all_sum(torch.stack([total.detach() / count, asked])).tolist()
            if not math.isfinite(loss):
                raise InputError(f"stage {stage} {kind}: the loss is {loss} at step {step}; "
                                 f"stopped. {path} keeps the last good checkpoint (step {saved}):"
                                 " lower the learning rate or fix the data, then --resume")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss, 6))
            done = step + 1 == steps
            if done or stop or (step + 1) % args.save_every == 0:
                train_s = start["train_s"] + time.time() - t0
                run.save(path, checkpoint_of(
                    model, kind=kind, stage=stage, preset=run.preset, init=args.init,
                    data=args.data or "shapes world", done=done,  # the tokenizer: ours, or where
                    **({"hf": run.hf} if run.hf else {"tokenizer": run.tok.to_str()}),  # it is
                    step=step + 1, steps=steps, recipe=[lr, batch, steps], losses=losses,
                    train_s=train_s, optimizer=opt.state_dict(),
                    rng={"batches": batches.get_state(), "torch": torch.get_rng_state()}))
                saved = step + 1
            if stop and not done:
                raise Stopped(f"stopped (Ctrl-C) after step {saved} of stage {stage} {kind}, "
                              f"kept in {path}: continue with --resume")
    return model.eval(), train_s


def resume(run, path, stage, recipe, model, opt, batches):
    """With --resume and a checkpoint at `path`: load it into the model, the optimizer and the
    random states, and return where it stands; otherwise a fresh start."""
    if not (run.args.resume and os.path.exists(path)):
        return {"step": 0, "losses": [], "train_s": 0.0, "done": False}
    ckpt = load_checkpoint(path)
    was = (ckpt.get("stage"), ckpt["config"]["layout"], ckpt.get("recipe", recipe), ckpt.get("hf"))
    if was != (stage, model.cfg.layout, recipe, run.hf):
        raise InputError(f"{path} is stage {was[0]}, layout {was[1]!r}, (lr, batch, steps) "
                         f"{was[2]}, teacher {was[3] or 'ours'}, not stage {stage}, "
                         f"{model.cfg.layout!r}, {recipe}, {run.hf or 'ours'} as asked: give the "
                         "flags it was started with, or delete it")
    model.load_state_dict(ckpt["model"])
    if not ckpt["done"]:
        opt.load_state_dict(ckpt["optimizer"])
        batches.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        run.print(f"{path}: resuming at step {ckpt['step']} of {ckpt['steps']}")
    return {"step": ckpt["step"], "losses": ckpt.get("losses", []),
            "train_s": ckpt.get("train_s", 0.0), "done": ckpt["done"]}


# -----------------------------------------------------------------------------
# what the stages start from


def load_finished(run, stage, kind):
    """The finished checkpoint a stage starts from; a missing, unfinished or wrong one names
    the command that makes it."""
    path = run.path(stage, kind)
    again = f"python distill.py --stage {stage} --out-dir {run.args.out_dir}"
    if not os.path.exists(path):
        raise InputError(f"{path} not found: run '{again}' first")
    ckpt = load_checkpoint(path)
    if (ckpt.get("stage"), ckpt.get("kind")) != (stage, kind):
        raise InputError(f"{path} holds a stage {ckpt.get('stage')} {ckpt.get('kind')} model, "
                         f"not the stage {stage} {kind} model this needs: rerun '{again}'")
    if ckpt.get("hf") != run.hf:
        raise InputError(f"{path} was distilled from {ckpt.get('hf') or 'our own teacher'}, not "
                         f"{run.hf or 'our own teacher'}: give its --teacher-hf, or another "
                         "--out-dir")
    if run.args.preset and ckpt.get("preset") != run.args.preset:
        raise InputError(f"{path} is from the {ckpt.get('preset')!r} preset, not --preset "
                         f"{run.args.preset}: drop --preset, or use another --out-dir")
    if not ckpt.get("done"):
        raise InputError(f"{path} is an unfinished stage {stage} (step {ckpt.get('step')}): "
                         f"run '{again} --resume'")
    return ckpt


def load_teacher(run, trains_teacher):
    """The model size and tokenizer, from the finished teacher checkpoint, whose model is
    returned frozen; or, for a teacher still to train, the preset (the tokenizer comes with
    the data). Either way before the data loads, so that a wrong flag fails at once."""
    path, run.hf = run.path(0, "teacher"), None
    if run.args.teacher_hf:           # the real teacher, frozen, and its folder's chat format
        teacher, run.tok = hf.load_teacher(run.args.teacher_hf)
        run.preset, run.cfg, run.hf = run.args.preset or "paper", teacher.cfg, run.tok.folder
        return run.to_device(teacher)
    if trains_teacher:
        run.preset = run.args.preset or "tiny"
        run.cfg, run.tok = replace(PRESETS[run.preset], scan_backend=run.args.scan), None
        if run.args.resume and os.path.exists(path):        # a teacher resumed: its tokenizer
            run.tok = tokenizer_from_checkpoint(load_checkpoint(path), path)
        return None
    ckpt = load_finished(run, 0, "teacher")
    run.preset, run.tok = ckpt.get("preset"), tokenizer_from_checkpoint(ckpt, path)
    teacher = run.to_device(model_from_checkpoint(ckpt)).eval().requires_grad_(False)
    run.cfg = teacher.cfg
    return teacher


def load_data(run):
    """The training conversations, the held-out evaluation set, and a tokenizer if there is
    none yet (trained once, by process 0, and given to the others)."""
    args = run.args
    if args.data:
        run.train, test = data.llava_splits(args.data, args.image_root)
        for path in sorted({ex["path"] for ex in run.train + test}):
            # every image decodes now, or the run stops now: not at the step that draws it,
            # and again at that step after every --resume
            try:
                data.load_image(path, run.cfg.img_size)
            except InputError as e:
                raise InputError(f"{e}; remove its records from {args.data}") from None
    else:
        run.train = data.shapes_split("train", N_TRAIN_IMAGES)
        test = data.shapes_split("test", args.eval_samples)
    run.evalset = qa, captions, blind = evaluate.held_out(run.train, test, args.eval_samples)
    if run.tok is None:
        tok = data.train_tokenizer(run.train[:50000], run.cfg.vocab_size) if run.rank == 0 else None
        run.tok = Tokenizer.from_str(run.from_rank0(tok and tok.to_str()))
    run.chat = data.CachedChat(run.tok)         # batches and evaluations repeat texts, images
    run.print(f"data: {len(run.train)} training conversations, {len(qa)} held-out questions, "
              f"{len(captions)} captions; blind (text-only) baseline QA accuracy {blind:.3f}")


def seeded(run, teacher):
    """The linear student carved out of the teacher (seed.py; Sec. 4.1, docs/method.md §4)."""
    torch.manual_seed(run.args.seed)                    # the same student whatever ran before
    return seed_student(teacher, "M" * teacher.cfg.n_layer, run.args.init)


def load_student(run, stage):
    return run.to_device(model_from_checkpoint(load_finished(run, stage, "linear")))


def hybrid_of(args, n_layer):
    """The hybrid's layout (Sec. 4.5; docs/method.md §6): --attn-layers, or every K-th layer
    kept as attention (--attn-every K, default 4: the paper's 8 of 32). It must keep a layer
    and replace a layer: all attention is the teacher, all Mamba-2 the linear student."""
    every = 4 if args.attn_every is None and args.attn_layers is None else args.attn_every
    layout = hybrid_layout(n_layer, every, args.attn_layers)
    if "A" not in layout or "M" not in layout:
        raise InputError(f"a hybrid of layout {layout} is the "
                         f"{'linear student' if 'A' not in layout else 'teacher'}: keep at "
                         "least one attention layer and replace at least one")
    return layout


def stage3_students(args, n_layer):
    """kind -> layout of the students stage 3 trains: the linear one (unless --stage 3 asks
    for a hybrid only), and the hybrid when --attn-* asks for it or in a full run."""
    asked = args.attn_every is not None or args.attn_layers is not None
    students = {} if asked and args.stage == "3" else {"linear": "M" * n_layer}
    if asked or args.stage == "all":
        students["hybrid"] = hybrid_of(args, n_layer)
    return students


def check_plan(run, writes):
    """Before any training: every stage's batch splits over the processes, and no checkpoint
    this run would write is there already (--resume keeps it; nothing is silently overwritten)."""
    for stage, kind in writes:
        batch, path = settings(run, stage)[1], run.path(stage, kind)
        if batch % run.world:
            raise InputError(f"stage {stage}'s batch of {batch} does not split over {run.world} "
                             f"processes: give --batch-size a multiple of {run.world}")
        if os.path.exists(path) and not run.args.resume:
            raise InputError(f"{path} exists: add --resume to keep it (a finished stage is not "
                             "trained again), or delete it to train it anew")


# -----------------------------------------------------------------------------
# the stages, in order


def main(argv=None):
    args = check_args(make_parser().parse_args(argv))
    # "all": stages 0-3, or 1-3 from a folder's teacher (trained already)
    todo = list(range(1 if args.teacher_hf else 0, 4)) if args.stage == "all" else [int(args.stage)]
    t0 = time.time()
    torch.manual_seed(args.seed)
    with open_run(args) as run:
        teacher = load_teacher(run, trains_teacher=0 in todo)
        stage3 = stage3_students(args, run.cfg.n_layer) if 3 in todo else {}
        check_plan(run, [(s, "teacher" if s == 0 else "linear") for s in todo if s < 3]
                   + [(3, kind) for kind in stage3])
        load_data(run)
        if teacher is None:                                             # stage 0
            teacher, secs = train_stage(run, 0, "teacher", run.to_device(Model(run.cfg)))
            evaluate.report(run, 0, "teacher", teacher, secs)
            teacher.requires_grad_(False)
        evaluate.report_teacher(run, teacher)           # once per out-dir: the row to compare with
        student = None
        for stage in (s for s in todo if s in (1, 2)):                  # stages 1-2, linear
            if student is None:
                student = seeded(run, teacher) if stage == 1 else load_student(run, 1)
            student, secs = train_stage(run, stage, "linear", student, teacher)
            evaluate.report(run, stage, "linear", student, secs)
        if stage3:                                                      # stage 3
            stage2 = student or load_student(run, 2)
            # the hybrid: the teacher's attention in its "A" layers, the stage-2 student's
            # Mamba-2 layers in the others; made before the linear student trains on
            students = {kind: stage2 if kind == "linear" else make_hybrid(stage2, teacher, layout)
                        for kind, layout in stage3.items()}
            for kind, model in students.items():
                model, secs = train_stage(run, 3, kind, model, teacher)
                evaluate.report(run, 3, kind, model, secs)
    run.print(f"done in {time.time() - t0:.0f} s; results in {args.out_dir}/results.json")


if __name__ == "__main__":
    run_cli(main)
