"""
The fast path of distill.py's training loop on one CUDA GPU (distill.train_stage hands each
stage to train_stage here), and the fast pieces of a training step at the paper preset
(bench.py train --ways fast,compiled). The same function as distill.train_stage: the
same batches in the same order, the same losses, the same checkpoints, resume and Ctrl-C;
tests/test_train_fast.py checks it against the plain loop. What changes, and why:

  batches      each batch is right-padded to a multiple of PAD_TO tokens, so only a few
               shapes ever occur (padding is causal-invisible and unscored); as in the plain
               loop, every distinct text is encoded and every scene drawn once (data.CachedChat)
  no host sync the losses are masked sums (boolean indexing waits for the GPU), the image
               tokens are gathered without counting them on the host, and the loss values come
               back every CHECK_EVERY steps (the non-finite check runs then, and before every
               save, so no checkpoint holds a bad step)
  CUDA graph   forward, backward, gradient clipping and AdamW (capturable, lr a device tensor)
               are captured once per padded length and replayed: a small-preset step is a few
               thousand kernel launches of a few microseconds each
  KL           stage 3's KL is summed over row chunks with its gradient formed in the forward
               (softmax(s) - softmax(t)), so no fp32 (tokens, vocabulary) tensor is kept for
               the backward: at the paper preset those are 6 GB each
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import distill
import mmmamba
from mmmamba import PAD_ID
from session import CtrlC, Stopped
from util import InputError, checkpoint_of

PAD_TO = 16             # batches padded to a multiple of this: one CUDA graph per length
CHECK_EVERY = 50        # steps between reading the losses back (and the non-finite check)
KL_ROWS = 2048          # rows of the (tokens, vocabulary) logits per KL chunk

# -----------------------------------------------------------------------------
# batches: data.make_batch from a data.CachedChat, padded to a few lengths


class Batches:
    """data.make_batch(examples, tok, cfg) for the examples of one run, from a data.CachedChat
    (tok's, or tok itself), right-padded further to a multiple of PAD_TO tokens (padding and -1
    targets, as make_batch pads), and moved to the device without waiting."""

    def __init__(self, tok, cfg, pad_to=PAD_TO):
        self.chat = tok if isinstance(tok, data.CachedChat) else data.CachedChat(tok)
        self.cfg, self.pad_to = cfg, pad_to

    def __call__(self, examples, device):
        tokens, targets, images = data.make_batch(examples, self.chat, self.cfg)
        T = tokens.shape[1]
        extra = min(-(-T // self.pad_to) * self.pad_to, self.cfg.max_seq_len) - T
        tokens = F.pad(tokens, (0, extra), value=PAD_ID)
        targets = F.pad(targets, (0, extra), value=-1)
        pin = device.type == "cuda"
        return tuple(t.pin_memory().to(device, non_blocking=True) if pin else t
                     for t in (tokens, targets, images))


# -----------------------------------------------------------------------------
# the model and the losses without host syncs


def graph_safe(model):
    """Model.embed counts the image slots on the host (a sync, refused while a CUDA graph
    records). Batches puts exactly one image's slots in every row, so the k-th slot takes
    image row k: gathered by a cumulative sum on the device, the same values as masked_scatter.
    An instance attribute; `del model.embed` restores the class's."""
    def embed(tokens, images=None):
        cfg = model.cfg
        x = model.tok_embeddings(tokens)
        if images is None:
            return x
        patches = model.vision(images.to(x.dtype)).reshape(-1, cfg.d_model).to(x.dtype)
        slots = tokens == cfg.img_token_id
        row = (slots.flatten().cumsum(0) - 1).clamp(min=0).view_as(tokens)
        return torch.where(slots[..., None], patches[row], x)
    model.embed = embed
    return model


class _KL(torch.autograd.Function):
    """sum over counted rows of KL(softmax(t) || softmax(s)), in fp32, chunk by chunk of rows;
    the gradient with respect to s, (softmax(s) - softmax(t)) on counted rows, is formed here
    and kept in s's dtype (what autograd would hand the bf16 head anyway)."""

    @staticmethod
    def forward(ctx, t, s, count, rows):
        ctx.shape = s.shape
        t, s = t.flatten(0, -2), s.flatten(0, -2)
        w, grad = count.flatten().to(torch.float32), torch.empty_like(s)
        total = s.new_zeros((), dtype=torch.float32)
        for i in range(0, s.shape[0], rows):
            t_logp = t[i:i + rows].float().log_softmax(-1)
            s_logp = s[i:i + rows].float().log_softmax(-1)
            t_p, wi = t_logp.exp(), w[i:i + rows, None]
            total = total + ((t_p * (t_logp - s_logp)).sum(-1) * w[i:i + rows]).sum()
            grad[i:i + rows] = ((s_logp.exp() - t_p) * wi).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, dtotal):
        (grad,) = ctx.saved_tensors
        return None, (grad * dtotal.to(grad.dtype)).view(ctx.shape), None, None


