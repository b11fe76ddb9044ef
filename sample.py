"""
Ask a trained model about an image, streaming the answer as it is decoded.

    python sample.py --image cat.jpg                              # the linear student describes it
    python sample.py --image cat.jpg --prompt "What color is the circle?" --model hybrid

Decoding is Model.generate: one prefill of the prompt (image included), then one cached step
per token. In a Mamba-2 layer that step updates a fixed-size state (arXiv 2502.13145 Sec. 3,
Eq. 2; docs/method.md §2), so a token costs the same however long the context; attention
layers (teacher, hybrid) read a KV cache that grows with it. The prompt is the user's text
only: special tokens typed into it stay text (data.encode_plain).
"""
import os
import sys

import torch

import data
import hf
from util import (ArgumentParser, InputError, folder, get_device, load_checkpoint,
                  model_from_checkpoint, number, run_cli, user_text)

CKPTS = {"teacher": "stage0_teacher.pt", "linear": "stage3_linear.pt", "hybrid": "stage3_hybrid.pt"}
SHAPES = "the built-in shapes world: it answers about shapes, colours, places, whatever the image"


def main(argv=None):
    ap = ArgumentParser(description="Answer a question about an image with a trained model.")
    ap.add_argument("--image", required=True, help="any image file Pillow reads (first frame)")
    ap.add_argument("--prompt", type=user_text, default=data.CAPTION, help="the question to ask")
    ap.add_argument("--model", default="linear", choices=list(CKPTS), help="which of --out-dir")
    ap.add_argument("--out-dir", type=folder, help="distill.py's checkpoints (default: out)")
    ap.add_argument("--ckpt", help="a checkpoint file (overrides --model and --out-dir)")
    ap.add_argument("--hf", help="a HoVLE or released mmMamba folder (docs/real_checkpoints.md)")
    ap.add_argument("--temperature", type=number(float, 0, 100), default=0.0,
                    help="0 is greedy; higher samples more freely")
    ap.add_argument("--top-k", type=number(int, 1), help="sample among the k most likely tokens")
    ap.add_argument("--max-new-tokens", type=number(int, 1), default=64, help="at most this many")
    ap.add_argument("--seed", type=number(int, 0, 2**64 - 1), default=0, help="for sampling")
    ap.add_argument("--device", help="cuda, cpu, ... (default: cuda if available, else cpu)")
    args = ap.parse_args(argv)
    device = get_device(args.device)

    if args.hf:             # the real teacher or a released student: their tokenizer and template
        path, ckpt = args.hf, {"data": "HoVLE's data"}
        model, chat = hf.sample_model(args.hf, device)
    else:
        path = args.ckpt or os.path.join(args.out_dir or "out", CKPTS[args.model])
        ckpt = load_checkpoint(path)
        chat = hf.checkpoint_chat(ckpt, path)        # ours, or its --teacher-hf folder's
        model = model_from_checkpoint(ckpt, path).to(device).eval()
    cfg = model.cfg
    image = chat.image({"path": args.image}, cfg.img_size)[None].to(device)       # (1, 3, S, S)
    tokens = torch.tensor([chat.prompt(args.prompt, cfg.n_img_tokens)], device=device)
    if tokens.shape[1] >= cfg.max_seq_len:
        raise InputError(f"the prompt is {tokens.shape[1]} tokens, longer than this model's "
                         f"{cfg.max_seq_len - 1}: ask a shorter question")
    n_mamba = cfg.kinds.count("M")
    source = ckpt.get("data", "shapes world")                # distill.py records its --data
    trained_on = SHAPES if source == "shapes world" else f"the conversations in {source}"
    print(f"trained on {trained_on}\n{ckpt.get('kind', 'model')} from {path}: {n_mamba} Mamba-2 + "
          f"{cfg.n_layer - n_mamba} attention layers ({cfg.kinds}), stage "
          f"{ckpt.get('stage', '?')}, on {device}{'' if args.device else ' (autodetected)'}",
          file=sys.stderr)

    print(f"user: {args.prompt}\nassistant: ", end="", flush=True)
    generator = torch.Generator(device).manual_seed(args.seed)
    ids, shown = [], ""
    for t in model.generate(tokens, image, args.max_new_tokens, args.temperature, args.top_k,
                            stop_id=chat.stop_id, never=chat.never, generator=generator):
        ids.append(t)
        text = chat.decode(ids)          # all so far, special tokens left out: byte pieces join up
        print(text[len(shown):], end="", flush=True)
        shown = text
    print()


if __name__ == "__main__":
    run_cli(main)
