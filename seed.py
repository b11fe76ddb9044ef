"""
Seeding: carve a Mamba-2 student out of a trained transformer teacher (arXiv 2502.13145
Sec. 4.1; docs/method.md §4), and build the stage-3 hybrid (Sec. 4.5; docs/method.md §6).

Every student parameter is either copied from the teacher or initialised on purpose, and
seed_student checks that this is so. Inside a replaced layer the copy table is

    teacher attention     student Mamba-2      SSM letter
    W_Q   q_proj     ->   c_proj               C  (read-out)
    W_K   k_proj     ->   b_proj               B  (input to state)
    W_V   v_proj     ->   x_proj               x  (the input)
    W_O   o_proj     ->   o_proj               out (shared, stays frozen)

and the new parameters get the "mimic" initialisation, chosen so that the fresh layer is
non-decaying linear attention over silu(q), silu(k), silu(v); without mimic they get the
released code's initialisation:

                 mimic                                   released code (inherit, scratch)
    conv1d       identity (1 on the current token,       PyTorch's default for a Conv1d
                 0 on the previous, bias 0)
    dt_proj      zeros: dt is data-independent at first PyTorch's default for a Linear
    dt_bias      softplus^-1(dt0), dt0 log-uniform in    zeros
                 [1e-3, 1e-1] per head
    A_log        1.0: A = -e, exp(dt A) close to 1       log U(1, 16)
    g_proj       Xavier-uniform with gain 2^-2.5         the same
    norm.weight  ones (one weight of head_dim)           the same

The paper's initialisation ablation (Table 4) is the --init option: mimic (default),
inherit (copy q/k/v/o, the released code's init for the rest), scratch (only W_O copied;
x, B, C projections at PyTorch's default, as the released code's fresh layers).

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
    if attn_every is not None and attn_every < 1:
        raise InputError(f"attention every {attn_every} layers is not possible: use 1 or more")
    keep = set(range(0, n_layer, attn_every)) if attn_every else set(attn_layers or ())
    bad = sorted(i for i in keep if not 0 <= i < n_layer)
    if bad:
        raise InputError(f"attention layer indices {bad} are out of range: the model has "
                         f"layers 0..{n_layer - 1}")
    return "".join("A" if i in keep else "M" for i in range(n_layer))


def parse_layers(text):
    """--attn-layers "0,4" -> [0, 4] (None stays None)."""
    if text is None:
        return None
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise InputError(f"--attn-layers {text!r}: use comma-separated integers (0,2)") from None


def in_mamba(name, layout):
    """Whether a state-dict name lies in a Mamba-2 mixer of the layout (layers.{i}.mixer.*)."""
    parts = name.split(".")
    return parts[0] == "layers" and parts[2] == "mixer" and layout[int(parts[1])] == "M"


@torch.no_grad()
def init_new(mixer, init):
    """Initialise a Mamba2 layer's parameters that attention does not have (the table above).
    The released code's conv1d, dt_bias and A_log are those Mamba2 is built with."""
    nn.init.xavier_uniform_(mixer.g_proj.weight, gain=2 ** -2.5)
    mixer.norm.weight.fill_(1.0)
    if init != "mimic":                                 # Model's blanket init gave W_dt std 0.02
        return mixer.dt_proj.reset_parameters()
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0                                 # the current-token tap
    mixer.conv1d.bias.zero_()
    mixer.dt_proj.weight.zero_()
    dt0 = torch.exp(torch.empty_like(mixer.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
    mixer.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))            # softplus^-1(dt0)
    mixer.A_log.fill_(1.0)


@torch.no_grad()
def seed_student(teacher, layout, init="mimic"):
    """A student with the given layout ("A" keeps the teacher's attention layer, "M" carves
    a Mamba-2 layer out of it), init one of INITS. Returns the student; the teacher is not
    changed."""
    assert init in INITS, f"init {init!r} is not one of {INITS}"      # the CLIs check it first
    if set(teacher.cfg.kinds) != {"A"}:
        raise InputError("seeding needs a teacher (all attention layers); this checkpoint is "
                         f"already a student with layout {teacher.cfg.layout!r}")
    p = next(teacher.parameters())
    student = Model(replace(teacher.cfg, layout=layout)).to(device=p.device, dtype=p.dtype)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    source = {n: n for n in s_sd if not in_mamba(n, layout)}        # student name -> teacher's
    for i in (i for i, kind in enumerate(layout) if kind == "M"):
        mixer, at = student.layers[i].mixer, f"layers.{i}.mixer."
        # every Mamba2 parameter is in the copy table or initialised by init_new
        assert set(mixer.state_dict()) == {f"{s}.weight" for s in COPY.values()} | set(NEW)
        copied = {"o_proj": "o_proj"} if init == "scratch" else COPY
        source.update({f"{at}{s}.weight": f"{at}{t}.weight" for t, s in copied.items()})
        if init == "scratch":                           # fresh layers, as in the released code
            for lin in (mixer.x_proj, mixer.b_proj, mixer.c_proj):
                lin.reset_parameters()
        init_new(mixer, init)
    for s_name, t_name in source.items():
        s_sd[s_name].copy_(t_sd[t_name])
    return student


@torch.no_grad()
def make_hybrid(student, teacher, layout):
    """A new Model of `layout` for stage 3: its "A" layers are the teacher's attention, its
    "M" layers the linear student's Mamba-2 mixers, and everything outside the mixers
    (embeddings, norms, MLPs, the head) is the teacher's, which stages 1-2 never change.
    Strict load: nothing is left out."""
    if set(student.cfg.kinds) != {"M"}:
        raise InputError(f"a hybrid is built from the linear student (all Mamba-2 layers), "
                         f"not from one with layout {student.cfg.kinds!r}")
    p = next(student.parameters())
    hybrid = Model(replace(teacher.cfg, layout=layout)).to(device=p.device, dtype=p.dtype)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    hybrid.load_state_dict({n: (s_sd if in_mamba(n, layout) else t_sd)[n]
                            for n in hybrid.state_dict()})
    return hybrid


def main():
    ap = ArgumentParser(description="Seed a Mamba-2 (or hybrid) student from a teacher.")
    ap.add_argument("--teacher", required=True, help="teacher checkpoint (distill.py stage 0)")
    ap.add_argument("--out", required=True, help="where to write the seeded student checkpoint")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--attn-every", type=int, help="keep layers 0, K, 2K, ... as attention")
    group.add_argument("--attn-layers", help="comma-separated layer indices to keep as attention")
    ap.add_argument("--init", default="mimic", choices=INITS, help="init of the new parameters")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the new parameters")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    ckpt = load_checkpoint(args.teacher)
    teacher = model_from_checkpoint(ckpt)
    layout = hybrid_layout(teacher.cfg.n_layer, args.attn_every, parse_layers(args.attn_layers))
    student = seed_student(teacher, layout, args.init)
    # what this checkpoint is: of the teacher's fields only the tokenizer and the preset hold
    save_checkpoint(args.out, checkpoint_of(
        student, tokenizer=ckpt.get("tokenizer"), preset=ckpt.get("preset"), stage="seeded",
        kind="hybrid" if "A" in layout else "linear", init=args.init, seeded_from=args.teacher))
    print(f"seeded {layout.count('M')} Mamba-2 + {layout.count('A')} attention layers "
          f"({layout}, init {args.init}, not distilled yet) -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
