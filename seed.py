"""
Seeding: carve a Mamba-2 student out of a trained transformer teacher (PAPER.md section 3).

Every student parameter is either copied from the teacher or initialised on purpose, and
seed_student checks that this is so. Inside a replaced layer the copy table is

    teacher attention     student Mamba-2      SSM letter
    W_Q   q_proj     ->   c_proj               C  (read-out)
    W_K   k_proj     ->   b_proj               B  (input to state)
    W_V   v_proj     ->   x_proj               x  (the input)
    W_O   o_proj     ->   o_proj               out (shared, stays frozen)

and the new parameters get the "mimic" initialisation, chosen so that the fresh layer is
non-decaying linear attention over silu(q), silu(k), silu(v):

    conv1d       identity (weight 1 on the current token, 0 on the previous, bias 0)
    dt_proj      zeros, so dt is data-independent at first
    dt_bias      softplus^-1(dt0), dt0 log-uniform in [1e-3, 1e-1] per head
    A_log        1.0, so A = -e and exp(dt A) is close to 1
    g_proj       Xavier-uniform with gain 2^-2.5
    norm.weight  ones

The paper's initialisation ablation (Table 4) is the --init option: mimic (default),
inherit (copy q/k/v/o, Mamba-2's default init for the rest), scratch (only W_O copied).

    python seed.py --teacher out/stage0_teacher.pt --out out/seeded.pt [--attn-every 4]
"""
import math
from dataclasses import replace

import torch
import torch.nn as nn

from mmmamba import Model
from util import (ArgumentParser, InputError, checkpoint_of, load_checkpoint, model_from_checkpoint,
                  run_cli, save_checkpoint)

COPY = {"q_proj": "c_proj", "k_proj": "b_proj", "v_proj": "x_proj", "o_proj": "o_proj"}
NEW = ["conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_bias", "A_log", "g_proj.weight",
       "norm.weight"]
INITS = ("mimic", "inherit", "scratch")


def hybrid_layout(n_layer, attn_every=None, attn_layers=None):
    """Layer kinds for a student: all Mamba-2, or a hybrid that keeps some attention layers.
    attn_every=K keeps layers 0, K, 2K, ... (the paper's head-interleaved rule: 8 of 32 with
    K=4); attn_layers lists the kept indices explicitly. Returns e.g. "AMMMAMMM"."""
    if attn_every is not None and attn_layers is not None:
        raise InputError("give either attn_every or attn_layers, not both")
    keep = set()
    if attn_every is not None:
        if attn_every < 1:
            raise InputError(f"attention every {attn_every} layers is not possible: use 1 or more")
        keep = set(range(0, n_layer, attn_every))
    if attn_layers is not None:
        bad = [i for i in attn_layers if not 0 <= i < n_layer]
        if bad:
            raise InputError(f"attention layer indices {bad} are out of range: the model has "
                             f"layers 0..{n_layer - 1}")
        keep = set(attn_layers)
    return "".join("A" if i in keep else "M" for i in range(n_layer))


def parse_layers(text):
    """--attn-layers "0,4" -> [0, 4] (None stays None)."""
    if text is None:
        return None
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise InputError(f"--attn-layers {text!r}: give comma-separated integers, e.g. 0,2") from None


@torch.no_grad()
def mimic_init(mixer):
    """Set a Mamba2 layer's new parameters so that it starts as linear attention."""
    K = mixer.conv1d.weight.shape[-1]
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, K - 1] = 1.0                              # the current-token tap
    mixer.conv1d.bias.zero_()
    mixer.dt_proj.weight.zero_()
    H = mixer.dt_bias.numel()
    dt0 = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
    mixer.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))            # softplus^-1(dt0)
    mixer.A_log.fill_(1.0)
    nn.init.xavier_uniform_(mixer.g_proj.weight, gain=2 ** -2.5)
    mixer.norm.weight.fill_(1.0)


