"""
Speed and memory of mmMamba against its transformer teacher (arXiv 2502.13145 Sec. 5.3, Fig. 1,
Table 2; docs/method.md §7), on HoVLE's shape (the `paper` preset) with random weights in
bf16, batch 1:

    python bench.py decode           # Figure 1: next-token latency and peak memory, 1K..128K
    python bench.py decode --quick   # the same at 1K, 32K and 103K only
    python bench.py prompt           # Table 2: one image (768 tokens) + a prompt, 256 new tokens
    python bench.py kernel           # the SSD scan kernels (scan_fast.benchmark)
    python bench.py train            # one optimizer step of stages 1-3 at the paper preset

The floor. At batch 1 a decode step does ~2 flops per weight byte, so it is bound by memory:
it must read every weight once, the K and V of every earlier token in each attention layer,
and read and write the conv and SSM states of each Mamba-2 layer. Those bytes over the
device-to-device copy bandwidth measured in the same run is the floor; every latency is
printed next to it.

How a step is timed. The caches are filled with random values and cache.pos is set to the
context, instead of prefilling (a step's cost depends only on the cache's size, and prefilling
128K tokens through the teacher would take minutes). Then the step of one token runs four ways:
    eager     the Python model as written: one kernel launch per PyTorch op
    graph     the same kernels captured once in a CUDA graph and replayed (no launch overhead)
    compiled  each decoder layer through torch.compile (fuses norms, RoPE, gate and other
              elementwise glue into few kernels), then captured in a CUDA graph
    fused     fused_decode.Decoder: five hand-written Triton kernels per layer, each matmul of
              one token carrying the elementwise work around it, in a CUDA graph
An attention layer's graph attends up to the cache.pos of its capture: we capture per context.
Latencies are medians over many steps, timed with CUDA events after warm-up. The fused decoder
stacks the projections that read one input into one matrix (fused_decode.pack_for_decoding);
the PyTorch ways then run on views of those matrices, one matmul per projection.
"""
import contextlib
import csv
import gc
import json
import os
import statistics
import time
import types
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_decode import Decoder, pack_for_decoding
from mmmamba import IM_END_ID, IM_START_ID, IMAGE_ID, PRESETS, Model, expand_image_placeholder
from seed import hybrid_layout
from util import ArgumentParser, InputError, load_checkpoint, run_cli

K = 1024
CONTEXTS = [1 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 103 * K, 128 * K]
QUICK_CONTEXTS = [1 * K, 32 * K, 103 * K]
MODELS = ("teacher", "hybrid", "linear")
WAYS = ("eager", "graph", "compiled", "fused")                  # how a step runs (module docstring)
WAYS_MS = [f"{w}_ms" for w in WAYS]
# the paper's RTX 4090 numbers: Fig. 1 at 103K tokens (ms, GB) and Table 2 (tokens per second)
PAPER_103K = {"teacher": (142.65, 21.69), "hybrid": (10.54, 8.64), "linear": (6.94, 5.22)}
PAPER_TOK_S = {"teacher": 33.0, "hybrid": 134.8, "linear": 132.4}


def layout(kind, n_layer):
    """teacher: all attention; hybrid: the paper's 8 of 32 (layers 0, 4, 8, ...); linear: no
    attention."""
    return {"teacher": "A" * n_layer, "hybrid": hybrid_layout(n_layer, attn_every=4),
            "linear": "M" * n_layer}[kind]


