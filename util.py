"""
The plumbing the scripts share, kept out of the model and method files: one-line errors for
bad input, the argument parser, device choice, and checkpoints as plain dicts.
"""
import argparse
import os
import sys
from dataclasses import asdict, fields

import torch


class InputError(ValueError):
    """A problem with what the user gave us; command lines print it as one line (run_cli)."""


# checkpoints: plain dicts {"config", "model", "kind", "stage", "step", "tokenizer", ...}


def save_checkpoint(path, ckpt):
    """Write atomically: a temporary file beside the target, flushed and fsynced, then
    renamed over it. An interrupted save leaves the previous checkpoint intact, and its
    partial temporary file is removed by the next save (or on a failed one: a full disk)."""
    path = str(path)
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise InputError(f"could not write {path} ({e.strerror or e}): free some disk space or "
                         "choose another --out-dir; the previous checkpoint is kept") from None


def remove_stale_temporaries(path):
    """Delete what a killed save of `path` left behind (`path.tmp`, or `path.tmp<pid>` from
    older versions): a dead process cannot clean up after itself."""
    folder, name = os.path.split(path)
    for f in os.listdir(folder or "."):
        if f.startswith(name + ".tmp"):
            os.remove(os.path.join(folder, f))


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise InputError(f"no checkpoint at {path}: train one with 'python distill.py' or pass --ckpt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say so instead of unpickling noise
        raise InputError(f"{path} is not a readable mmmamba checkpoint ({type(e).__name__}): "
                         "delete it and run the stage that writes it again") from None
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        raise InputError(f"{path} is not an mmmamba checkpoint (no config/model): pass one "
                         "written by distill.py or seed.py")
    return ckpt


def model_from_checkpoint(ckpt):
    from mmmamba import Config, Model                  # here: mmmamba imports this file
    known = {f.name for f in fields(Config)}
    model = Model(Config(**{k: v for k, v in ckpt["config"].items() if k in known}))
    model.load_state_dict(ckpt["model"])
    return model


def checkpoint_of(model, **extra):
    """The plain dict saved for a model (the state of the unwrapped module, as in nanoGPT)."""
    return {"config": asdict(model.cfg), "model": model.state_dict(), **extra}


def get_device(name):
    """torch.device(name), or an InputError if this machine has no such device."""
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
        return device
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"--device {name}: not available here ({str(e).splitlines()[0][:80]}); "
                         "use --device cpu or leave --device out") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad flags reported in one line (exit code 2), like every other input error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """Run a command line's main(): an InputError becomes one line on stderr and exit code 2."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