def kl_sum(t_logits, s_logits, count, rows=KL_ROWS):
    """distill.kl_teacher_student's sum from the two models' logits: (B, T, V) each, count a
    (B, T) bool mask. Differentiable in s_logits only."""
    return _KL.apply(t_logits.detach(), s_logits, count, rows).view(())


def stage_loss(stage, teacher, student, tokens, targets, images):
    """(sum, count) of distill.StageLoss(stage, student), without boolean indexing."""
    if stage == 0:          # distill.answer_ce scores x[mask]: a host sync no graph can record
        logits = student(tokens, images).flatten(0, 1).float()
        return (F.cross_entropy(logits, targets.flatten(), ignore_index=-1, reduction="sum"),
                (targets != -1).sum())
    if stage in (1, 2):
        with torch.no_grad():
            ios = teacher.layer_io(tokens, images)
        real = (tokens != PAD_ID)[..., None]
        errs = [SQ_ERR(layer.mixer.mix(u), y, real)
                for layer, (u, y) in zip(student.layers, ios) if layer.kind == "M"]
        return torch.stack(errs).sum() * 1000, real.sum() * len(errs) * ios[0][1].shape[-1]
    with torch.no_grad():
        t_logits = teacher(tokens, images)
    count = distill.kl_positions(tokens, student.cfg.img_token_id)
    return kl_sum(t_logits, student(tokens, images), count), count.sum()


def _sq_err(a, b, real):
    """The squared error of a layer's output over the real tokens, summed in fp32."""
    return torch.where(real, a.float() - b.float(), 0.0).square().sum()


SQ_ERR = _sq_err        # fuse_elementwise puts a compiled one here (one kernel instead of five)