def build(cfg, kind, device, dtype):
    """A random model of `kind` for timing: packed as the fused decoder reads it, and able to
    embed a decode token inside a CUDA graph capture (graph_safe_embed)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(replace(cfg, layout=layout(kind, cfg.n_layer)))
    model = model.to(dtype).eval().requires_grad_(False)
    pack_for_decoding(model)
    return graph_safe_embed(model)


def _graph_safe_embed(self, tokens, images=None):
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if images is None and capturing:
        return self.tok_embeddings(tokens)
    return type(self).embed(self, tokens, images)


def graph_safe_embed(model):
    """Model.embed counts the image slots to check them against the images, and reading that
    count on the host is not allowed while a CUDA graph records. A decode step has no images:
    while capturing, embed its tokens directly (an instance attribute; the class is untouched).
    A bound method, not a closure, so that a deepcopy of the model embeds with its own table."""
    model.embed = types.MethodType(_graph_safe_embed, model)
    return model


# -----------------------------------------------------------------------------
# the floor: bytes a decode step must move


def weight_bytes(model):
    """Weights one decode step reads: every layer, the final norm, the LM head, and one row of
    the embedding table. The image projector is not used while decoding."""
    params = [*model.layers.parameters(), *model.norm.parameters(), *model.output.parameters()]
    return sum(p.numel() * p.element_size() for p in params) + model.tok_embeddings.weight[0].nbytes


def state_bytes(model, context):
    """Cache bytes one step at `context` moves: per attention layer K and V of context + 1 tokens
    (read; the new one is also written); per Mamba-2 layer the conv and SSM states, read and
    written. Counted off a cache on the meta device: real shapes and dtypes, no memory."""
    cache = model.new_cache(1, context + 1, device="meta")
    return sum(sum(t.nbytes for t in c.values()) * (1 if kind == "A" else 2)
               for kind, c in zip(model.cfg.kinds, cache.layers))


def median_ms(fn, iters, cuda, warmup=3):
    """Median time of fn in ms: CUDA events around each call (or the host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in times]
    return statistics.median(times)


