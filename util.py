"""
The plumbing the scripts share, kept out of the lesson files: one-line errors for bad input,
the argument parser and its checked types, device choice, checkpoints as plain dicts that
load without running code, images from any file, and the checks on LLaVA JSON that run
before training. docs/robustness.md says what each check covers and why.
"""
import argparse
import json
import math
import os
import pickle
import re
import sys
import warnings
from dataclasses import asdict, fields

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class InputError(ValueError):
    """A problem with what the user gave us; command lines print it as one line (run_cli)."""


# -----------------------------------------------------------------------------
# checkpoints: plain dicts {"config", "model", "kind", "stage", "step", "tokenizer", ...} of
# tensors, numbers, strings, lists and dicts only (the tokenizer as its JSON string, random
# states as tensors), so torch.load(weights_only=True) reads them and nothing else


def save_checkpoint(path, ckpt):
    """Write atomically: a temporary file beside the target, flushed and fsynced, then
    renamed over it. An interrupted save leaves the previous checkpoint intact, and its
    partial temporary file is removed by the next save (or on a failed one: a full disk)."""
    path = str(path)
    tmp = f"{path}.tmp"
    try:
        remove_stale_temporaries(path)
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:                           # a full disk, or no folder to write in
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise InputError(f"could not write {path} ({e.strerror or e}): free some disk space or "
                         "choose another folder; the previous checkpoint is kept") from None