def pad_head(model, multiple=64):
    """A frozen LM head whose vocabulary is not a multiple of `multiple` (HoVLE's 92553) gets
    its matmul on a zero-padded copy of the weight, sliced back to the vocabulary: with rows
    of an odd length cuBLAS falls back to kernels an eighth as fast (docs/benchmarks.md). The
    logits are the same numbers; the module's weight, and so every checkpoint, is unchanged.
    Returns whether it padded."""
    head, V = model.output, model.output.out_features
    if V % multiple == 0 or head.weight.requires_grad:
        return False
    w = head.weight.new_zeros(-(-V // multiple) * multiple, head.in_features)
    w[:V] = head.weight.detach()
    head.forward = lambda x: F.linear(x, w)[..., :V]       # dtypes as nn.Linear's own
    return True


def frozen_to_bf16(model):
    """Hold the frozen nn.Linear weights in bf16 and the trainable ones in fp32: under bf16
    autocast every matmul rounds its weight to bf16 at every call anyway, so the results are
    the same bits, without the fp32 copy in memory or the cast at every step. Norms and
    embeddings stay fp32 (the residual stream stays fp32). Returns how many weights were cast."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            want = torch.float32 if m.weight.requires_grad else torch.bfloat16
            n += m.weight.dtype != want
            m.weight.data = m.weight.data.to(want)
    return n


def _rms(x, weight, eps):
    xf = x.float() if x.element_size() < 4 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).type_as(x)


def _gated(y, gate, weight, eps):
    return _rms(y, weight, eps).flatten(2) * F.silu(gate)


def _swiglu(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _dwconv(x, weight, bias):
    """Mamba2's depthwise causal conv, F.conv1d(x, weight, bias, groups=C) for x (B, C, K-1+T),
    as K shifted multiply-adds: compiled, one kernel (PyTorch's depthwise kernel is generic).
    In x's dtype, as autocast's conv1d gives it (fp32 here would make everything after it fp32)."""
    K, T = weight.shape[-1], x.shape[-1] - weight.shape[-1] + 1
    y = sum(x[..., k:k + T] * weight[:, 0, k, None] for k in range(K)) + bias[:, None]
    # stored (B, T, C)-contiguous: Mamba2.mix transposes it back, and the SiLU and the split
    # into heads after it then read a dense tensor (strided, PyTorch falls back to slow kernels)
    return y.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)


def _heads(xBC, H, Hkv, hd):
    """Mamba2.heads with every output written dense: its views of [x, B, C] are strided, and
    the scan copies them dense anyway, as do their gradients' copies back."""
    x, Bm, Cm = xBC.unflatten(-1, (-1, hd)).split([Hkv, Hkv, H], dim=-2)
    r = H // Hkv
    return (x.repeat_interleave(r, -2).contiguous(), Bm.repeat_interleave(r, -2).contiguous(),
            Cm.contiguous())


def fuse_elementwise(models):
    """torch.compile the elementwise work around the matmuls (RMSNorm, the gated norm, SwiGLU,
    RoPE's rotation, the depthwise conv, the split into heads, stage 1-2's squared error): eager
    PyTorch runs each of their fp32 steps as its own pass over a (tokens, width) tensor. Instance
    attributes, mmmamba.rotate and SQ_ERR replaced; returns a function undoing it."""
    global SQ_ERR
    rms, gated, swiglu, conv, heads = (torch.compile(f)
                                       for f in (_rms, _gated, _swiglu, _dwconv, _heads))
    # RoPE: only the rotation compiled; mmmamba.rope keeps its angles. Compiled whole, the
    # angles were recomputed per element of q and k (a sine and a cosine each: 10 ms of a
    # paper-preset step)
    rotate, patched = mmmamba.rotate, []
    mmmamba.rotate, SQ_ERR = torch.compile(rotate), torch.compile(_sq_err)
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.Conv1d):
                m.forward = lambda x, m=m: conv(x, m.weight, m.bias)
            elif isinstance(m, mmmamba.Mamba2):
                m.heads = lambda xBC, c=m.cfg: heads(xBC, c.n_head, c.n_kv_head, c.head_dim)
                patched.append((m, "heads"))
                continue
            elif isinstance(m, mmmamba.GatedRMSNorm):
                m.forward = lambda y, g, m=m: gated(y, g, m.weight, m.eps)
            elif isinstance(m, mmmamba.RMSNorm):
                m.forward = lambda x, m=m: rms(x, m.weight, m.eps)
            elif isinstance(m, mmmamba.MLP):
                m.forward = lambda x, m=m: swiglu(x, m.w1.weight, m.w3.weight, m.w2.weight)
            else:
                continue
            patched.append((m, "forward"))

    def undo():
        global SQ_ERR
        mmmamba.rotate, SQ_ERR = rotate, _sq_err
        for m, name in patched:
            delattr(m, name)
    return undo


# -----------------------------------------------------------------------------
# one optimizer step, eager or replayed from a CUDA graph


class Step:
    """loss = step(tokens, targets, images, lr): forward, backward, clip at norm 1, AdamW.
    On CUDA each input shape gets a CUDA graph captured on its first use (after a warm-up
    whose updates are undone) and replayed from then on; the loss stays on the device."""

    def __init__(self, loss_fn, params, opt, autocast, graphs):
        self.loss_fn, self.params, self.opt, self.autocast = loss_fn, params, opt, autocast
        self.graphs, self.captured = graphs, {}

    def body(self, tokens, targets, images):
        with self.autocast:
            total, count = self.loss_fn(tokens, targets, images)
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return loss.detach()

    def __call__(self, tokens, targets, images, lr):
        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if not self.graphs:
            return self.body(tokens, targets, images)
        key = (tuple(tokens.shape), tuple(images.shape))
        if key not in self.captured:
            self.captured[key] = self.capture(tokens, targets, images)
        graph, static, loss = self.captured[key]
        for buf, t in zip(static, (tokens, targets, images)):
            buf.copy_(t, non_blocking=True)
        graph.replay()
        return loss.clone()

    def capture(self, tokens, targets, images):
        """Warm up on a side stream (Triton compiles, cuBLAS and AdamW state come into being),
        put parameters and optimizer state back as they were, then record one step."""
        static = [t.clone() for t in (tokens, targets, images)]
        keep = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() for k, v in self.opt.state[p].items()}
                 for p in self.params if p in self.opt.state}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.body(*static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, k in zip(self.params, keep):
                p.copy_(k)
            for p in self.params:
                for k, v in self.opt.state[p].items():
                    v.copy_(state[p][k] if p in state else torch.zeros_like(v))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.body(*static)
        return graph, static, loss


def make_optimizer(params, lr, device, capturable):
    """distill.train_stage's AdamW; capturable (steps counted on the device) with lr a device
    tensor when the step is replayed from a CUDA graph."""
    lr0 = torch.tensor(lr, device=device) if capturable else lr
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.05},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr0, betas=(0.9, 0.999), capturable=capturable)


def portable(opt):
    """The optimizer's state_dict as the plain loop writes it (lr a number, steps on the CPU,
    not capturable), so that either loop, on any device, can --resume from it."""
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["lr"], g["capturable"] = float(g["lr"]), False
    sd["state"] = {k: {**v, "step": v["step"].detach().float().cpu()}
                   for k, v in sd["state"].items()}
    return sd