@torch.no_grad()
def seed_student(teacher, layout, init="mimic"):
    """A student with the given layout ("A" keeps the teacher's attention layer, "M" carves
    a Mamba-2 layer out of it). Returns the student model; the teacher is not changed."""
    if init not in INITS:
        raise InputError(f"unknown --init {init!r}: use one of {', '.join(INITS)}")
    if set(teacher.cfg.kinds) != {"A"}:
        raise InputError("seeding needs a teacher (all attention layers); this checkpoint is "
                         f"already a student with layout {teacher.cfg.layout!r}")
    p = next(teacher.parameters())
    student = Model(replace(teacher.cfg, layout=layout)).to(device=p.device, dtype=p.dtype)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    mamba_layers = {i for i, kind in enumerate(layout) if kind == "M"}
    copied, initialised = set(), set()
    for name in s_sd:
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) in mamba_layers and parts[2] == "mixer":
            continue                                                    # done below, by the table
        if name not in t_sd or t_sd[name].shape != s_sd[name].shape:
            raise InputError(f"student parameter {name} has no match in the teacher")
        s_sd[name].copy_(t_sd[name])
        copied.add(name)
    for i in sorted(mamba_layers):
        mixer = student.layers[i].mixer
        for t_name, s_name in COPY.items():
            src, dst = f"layers.{i}.mixer.{t_name}.weight", f"layers.{i}.mixer.{s_name}.weight"
            if init == "scratch" and t_name != "o_proj":
                initialised.add(dst)                                    # keeps its random init
                continue
            if t_sd[src].shape != s_sd[dst].shape:
                raise InputError(f"cannot copy {src} {tuple(t_sd[src].shape)} into {dst} "
                                 f"{tuple(s_sd[dst].shape)}")
            s_sd[dst].copy_(t_sd[src])
            copied.add(dst)
        if init == "mimic":
            mimic_init(mixer)
        initialised.update(f"layers.{i}.mixer.{n}" for n in NEW)       # mimic, or Mamba-2's default
    missing = set(s_sd) - copied - initialised
    assert not missing, f"student parameters neither copied nor initialised: {sorted(missing)}"
    return student


@torch.no_grad()
def make_hybrid(student, teacher, layout):
    """A new Model of `layout` for stage 3 (arXiv 2502.13145 Sec. 3.4; docs/method.md §6):
    its "A" layers are the teacher's attention, its "M" layers the linear student's Mamba-2
    mixers, and everything outside the mixers (embeddings, norms, MLPs, the head) is the
    teacher's, which stages 1-2 never change. Strict load: nothing is left out."""
    if set(student.cfg.kinds) != {"M"}:
        raise InputError("a hybrid is built from the linear student (all Mamba-2 layers); "
                         f"this one has layout {student.cfg.kinds!r}")
    if len(layout) != teacher.cfg.n_layer or set(layout) - {"A", "M"}:
        raise InputError(f"layout {layout!r} must have {teacher.cfg.n_layer} letters, each A or M")
    p = next(student.parameters())
    hybrid = Model(replace(teacher.cfg, layout=layout)).to(device=p.device, dtype=p.dtype)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    sd = {}
    for name in hybrid.state_dict():
        parts = name.split(".")
        is_mamba = parts[0] == "layers" and parts[2] == "mixer" and layout[int(parts[1])] == "M"
        sd[name] = (s_sd if is_mamba else t_sd)[name]
    hybrid.load_state_dict(sd)                                          # strict
    return hybrid


def main():
    ap = ArgumentParser(description="Seed a Mamba-2 (or hybrid) student from a teacher.")
    ap.add_argument("--teacher", required=True, help="teacher checkpoint (distill.py stage 0)")
    ap.add_argument("--out", required=True, help="where to write the seeded student checkpoint")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--attn-every", type=int, help="keep every K-th layer as attention, from the first")
    group.add_argument("--attn-layers", help="comma-separated layer indices to keep as attention")
    ap.add_argument("--init", default="mimic", choices=INITS, help="initialisation of the new parameters")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the new parameters")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(args.teacher)
    teacher = model_from_checkpoint(ckpt)
    layout = hybrid_layout(teacher.cfg.n_layer, args.attn_every, parse_layers(args.attn_layers))
    student = seed_student(teacher, layout, args.init)
    extra = {k: v for k, v in ckpt.items() if k not in ("config", "model", "optimizer", "step")}
    save_checkpoint(args.out, checkpoint_of(student, **extra, init=args.init, seeded_from=args.teacher))
    print(f"seeded {layout.count('M')} Mamba-2 + {layout.count('A')} attention layers "
          f"({layout}, init {args.init}) -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