def remove_stale_temporaries(path):
    """Delete what a killed save of `path` left behind (`path.tmp`, or `path.tmp<pid>` from
    older versions): a dead process cannot clean up after itself."""
    folder, name = os.path.split(path)
    for f in os.listdir(folder or "."):
        if f.startswith(name + ".tmp"):
            os.remove(os.path.join(folder, f))


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by distill.py or seed.py, checked: a plain dict whose config
    builds a model that its weights fit. Unpickling is restricted to tensors and plain
    values (weights_only=True), so a file crafted to run code when loaded is refused unread."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"no checkpoint at {path}: train one with 'python distill.py' or pass "
                         "--ckpt")
    try:
        with warnings.catch_warnings():     # torch warns about foreign pickles: one line only
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise InputError(f"{path} holds a pickled Python object ({found[1]}) that could run "
                             "code when loaded, so it was not loaded: use a checkpoint written by "
                             "distill.py or seed.py, from a source you trust") from None
        raise InputError(f"{path} is not a readable mmmamba checkpoint (a pickle or file that is "
                         "not a PyTorch checkpoint): pass one written by distill.py") from None
    except Exception as e:  # a truncated or foreign file: say so instead of unpickling noise
        raise InputError(f"{path} is not a readable mmmamba checkpoint ({type(e).__name__}): "
                         "delete it and run the stage that writes it again") from None
    parts = {"config": dict, "model": dict, "tokenizer": str}
    wrong = [f"'{k}' should be a {kind.__name__}, not {type(ckpt[k]).__name__}"
             for k, kind in parts.items()
             if isinstance(ckpt, dict) and k in ckpt and not isinstance(ckpt[k], kind)]
    missing = [k for k in ("config", "model") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or wrong:
        what = f"no {'/'.join(missing)}" if missing else ", ".join(wrong)
        raise InputError(f"{path} is not an mmmamba checkpoint ({what}): pass one written by "
                         "distill.py or seed.py")
    # checks config and weights by building the model: on the CPU when it is small (a meta-device
    # model costs ~2.5 s in every process, the random inits loading torch's compiler), on the
    # meta device, allocating nothing, when it is large; the caller's random state is kept
    size = sum(t.numel() * t.element_size() for t in ckpt["model"].values() if torch.is_tensor(t))
    with torch.random.fork_rng(devices=[]):
        model_from_checkpoint(ckpt, path, device="cpu" if size < 2 ** 28 else "meta")
    return ckpt


def model_from_checkpoint(ckpt, where="the checkpoint", device=None):
    """The Model a checkpoint describes, its weights loaded; one line if they do not fit."""
    from mmmamba import Config, Model                  # here: mmmamba imports this file
    kinds = {int: (int,), float: (int, float), str: (str,)}
    known = {f.name: kinds.get(type(f.default), object) for f in fields(Config)}
    cfg = {k: v for k, v in ckpt["config"].items() if k in known}
    bad = [k for k, v in cfg.items() if not isinstance(v, known[k]) or isinstance(v, bool)]
    weights = ckpt["model"]
    if bad or not all(isinstance(k, str) and torch.is_tensor(w) for k, w in weights.items()):
        what = f"config values {bad} of the wrong type" if bad else "weights that are not tensors"
        raise InputError(f"{where} is damaged ({what}): write it again with distill.py or seed.py")
    layers = {k.split(".")[1] for k in weights if k.startswith("layers.")}
    n_layer = cfg.get("n_layer", Config.n_layer)
    try:
        if n_layer != len(layers):                     # before building a model of that size
            raise InputError(f"n_layer {n_layer}, but weights for {len(layers)} layers")
        with torch.device(device or "cpu"):
            model = Model(Config(**cfg))
    except (InputError, ValueError, RuntimeError, TypeError, ZeroDivisionError) as e:
        raise InputError(f"{where}: its config does not make a model that fits its weights ({e}); "
                         "write it again with distill.py or seed.py") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
    if diff:
        k = diff[0]
        raise InputError(f"{where}: its config does not match its weights ({k}: "
                         f"{got.get(k, 'missing')} in the file, {want.get(k, 'none')} for the "
                         f"config; {len(diff)} such): it was written by another version of this "
                         "code, or edited; write it again with distill.py or seed.py")
    if device != "meta":                               # a check only: nothing to copy
        model.load_state_dict(weights)
    return model


def tokenizer_from_checkpoint(ckpt, where="the checkpoint"):
    """The checkpoint's tokenizer (its JSON string), checked against the model's special ids."""
    from tokenizers import Tokenizer
    from mmmamba import SPECIAL_TOKENS, Config
    if "tokenizer" not in ckpt:
        raise InputError(f"{where} holds no tokenizer: use a checkpoint written by distill.py")
    try:
        tok = Tokenizer.from_str(ckpt["tokenizer"])
    except Exception as e:  # the Rust parser raises a bare Exception
        raise InputError(f"{where} holds a damaged tokenizer ({str(e)[:60]}): use a checkpoint "
                         "written by distill.py") from None
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    vocab_size = ckpt["config"].get("vocab_size", Config.vocab_size)
    if ids != list(range(len(ids))) or tok.get_vocab_size() > vocab_size:
        raise InputError(f"{where}: its tokenizer does not fit its model (special ids {ids}, "
                         f"{tok.get_vocab_size()} tokens): use a checkpoint written by distill.py")
    return tok


def checkpoint_of(model, **extra):
    """The plain dict saved for a model (the state of the unwrapped module, as in nanoGPT)."""
    return {"config": asdict(model.cfg), "model": model.state_dict(), **extra}


# -----------------------------------------------------------------------------
# images: the first frame of any file Pillow reads, upright, in RGB; or one line saying why not


def read_image(path, header_only=False):
    """A loaded RGB PIL image; EXIF orientation applied, as photo viewers show it. With
    header_only, only opens the file (cheap: checks that it is an image, decodes nothing)."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory: pass an image file")
    if not os.path.isfile(path):
        raise InputError(f"no image at {path}: check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # Pillow warns of damaged EXIF data: it skips it
            # Pillow only warns about images of over ~89M pixels: a decompression bomb, refuse it
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if header_only:
                    return None
                img.seek(0)                                     # first frame of an animation
                return to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputError(f"{path} is too large to decode safely ({e.args[0].split('.')[0]}): "
                         "resize it below 89 megapixels first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{path} is not an image Pillow can read ({type(e).__name__}: "
                         "missing, truncated or not an image file)") from None


def to_rgb(img):
    """Any Pillow mode -> RGB. 16/32-bit and float images are stretched to 0..255;
    transparency is composited onto white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
        img = Image.fromarray(a.astype(np.uint8))
    if img.mode == "P" or img.mode.endswith("A"):                      # P may carry transparency
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


# -----------------------------------------------------------------------------
# LLaVA JSON: every record checked before training starts, so a bad one fails in seconds


def read_llava(path, image_root):
    """The records of a LLaVA conversation file, each checked: a dict with an 'image' path
    (a string; the file must open as an image) and 'conversations', a list of
    {"from": "human"|"gpt", "value": str} turns alternating human, gpt. A bad record stops
    here with one line naming it and counting the others like it."""
    if not os.path.isfile(path):
        raise InputError(f"no data file at {path}: pass a LLaVA-style JSON list with --data")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:80]
        raise InputError(f"{path} is not valid JSON ({why}): give a LLaVA-style list of "
                         "records") from None
    if not isinstance(records, list):
        raise InputError(f"{path} holds a {type(records).__name__}: give a list of LLaVA records")
    problems, opened = [], {}
    for r, rec in enumerate(records):
        problem = llava_record_problem(rec)
        if problem is None:
            image = os.path.join(image_root, rec["image"])
            if image not in opened:                    # each file once, however many records
                try:
                    opened[image] = read_image(image, header_only=True)  # None: it opens
                except InputError as e:
                    opened[image] = f"{e} (paths are relative to --image-root {image_root})"
            problem = opened[image]
        if problem:
            problems.append(f"record {r}: {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more bad records)" if len(problems) > 1 else ""
        raise InputError(f"{path} {problems[0]}{more}")
    return records


def llava_record_problem(rec):
    """What is wrong with one LLaVA record, or None."""
    if not isinstance(rec, dict) or "image" not in rec or "conversations" not in rec:
        return "needs 'image' and 'conversations' keys (LLaVA format)"
    if not isinstance(rec["image"], str):
        return f"'image' must be a path (text), not {rec['image']!r}"
    turns = rec["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return "'conversations' must be a list of turns, each {\"from\": ..., \"value\": ...}"
    if not all(isinstance(t.get("value"), str) for t in turns):
        return "every turn needs a 'value' that is text"
    if len(turns) % 2 or [t.get("from") for t in turns] != ["human", "gpt"] * (len(turns) // 2):
        return "turns must alternate 'from': human, gpt, ending with gpt"
    return None


# -----------------------------------------------------------------------------
# command lines


def get_device(name=None):
    """torch.device(name), or the GPU if there is one when name is None; an InputError if
    this machine has no such device, or it is one that cannot compute (meta)."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        if device.type == "meta":
            raise RuntimeError("meta tensors have no data")
        torch.empty(1, device=device)
        return device
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"--device {name}: not available here ({str(e).splitlines()[0][:80]}); "
                         "use --device cpu or leave --device out") from None


def number(kind, low, high=math.inf):
    """An argparse type: a finite `kind` (int or float) from low to high, else one line."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(x) and low <= x <= high):
            upto = "" if high == math.inf else f" to {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a "
                                             f"{'whole ' * (kind is int)}number from {low}{upto}")
        return x
    return parse


def user_text(s):
    """An argparse type: text that is not empty and is valid UTF-8 (the shell passes any bytes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text: type it again") from None
    if not s.strip():
        raise argparse.ArgumentTypeError("is empty")
    return s


def folder(s):
    """An argparse type: a path that is a folder or can become one (not a regular file)."""
    if os.path.exists(s) and not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s} is a file, not a folder: choose another path")
    return s


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad flags reported in one line (exit code 2), like every other input error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """Run a command line's main(): bad input is one line on stderr and exit code 2, Ctrl-C
    one line and 130. torchrun prints a 30-line traceback of its own for any process that
    exits non-zero, so under torchrun an input error is printed by process 0 alone and every
    process exits 0 (torchrun's exit code is then 0 too). Under torchrun a process leaves by
    os._exit once main is done (its checkpoints saved, the process group destroyed): in the
    interpreter's teardown gloo's threads can still be freeing the group's objects, and now
    and then that aborts the process (SIGABRT), which torchrun reports as a failed run."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    code = 0
    try:
        main()
    except InputError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2 if world == 1 else 0
    except KeyboardInterrupt as e:         # session.Stopped says where the run was kept
        if rank == 0:
            print(str(e) or "interrupted", file=sys.stderr)
        code = 130
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