def to_capturable(opt, device):
    """After a resume: lr back to a device tensor, steps onto the device, capturable on."""
    for g in opt.param_groups:
        g["lr"], g["capturable"] = torch.tensor(float(g["lr"]), device=device), True
    for s in opt.state.values():
        s["step"] = s["step"].to(device=device, dtype=torch.float32)


# -----------------------------------------------------------------------------
# the loop: distill.train_stage's contract


_plain_train_stage = distill.train_stage


def train_stage(run, stage, kind, model, teacher=None, graphs=None):
    """distill.train_stage(run, stage, kind, model, teacher), faster on one GPU. More than one
    process runs the plain loop (its all-reduces are per step). graphs: CUDA graphs, default on
    CUDA; False runs the same step eagerly (the CPU tests)."""
    if run.world > 1:
        return _plain_train_stage(run, stage, kind, model, teacher)
    graphs = run.device.type == "cuda" if graphs is None else graphs
    args, path = run.args, run.path(stage, kind)
    lr, batch, steps = distill.settings(run, stage)
    distill.freeze_for(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr, run.device, capturable=False)
    batches = torch.Generator().manual_seed(args.seed * 1000 + stage)
    start = distill.resume(run, path, stage, [lr, batch, steps], model, opt, batches)
    if start["done"]:
        run.print(f"{path}: finished already, kept (--resume)")
        return model.eval(), start["train_s"]
    if graphs:
        if not opt.state:                       # a fresh start: state made on the device
            opt = make_optimizer(params, lr, run.device, capturable=True)
        to_capturable(opt, run.device)
    losses, saved = start["losses"], start["step"]
    n_train, n_all = (sum(p.numel() for p in ps) / 1e6 for ps in (params, model.parameters()))
    run.print(f"stage {stage} {kind}: {distill.RECIPE[stage]['loss']}; {steps} steps, lr {lr:g}, "
              f"batch {batch}; {n_train:.2f}M of {n_all:.2f}M params train (fast loop: "
              f"{'CUDA graphs' if graphs else 'eager'})")
    make = Batches(run.chat, model.cfg)
    for m in {id(m): m for m in (model, teacher) if m is not None}.values():
        graph_safe(m)
        pad_head(m)
    step_fn = Step(lambda *b: stage_loss(stage, teacher, model, *b), params, opt, run.autocast,
                   graphs)
    pending, t0, train_s = [], time.time(), start["train_s"]

    def flush(upto):
        """Read the pending losses back; stop at the first that is not finite."""
        values = torch.stack(pending).tolist() if pending else []
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise InputError(f"stage {stage} {kind}: the loss is {v} at step "
                                 f"{upto - len(values) + i}; stopped. {path} keeps the last good "
                                 f"checkpoint (step {saved}): lower the learning rate or fix the "
                                 "data, then --resume")
            losses.append(round(v, 6))
        pending.clear()

    model.train()
    try:
        with CtrlC() as ctrl_c, tqdm(range(start["step"], steps), desc=f"stage {stage} {kind}",
                                     initial=start["step"], total=steps, mininterval=2) as bar:
            for step in bar:
                idx = torch.randint(len(run.train), (batch,), generator=batches).tolist()
                tokens, targets, images = make([run.train[i] for i in idx], run.device)
                pending.append(step_fn(tokens, targets, images, distill.wsd_lr(step, steps, lr)))
                done, stop = step + 1 == steps, ctrl_c.asked
                save = done or stop or (step + 1) % args.save_every == 0
                if save or len(pending) >= CHECK_EVERY:
                    flush(step + 1)
                if save:
                    train_s = start["train_s"] + time.time() - t0
                    run.save(path, checkpoint_of(
                        model, kind=kind, stage=stage, preset=run.preset, init=args.init,
                        data=args.data or "shapes world", done=done,  # as distill's
                        **({"hf": run.hf} if run.hf else {"tokenizer": run.tok.to_str()}),
                        step=step + 1, steps=steps, recipe=[lr, batch, steps],
                        losses=losses, train_s=train_s, optimizer=portable(opt),
                        rng={"batches": batches.get_state(), "torch": torch.get_rng_state()}))
                    saved = step + 1
                if stop and not done:
                    raise Stopped(f"stopped (Ctrl-C) after step {saved} of stage {stage} "
                                  f"{kind}, kept in {path}: continue with --resume")
    finally:
        for m in (model, teacher):
            if m is not None and "embed" in vars(m):
                del m.embed
            if m is not None and "forward" in vars(m.output):
                del m.output.forward
    return model.eval(), train_s


def main(argv=None):
    """distill.main with this loop in place of distill.train_stage on any device: the CPU
    tests run the loop eagerly through it (on one GPU distill.py calls it by itself)."""
    distill.train_stage = train_stage
    try:
        distill.main(argv)
    finally:
        distill.train_stage = _plain_train_stage
