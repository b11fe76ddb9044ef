"""
The plumbing of a distill.py run, kept out of the recipe: the device, the torchrun process
group, one run per out-dir (a lock), and Ctrl-C between steps (util.run_cli keeps errors to
one line, under torchrun too). docs/training.md says how each behaves.

    with open_run(args) as run:     # run.device, run.autocast, run.rank, run.world, run.path(...)
        ...
"""
import fcntl
import os
import signal
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

import util
from evaluate import autocast
from util import InputError, get_device


class Run:
    """What the stages of one run share. distill.py adds the preset, the model config, the
    tokenizer, the data and the evaluation set."""

    def __init__(self, args):
        self.args, self.lock = args, None
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def path(self, stage, kind):
        return os.path.join(self.args.out_dir, f"stage{stage}_{kind}.pt")

    def print(self, *a):
        if self.rank == 0:
            print(*a)

    def all_sum(self, t):
        """The sum of `t` over the processes (in place), or `t` itself in a single process."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def from_rank0(self, obj):
        """Process 0's `obj` on every process."""
        box = [obj]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def save(self, path, ckpt):
        """Process 0 writes (atomically: util.save_checkpoint, looked up at each call so that
        a test can stand in for it); the others wait for it."""
        if self.rank == 0:
            util.save_checkpoint(path, ckpt)
        if self.world > 1:
            dist.barrier()

    def to_device(self, model):
        model.cfg.scan_backend = self.args.scan                 # every layer shares this cfg
        return model.to(self.device)


@contextmanager
def open_run(args):
    """A Run on its device (--device, or cuda if there is one, else cpu), in the torchrun
    process group when there is one (gloo on CPUs, NCCL on GPUs), holding the out-dir's lock.
    On the way out, however it ends, the lock and the process group are released."""
    run = Run(args)
    try:
        name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        why = ("--device" if args.device else
               "a GPU is available" if name == "cuda" else "no GPU found")
        device = get_device(name)
        if args.scan == "triton" and device.type != "cuda":
            raise InputError(f"--scan triton needs a CUDA GPU and this run is on {device}: "
                             "use --scan auto or --scan torch")
        if run.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            why += f", rank {run.rank} of {run.world} (torchrun)"
        if device.type == "cpu" and run.world > 1:      # torchrun sets 1 thread per process
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.world))
        run.device, run.autocast = device, autocast(device)
        run.print(f"device {device} ({why}), "
                  f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, "
                  f"{torch.get_num_threads()} threads")
        error = run.from_rank0(lock_out_dir(run) if run.rank == 0 else None)
        if error:                                               # every process stops alike
            raise InputError(error)
        yield run
    finally:
        if run.lock:
            run.lock.close()                                    # closing the file unlocks it
        if dist.is_initialized():
            dist.destroy_process_group()


def lock_out_dir(run):
    """One run per out-dir: an exclusive lock on OUT/.lock, held until the run ends (the
    kernel drops it however the process ends, SIGKILL included). Returns an error line or None."""
    out = run.args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out-dir {out} is a file: give a folder (it is made if missing)"
    os.makedirs(out, exist_ok=True)
    run.lock = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(run.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        run.lock.seek(0)
        holder = run.lock.read().strip() or "another process"
        run.lock.close()
        run.lock = None
        return (f"{out} is in use by another distill.py run ({holder}): wait for it to end, "
                "or give another --out-dir")
    run.lock.truncate(0)
    run.lock.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    run.lock.flush()
    return None


class Stopped(KeyboardInterrupt):
    """Ctrl-C, honoured at the end of a training step, once that step's checkpoint is written."""


class CtrlC:
    """While training, Ctrl-C (SIGINT) asks for a stop after the current step, so that the
    checkpoint then written holds whole steps, never half an optimizer update. A second
    Ctrl-C interrupts at once (the last checkpoint written is kept)."""

    def __enter__(self):
        self.asked, self.previous = False, signal.signal(signal.SIGINT, self.ask)
        return self

    def ask(self, signum, frame):
        self.asked = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)



def length_groups(batch):
    """A make_batch (tokens, targets, images) batch as one or two batches: the rows up to a
    length s and the rest, each cut to its own longest row (a row ends with its answer, its
    last scored position; make_batch pads after it), s chosen for the fewest positions. The
    rows and their tokens are the batch's, so the groups' (sum, count) losses add up to the
    batch's, gradient included: a short question no longer pads to a caption's length (on the
    CPU a tiny-preset teacher step ~20% faster, docs/cpu_study/step_groups.py)."""
    tokens, targets, images = batch
    at = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    n = torch.where(targets != -1, at, 0).amax(1)                        # each row's length
    cost = lambda s: int((n <= s).sum()) * s + int((n > s).sum()) * int(n.max())  # noqa: E731
    s = min(sorted(set(n.tolist())), key=cost)
    groups = []
    for rows in (n <= s, n > s):
        if rows.any():
            m = int(n[rows].max())
            groups.append((tokens[rows, :m], targets[rows, :m], images[rows]))
    return groups