def copy_bandwidth(device, nbytes=2 << 30):
    """Device-to-device copy, bytes read + written per second (3.02 TB/s on an H100 80GB)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)   # never zeros
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 20, device.type == "cuda")
    return 2 * nbytes / (ms * 1e-3)


# -----------------------------------------------------------------------------
# one decode step: eager, graphed, compiled and graphed


def capture(fn, pool=None, warmup=3):
    """Record fn's kernels in a CUDA graph. Warm-up runs go on a side stream first (libraries
    and torch.compile initialise lazily, which a capture must not do). Returns (graph, output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def decode_point(model, context, iters, cuda, compiled=None, profile=False, fused=None):
    """Time the step of token `context` + 1 after a random cache of `context` tokens. Returns
    eager_ms, mem_gb (peak: weights + cache + step), and on CUDA graph_ms, compiled_ms and
    fused_ms with each variant's relative logit error against the eager step on the same state."""
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = model.new_cache(1, context + 1)
    for c in cache.layers:
        for t in c.values():
            t.normal_(0, 0.5)                       # random, never zeros
    token = torch.randint(6, model.cfg.vocab_size, (1, 1), device=model.output.weight.device)

    def step():
        cache.pos = context                         # every run decodes the same position
        return model(token, None, cache)

    def fused_step():
        cache.pos = context
        return fused.step(token, cache)

    row = {"eager_ms": median_ms(step, max(5, iters // 5), cuda)}
    if not cuda:
        return row
    row["mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    # Mamba-2 states change in place at every step: keep a copy, so eager and graphs can be
    # compared from the same state (the KV cache only gains the same entry at `context`).
    states = [(t, t.clone()) for kind, c in zip(model.cfg.kinds, cache.layers) if kind == "M"
              for t in c.values()]
    restore = lambda: [t.copy_(saved) for t, saved in states]
    restore()
    ref = step().float()
    plain = model.layers
    try:
        ways = [("graph", plain, step)] \
            + ([("compiled", compiled, step)] if compiled is not None else []) \
            + ([("fused", plain, fused_step)] if fused is not None else [])
        for name, layers, fn in ways:
            model.layers = layers
            try:
                graph, out = capture(fn)
            except (RuntimeError, AssertionError) as e:  # torch.compile or triton can fail on new
                if name == "graph":                      # code: report it, keep the other numbers
                    raise
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            restore()
            graph.replay()
            row[f"{name}_err"] = rel_err(out, ref)
            row[f"{name}_ms"] = median_ms(graph.replay, iters, cuda)
            if profile:
                row[f"{name}_kernels"], row[f"{name}_busy_ms"] = profile_kernels(
                    graph.replay, f"{name} step at {context}")
            del graph, out
    finally:
        model.layers = plain
    return row


def profile_kernels(fn, label, steps=3):
    """torch.profiler over a few calls: kernels per call, GPU busy time per call (the sum of
    kernel durations; the rest of the latency is gaps between kernels), the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    avgs = [a for a in prof.key_averages() if a.self_device_time_total > 0]
    n = sum(a.count for a in avgs) / steps
    busy = sum(a.self_device_time_total for a in avgs) / steps / 1e3
    print(f"  profile {label}: {n:.0f} kernels per step, GPU busy {busy:.3f} ms per step")
    for a in sorted(avgs, key=lambda a: -a.self_device_time_total)[:14]:
        print(f"    {a.self_device_time_total / steps:9.1f} us  {a.count / steps:5.0f}x  "
              f"{a.key[:90]}")
    return n, busy


def measure(model, kind, context, bw, iters, cuda, compiled=None, profile=False, fused=None):
    """One row of the decode table; out-of-memory is a result, not a crash."""
    nbytes = weight_bytes(model) + state_bytes(model, context)
    row = {"model": kind, "context": context, "step_gb": nbytes / 1e9,
           "floor_ms": nbytes / bw * 1e3}
    try:
        row.update(decode_point(model, context, iters, cuda, compiled, profile, fused))
        row["best_ms"] = min(row.get(k, float("inf")) for k in WAYS_MS)
        row["ratio"] = row["best_ms"] / row["floor_ms"]
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def attention_decode(cfg, contexts, bw):
    """One attention layer's decode (1 query, 16 heads on 8 KV heads) through SDPA, several ways,
    in us per call, against its floor (K and V read once). "gqa" is what the model does
    (enable_gqa); "rows" views the 2 query heads sharing a KV head as 2 query rows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    ways = {"gqa": None, "rows": None, "flash gqa": SDPBackend.FLASH_ATTENTION,
            "flash rows": SDPBackend.FLASH_ATTENTION,
            "efficient rows": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn rows": SDPBackend.CUDNN_ATTENTION}
    print("\none attention layer's decode, us per call (graph of 10 calls)")
    print(f"{'context':>8} {'floor':>7} " + " ".join(f"{w:>14}" for w in ways))
    for T in contexts:
        q = torch.randn(1, H, 1, hd, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, Hkv, T + 1, hd, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        cells = []
        for way, backend in ways.items():
            if way.endswith("rows"):
                call = lambda: F.scaled_dot_product_attention(q.view(1, Hkv, H // Hkv, hd), k, v)
            else:
                call = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            try:
                with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                    graph, _ = capture(lambda: [call() for _ in range(10)])
                cells.append(f"{median_ms(graph.replay, 50, True) * 100:14.1f}")
            except RuntimeError:                            # a backend that refuses these inputs
                cells.append(f"{'n/a':>14}")
        print(f"{T:>8} {2 * k.nbytes / bw * 1e6:7.1f} " + " ".join(cells))
        del q, k, v
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# output: markdown tables, CSV, plot


def fmt(row, key, spec=".2f"):
    if row.get("status"):
        return row["status"]
    return format(row[key], spec) if key in row else "-"


def markdown(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(map(str, line)) + " |" for line in lines])


def decode_table(rows):
    """Context down, per model: latency (best way), floor, latency / floor, peak memory."""
    kinds = [k for k in MODELS if any(r["model"] == k for r in rows)]
    header = ["context"] + [f"{k} {c}" for k in kinds for c in ("ms", "floor", "x floor", "GB")]
    lines = []
    for T in sorted({r["context"] for r in rows}):
        line = [f"{T // K}K"]
        for k in kinds:
            r = next((r for r in rows if r["model"] == k and r["context"] == T), {})
            line += [fmt(r, "best_ms"), fmt(r, "floor_ms"), fmt(r, "ratio"), fmt(r, "mem_gb")]
        lines.append(line)
    return markdown(header, lines)


def ways_table(rows):
    header = ["model", "context", "eager ms", "graph ms", "compiled ms", "fused ms", "floor ms",
              "kernels graph/compiled/fused"]
    kernels = lambda r: "/".join(fmt(r, f"{w}_kernels", ".0f") for w in WAYS[1:])
    return markdown(header, [[r["model"], f"{r['context'] // K}K"] + [fmt(r, k) for k in WAYS_MS]
                             + [fmt(r, "floor_ms"), kernels(r)] for r in rows])


def write_csv(rows, path):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the table and CSV have every number)")
        return
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, color in zip(MODELS, ("C3", "C1", "C0")):
        r = [r for r in rows if r["model"] == kind and "best_ms" in r]
        if not r:
            continue
        ctx = [x["context"] / K for x in r]
        lat.plot(ctx, [x["best_ms"] for x in r], "o-", color=color, label=kind)
        lat.plot(ctx, [x["floor_ms"] for x in r], "--", color=color, alpha=0.5,
                 label=f"{kind} floor")
        mem.plot(ctx, [x["mem_gb"] for x in r], "o-", color=color, label=kind)
    for ax, title in ((lat, "next-token latency (ms)"), (mem, "peak GPU memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def paper_table(rows, context=103 * K):
    """Our speedup and memory saving over the teacher at 103K next to the paper's (RTX 4090)."""
    at = {r["model"]: r for r in rows if r["context"] == context and "best_ms" in r}
    if "teacher" not in at:
        return f"(no teacher result at {context // K}K: no comparison with the paper)"
    t, (pt_ms, pt_gb) = at["teacher"], PAPER_103K["teacher"]
    lines = []
    for kind in [k for k in MODELS if k in at]:
        r, (p_ms, p_gb) = at[kind], PAPER_103K[kind]
        lines.append([kind, f"{r['best_ms']:.2f}", f"{t['best_ms'] / r['best_ms']:.1f}x",
                      f"{t['floor_ms'] / r['floor_ms']:.1f}x", f"{pt_ms / p_ms:.1f}x",
                      f"{r['mem_gb']:.2f}", f"{1 - r['mem_gb'] / t['mem_gb']:.1%}",
                      f"{1 - p_gb / pt_gb:.1%}"])
    return markdown(["model", "ms (ours)", "speedup (ours)", "speedup of floors", "speedup (paper)",
                     "GB (ours)", "memory saved (ours)", "memory saved (paper)"], lines)


def run_decode(args):
    if not torch.cuda.is_available():
        raise InputError("bench.py decode times the paper preset on a CUDA GPU and none is visible "
                         "(tests/test_bench.py runs this code on the CPU with a tiny model)")
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch 1; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    cfg = PRESETS[args.preset]
    contexts = QUICK_CONTEXTS if args.quick else [int(c) for c in args.contexts.split(",")]
    if args.profile:
        attention_decode(cfg, contexts, bw)
    torch._dynamo.config.recompile_limit = 64     # teacher and hybrid share compiled layer code
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for kind in args.models.split(","):
        model = build(cfg, kind, dev, torch.bfloat16)
        compiled = None if args.no_compile else nn.ModuleList(map(torch.compile, model.layers))
        fused = None if args.no_fused else Decoder(model)
        print(f"\n{kind}: layout {model.cfg.kinds}, weights read per step "
              f"{weight_bytes(model) / 1e9:.2f} GB")
        for i, T in enumerate(contexts):
            t0 = time.time()
            profile = args.profile and i in (0, len(contexts) - 1)
            row = measure(model, kind, T, bw, args.iters, True, compiled, profile, fused)
            if "compiled_error" in row:
                print(f"  torch.compile failed, continuing without it: {row['compiled_error']}")
                compiled = None
            if "fused_error" in row:
                print(f"  the fused decoder failed, continuing without it: {row['fused_error']}")
                fused = None
            rows.append(row)
            write_csv(rows, os.path.join(args.out_dir, "bench_decode.csv"))
            cells = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in row.items() if k not in ("model", "context"))
            print(f"  {T // K:>4}K: " + ", ".join(cells) + f" ({time.time() - t0:.0f} s)")
        del model, compiled, fused
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n## Next-token latency (ms) and peak memory (GB), {torch.cuda.get_device_name()}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print(decode_table(rows))
    print("\n## The four ways of running a step\n")
    print(ways_table(rows))
    print("\n## At 103K against the paper (RTX 4090, its Fig. 1)\n")
    print(paper_table(rows))
    plot(rows, os.path.join(args.out_dir, "bench_decode.png"))


# -----------------------------------------------------------------------------
# Table 2: one image and a short prompt, then 256 new tokens


def generation_ms(model, tokens, images, n_new, layers=None, graphs=False, fused=None):
    """Prefill the prompt, then n_new - 1 greedy steps (the prefill gives the first token) with
    `layers` (default: the model's own) or the `fused` Decoder, each step eager or a CUDA graph
    captured beforehand, one per position (an attention layer attends up to a fixed position).
    Tokens stay on the GPU: no host sync per token. Returns (prefill ms, decode ms, capture s)."""
    cache = model.new_cache(1, tokens.shape[1] + n_new)
    tok = torch.zeros(1, 1, dtype=torch.long, device=tokens.device)
    first, plain = tokens.shape[1], model.layers
    positions = range(first, first + n_new - 1)

    def step_at(pos):
        def step():
            cache.pos = pos
            logits = fused.step(tok, cache) if fused else model(tok, None, cache)
            tok.copy_(logits[:, -1:].argmax(-1))
        return step

    steps, capture_s = [step_at(p) for p in positions], 0.0
    model.layers = layers if layers is not None else plain
    try:
        if graphs:  # captures only record; the first one's warm-up writes are overwritten later
            t0 = time.time()
            g0, _ = capture(steps[0], warmup=1)
            steps = [g0.replay] + [capture(s, pool=g0.pool(), warmup=0)[0].replay
                                   for s in steps[1:]]
            capture_s = time.time() - t0
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize()
        events[0].record()
        model.layers, cache.pos = plain, 0          # prefill: always the plain layers
        tok.copy_(model(tokens, images, cache)[:, -1:].argmax(-1))
        model.layers = layers if layers is not None else plain
        events[1].record()
        for step in steps:
            step()
        events[2].record()
        torch.cuda.synchronize()
    finally:
        model.layers = plain
    return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]), capture_s


def run_prompt(args):
    if not torch.cuda.is_available():
        raise InputError("bench.py prompt times the paper preset on a CUDA GPU and none is visible")
    dev = torch.device("cuda")
    cfg = PRESETS[args.preset]
    # 768 visual tokens = one image as HoVLE's dynamic tiling cuts it: 3 tiles of 448 px
    # (2 tiles + a thumbnail), 256 tokens each. Random ids of the prompt's length stand in for
    # "Describe the image specifically" in the chat template (no tokenizer needed for timing).
    tiles, g = 3, torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(6, cfg.vocab_size, (n,), generator=g).tolist()
    ids = [IM_START_ID] + text(2) + [IMAGE_ID] + text(8) + [IM_END_ID, IM_START_ID] + text(2)
    ids = expand_image_placeholder(ids, tiles * cfg.n_img_tokens)
    tokens = torch.tensor([ids], device=dev)
    images = torch.rand(tiles, 3, cfg.img_size, cfg.img_size, device=dev) * 2 - 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch 1; "
          f"prompt {tokens.shape[1]} tokens ({tiles * cfg.n_img_tokens} visual), "
          f"{args.new_tokens} new tokens")
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for kind in args.models.split(","):
        model = build(cfg, kind, dev, torch.bfloat16)
        compiled = None if args.no_compile else nn.ModuleList(map(torch.compile, model.layers))
        fused = None if args.no_fused else Decoder(model)
        row = {"model": kind, "prompt_tokens": tokens.shape[1], "new_tokens": args.new_tokens}
        ways = [("eager", None, False, None), ("graph", None, True, None)] \
            + ([("compiled", compiled, True, None)] if compiled is not None else []) \
            + ([("fused", None, True, fused)] if fused is not None else [])
        for way, layers, graphs, dec in ways:
            generation_ms(model, tokens, images, 4, layers, fused=dec)   # warm-up; compiles
            prefill, decode, cap = generation_ms(model, tokens, images, args.new_tokens, layers,
                                                 graphs, dec)
            row.update({"prefill_ms": prefill, f"{way}_decode_ms": decode, f"{way}_capture_s": cap,
                        f"{way}_tok_s": args.new_tokens / ((prefill + decode) * 1e-3)})
            print(f"  {kind} {way}: prefill {prefill:.1f} ms, decode {decode:.1f} ms, "
                  f"{row[f'{way}_tok_s']:.1f} tok/s (graph capture {cap:.1f} s, not counted)")
        rows.append(row)
        del model, compiled, fused
        gc.collect()
        torch.cuda.empty_cache()
    os.makedirs(args.out_dir, exist_ok=True)
    write_csv(rows, os.path.join(args.out_dir, "bench_prompt.csv"))
    lines = [[r["model"], r["prompt_tokens"], fmt(r, "prefill_ms", ".1f")]
             + [fmt(r, f"{w}_decode_ms", ".1f") for w in WAYS]
             + [fmt(r, f"{w}_tok_s", ".1f") for w in WAYS]
             + [PAPER_TOK_S[r["model"]]] for r in rows]
    print(f"\n## Table 2 protocol, {torch.cuda.get_device_name()} "
          "(tok/s = new tokens / (prefill + decode))\n")
    print(markdown(["model", "prompt", "prefill ms (last way)", "decode ms eager", "graph",
                    "compiled", "fused", "tok/s eager", "graph", "compiled", "fused",
                    "tok/s paper (4090)"], lines))


def run_kernel(args):
    """The SSD scan: validation, then ours beside mamba_ssm and fla (scan_fast.benchmark)."""
    import scan_fast
    with torch.enable_grad():                        # main() runs under no_grad; fwd+bwd needs it
        scan_fast.benchmark(args.peers, args.rounds, scan_fast.parse_shapes(args.shapes))


def run_curves(args):
    """The training loss of every stage of a distill.py run (kept per step in its checkpoints):
    losses.json, and loss_curves.png with one panel per stage if matplotlib is installed."""
    if not os.path.isdir(args.run_dir):
        raise InputError(f"--run-dir {args.run_dir} is not a folder: give distill.py's --out-dir")
    curves = {}
    for name in sorted(os.listdir(args.run_dir)):
        if name.endswith(".pt"):
            curves[name[:-3]] = load_checkpoint(os.path.join(args.run_dir, name)).get("losses", [])
    if not curves:
        raise InputError(f"no checkpoints in {args.run_dir}: run "
                         f"'python distill.py --out-dir {args.run_dir}' first")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "losses.json"), "w") as f:
        json.dump(curves, f)
    for name, ys in curves.items():
        first, last = (ys[0], ys[-1]) if ys else (float("nan"),) * 2
        print(f"{name:<16} {len(ys):>6} steps, loss {first:.4g} -> {last:.4g}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: losses.json written, no plot")
        return
    titles = ["stage 0: teacher cross-entropy", "stage 1: layer-wise MSE x 1000",
              "stage 2: layer-wise MSE x 1000", "stage 3: KL(teacher || student)"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for stage, (ax, title) in enumerate(zip(axes, titles)):
        for name, ys in curves.items():
            if name.startswith(f"stage{stage}_") and ys:
                ax.plot(ys, label=name.split("_", 1)[1], lw=0.8)
        ax.set(title=title, yscale="log", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "loss_curves.png"), dpi=110)
    print(f"wrote {os.path.join(args.out_dir, 'loss_curves.png')}")


# -----------------------------------------------------------------------------
# one optimizer step of each distillation stage at scale (docs/benchmarks.md, "Training step")


def matmul_params(model, names=None):
    """Weights of the matmuls one token goes through (every nn.Linear; the patch conv and the
    embedding table are lookups or tiny), optionally only those whose name has a part in names."""
    return sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and (names is None or set(n.split(".")) & set(names)))


def step_flops(stage, teacher, student, trains, batch, length):
    """Model FLOPs of one step, written out (a matmul of W costs 2 |W| per token forward; its
    backward 2 |W| for the input's gradient and 2 |W| for the weight's):
      teacher forward: 2 N_teacher T + causal attention 2 H hd L^2 per layer and sequence;
      the scan: about T H (4 Q (N + P) + 4 P N) per Mamba-2 layer forward (chunk Q; its
        backward counted at twice that);
      stages 1-2 (layer-wise): the student's mixers forward 2 N_mix T, backward only the
        trainable weights' gradients 2 N_train T (the mixer inputs come from the teacher);
      stage 3 (KL): the whole student forward 2 N_student T, backward the inputs' gradients
        through every layer 2 N_student T plus the trainable weights' 2 N_train T."""
    cfg, T = teacher.cfg, batch * length
    n_mamba = student.cfg.kinds.count("M")
    attn = 2 * cfg.n_head * cfg.head_dim * length ** 2 * batch * cfg.n_layer
    scan = n_mamba * T * cfg.n_head * (4 * cfg.chunk_size * 2 * cfg.head_dim
                                       + 4 * cfg.head_dim ** 2)
    n_train = matmul_params(student, [t for t in trains if t.endswith("proj")])
    if stage in (1, 2):
        mixers = matmul_params(student, ["x_proj", "b_proj", "c_proj", "dt_proj", "g_proj"])
        t_fwd = 2 * (matmul_params(teacher) - teacher.output.weight.numel()) * T + attn
        return t_fwd + 2 * mixers * T + 2 * n_train * T + 3 * scan
    n_s = matmul_params(student)
    return 2 * matmul_params(teacher) * T + attn + 4 * n_s * T + 2 * n_train * T + 3 * scan


def run_train(args):
    """Stages 1, 2 and 3 at the paper preset: seconds per step, tokens/s, peak memory, MFU,
    for each of --ways: plain (as distill.py trains: fp32 weights, bf16 autocast, fused AdamW
    on the trainable part), fast (train_fast's pieces: frozen weights held in bf16, the LM head
    padded to an aligned vocabulary, losses without host syncs, the chunked KL), compiled
    (fast + the elementwise work, the depthwise conv and the squared error through
    torch.compile).
    --profile: where one step's GPU time goes (torch.profiler), for the last way."""
    import distill
    import train_fast
    from seed import seed_student
    if not torch.cuda.is_available():
        raise InputError("bench.py train times the paper preset on a CUDA GPU and none is visible")
    ways = args.ways.split(",")
    if set(ways) - {"plain", "fast", "compiled"} or not ways:
        raise InputError(f"--ways {args.ways}: choose from plain,fast,compiled")
    device, peak = torch.device("cuda"), args.peak_tflops * 1e12
    cfg = PRESETS[args.preset]
    B, L = (int(v) for v in args.train_shape.split("x"))
    torch.manual_seed(0)
    with device:
        teacher = Model(cfg).eval().requires_grad_(False)
    student = seed_student(teacher, "M" * cfg.n_layer)
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randint(IM_END_ID + 1, cfg.vocab_size, (B, L), generator=g)
    n_img = cfg.n_img_tokens
    tokens = torch.cat([text[:, :1], torch.full((B, n_img), cfg.img_token_id), text[:, 1:]],
                       1)[:, :L].to(device)                             # one image per sequence
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    targets = tokens.roll(-1, 1)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; preset "
          f"{args.preset}, {B} x {L} tokens with {n_img} image tokens each; MFU against "
          f"{args.peak_tflops:g} TFLOP/s")
    rows, undo = [], None
    for way in ways:
        if way != "plain" and "embed" not in vars(teacher):
            train_fast.graph_safe(teacher)
            train_fast.graph_safe(student)
        if way == "compiled" and undo is None:
            undo = train_fast.fuse_elementwise([teacher, student])
        for stage in (1, 2, 3):
            distill.freeze_for(student, stage)
            if way != "plain":
                for m in (teacher, student):
                    train_fast.frozen_to_bf16(m)
                    train_fast.pad_head(m)      # after the cast: its padded copy is bf16 too
            params = [p for p in student.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.05,
                                    fused=True)             # as distill.py's loop
            loss_fn = distill.StageLoss(stage, student)
            if way != "plain":
                def loss_fn(teacher, tokens, targets, images, stage=stage):
                    return train_fast.stage_loss(stage, teacher, student, tokens, targets, images)
            torch.cuda.reset_peak_memory_stats()

            def step():
                with torch.autocast("cuda", torch.bfloat16):
                    total, count = loss_fn(teacher, tokens, targets, images)
                (total / count).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            t0 = time.time()
            with torch.enable_grad():
                step()
                torch.cuda.synchronize()
                first_s = time.time() - t0
                ms = median_ms(step, 5, True, warmup=1)      # steps of ~1 s: few suffice
                if args.profile and way == ways[-1]:
                    profile_step(step, f"{way}, stage {stage}")
            flops = step_flops(stage, teacher, student, distill.RECIPE[stage]["trains"], B, L)
            rows.append({"way": way, "stage": stage, "s_per_step": ms / 1e3,
                         "tokens_per_s": B * L / ms * 1e3, "first_step_s": first_s,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                         "tflop_per_step": flops / 1e12, "mfu": flops / (ms * 1e-3) / peak,
                         "trainable_m": sum(p.numel() for p in params) / 1e6})
            print(rows[-1], flush=True)
            del opt, loss_fn
            for p in student.parameters():
                p.grad = None
            gc.collect()
            torch.cuda.empty_cache()
    if undo:
        undo()
    print("\n| way | stage | trainable | s / step | tokens/s | peak GiB | TFLOP / step | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['stage']} | {r['trainable_m']:.0f}M | {r['s_per_step']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | {r['tflop_per_step']:.1f} | "
              f"{r['mfu']:.1%} |")
    # the paper's recipe: 20K steps a stage at batch 128, 128, 64 (sequences of L tokens)
    last = rows[-3:]
    hours = [20000 * batch / B * r["s_per_step"] / 3600
             for batch, r in zip((128, 128, 64), last)]
    print(f"\nthe paper's recipe (20K steps a stage, batch 128/128/64 of {L} tokens) at the "
          f"{last[0]['way']} speeds: {' + '.join(f'{h:.0f}' for h in hours)} = "
          f"{sum(hours):.0f} GPU-hours; {sum(hours) / 8:.0f} h on 8 GPUs with torchrun if data "
          "parallelism scales")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench_train.json"), "w") as f:
        json.dump(rows, f, indent=1)


def profile_step(step, label, top=18):
    """One step under torch.profiler: the ops that take the most GPU time, and how much of
    the step is matmul (GEMM kernels), attention, the scan, and everything else."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) or 1.0
    groups = {"matmul": ("gemm", "cutlass", "sm90_xmma", "nvjet"), "attention": ("flash", "fmha",
              "cudnn", "attention"), "scan": ("_scan", "_state", "_pass", "_chunk")}
    share = dict.fromkeys(list(groups) + ["other"], 0.0)
    for e in events:
        kind = next((k for k, keys in groups.items() if any(s in e.key.lower() for s in keys)),
                    "other")
        share[kind] += e.self_device_time_total
    print(f"\nprofile ({label}): GPU busy {total / 1e3:.1f} ms; " + ", ".join(
        f"{k} {v / total:.1%}" for k, v in share.items()))
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} ms  {e.count:5d}x  {e.key[:90]}")


def main():
    p = ArgumentParser(description="mmMamba speed and memory (arXiv 2502.13145 Sec. 5.3), and "
                       "training curves")
    p.add_argument("what", choices=["decode", "prompt", "kernel", "curves", "train"],
                   help="which benchmark to run ('curves' plots the losses of a distill.py run)")
    p.add_argument("--run-dir", default="out", help="curves: the --out-dir of a distill.py run")
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)),
                   help="decode: context lengths")
    p.add_argument("--quick", action="store_true", help="decode: only 1K, 32K and 103K")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated: teacher,hybrid,linear")
    p.add_argument("--preset", default="paper", choices=list(PRESETS), help="model dimensions")
    p.add_argument("--iters", type=int, default=100, help="decode: timed graph replays per point")
    p.add_argument("--new-tokens", type=int, default=256, help="prompt: tokens to generate")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-fused", action="store_true", help="skip the fused Triton decoder")
    p.add_argument("--profile", action="store_true",
                   help="decode: profile the first and last context, and time SDPA variants; "
                   "train: where one step's GPU time goes")
    p.add_argument("--out-dir", default="bench_out", help="where the CSV and PNG go")
    p.add_argument("--peers", help="kernel: a folder holding mamba_ssm/, fla/, einops/ to time "
                   "beside ours (goes first on sys.path)")
    p.add_argument("--rounds", type=int, default=5, help="kernel: interleaved timing rounds")
    p.add_argument("--train-shape", default="8x2048", help="train: sequences x tokens")
    p.add_argument("--ways", default="plain,fast,compiled",
                   help="train: comma-separated plain,fast,compiled (see run_train)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="train: the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--shapes", default="16x1024,8x2048,4x8192,2x16384,1x65536",
                   help="kernel: batch x length pairs")
    args = p.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        raise InputError(f"unknown models {sorted(unknown)}: choose from {','.join(MODELS)}")
    with torch.no_grad():
        run = {"decode": run_decode, "prompt": run_prompt, "kernel": run_kernel,
               "curves": run_curves, "train": run_train}
        run[args.what](args)


if __name__ == "__main__":
    run_cli(main)
