"""
Ask a trained model about an image, streaming the answer as it is decoded.

    python sample.py --image cat.jpg                              # the linear student describes it
    python sample.py --image cat.jpg --prompt "What color is the circle?" --model hybrid

Decoding is Model.generate: one prefill of the prompt (image included), then one cached step
per token. In a Mamba-2 layer that step updates a fixed-size state (PAPER.md section 2,
"Decoding"), so a token costs the same however long the context; attention layers (teacher,
hybrid) read a KV cache that grows with it.
"""
import os
import sys

import torch
from tokenizers import Tokenizer

import data
from util import ArgumentParser, InputError, get_device, load_checkpoint, model_from_checkpoint, run_cli

CKPTS = {"teacher": "stage0_teacher.pt", "linear": "stage3_linear.pt", "hybrid": "stage3_hybrid.pt"}


def main(argv=None):
    ap = ArgumentParser(description="Answer a question about an image with a trained model.")
    ap.add_argument("--image", required=True, help="any image file Pillow reads (first frame if animated)")
    ap.add_argument("--prompt", default=data.CAPTION, help="the question to ask")
    ap.add_argument("--model", default="linear", choices=list(CKPTS), help="which model of --out-dir to use")
    ap.add_argument("--out-dir", default="out", help="folder of distill.py's checkpoints")
    ap.add_argument("--ckpt", help="a checkpoint file (overrides --model and --out-dir)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; higher samples more freely")
    ap.add_argument("--top-k", type=int, help="sample only among the k most likely tokens")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens")
    ap.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise InputError("--temperature must be >= 0 and --max-new-tokens >= 1")
    if not args.prompt.strip():
        raise InputError("--prompt is empty: ask a question, or leave --prompt out for a caption")
    device = get_device(args.device)

    path = args.ckpt or os.path.join(args.out_dir, CKPTS[args.model])
    ckpt = load_checkpoint(path)
    if "tokenizer" not in ckpt:
        raise InputError(f"{path} holds no tokenizer: use a checkpoint written by distill.py")
    tok = Tokenizer.from_str(ckpt["tokenizer"])
    model = model_from_checkpoint(ckpt).to(device).eval()
    cfg = model.cfg
    image = data.load_image(args.image, cfg.img_size)[None].to(device)         # (1, 3, S, S)
    tokens = torch.tensor([data.encode_prompt(tok, args.prompt, cfg.n_img_tokens)], device=device)
    n_mamba = cfg.kinds.count("M")
    print(f"{ckpt.get('kind', 'model')} from {path}: {n_mamba} Mamba-2 + {cfg.n_layer - n_mamba} "
          f"attention layers ({cfg.kinds}), stage {ckpt.get('stage', '?')}", file=sys.stderr)

    print(f"user: {args.prompt}\nassistant: ", end="", flush=True)
    generator = torch.Generator(device).manual_seed(args.seed)
    ids, shown = [], ""
    for t in model.generate(tokens, image, args.max_new_tokens, args.temperature, args.top_k,
                            generator=generator):
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True)    # decode all so far: byte pieces join up
        print(text[len(shown):], end="", flush=True)
        shown = text
    print()


if __name__ == "__main__":
    run_cli(main)
