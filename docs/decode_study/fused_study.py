# Study of the fused decode step (docs/bench_log.md, "v4"; arXiv 2502.13145 Fig. 1;
# docs/method.md §7): fused_decode.py on the paper preset, one H100.
#   sweep     the launch settings (fused_decode.CONFIG), one matrix kind at a time, whole-step time
#   pdl       programmatic dependent launch off / on, and the SSM step's rows per program
#   accuracy  logits of the fused and the PyTorch bf16 step against the model in float64
#   attention the teacher's attention of one token, PyTorch's scaled_dot_product_attention and
#             fused_decode.attend (split over the keys), 32 calls in a CUDA graph, per call
#             against its bytes; then the teacher's whole step with each (fused_decode.ATTENTION)
#   attention-bt  the split kernel's keys per step (fused_decode.ATTEND_BT) 32 / 64 / 128
#   step      the SSM step under PDL (fused_decode.STEP_PDL) against launched plainly, alternating
#   attention-pdl the teacher step with the split attention launched plainly, beside PDL, SDPA
#   kernels   one replayed step kernel by kernel: each one's time and the idle gap before it
#             (layer 16 and the last two), with PDL and without (each kernel's own time)
# run on a GPU from the repository root:
#   python docs/decode_study/fused_study.py [sweep] [pdl] [accuracy] [attention] [attention-bt]
#                                           [step] [attention-pdl] [kernels]
# writes docs/decode_study/fused_study.json (or $OUT/fused_study.json)
import copy, json, os, sys, time
sys.path[:0] = [".", "tests"]
import torch
import bench
import fused_decode as fd
from mmmamba import PRESETS
from test_fused_decode import random_caches
rel = bench.rel_err

cfg, dev = PRESETS["paper"], torch.device("cuda")
bw = bench.copy_bandwidth(dev)
out = os.path.join(os.environ.get("OUT", "docs/decode_study"), "fused_study.json")
log = {"device": torch.cuda.get_device_name(), "bw_TBs": bw / 1e12, "config": dict(fd.CONFIG)}
tok = torch.tensor([[11]], device=dev)


def step_ms(model, context, pdl=None, iters=40):
    """Median ms of the fused step at `context`, captured in a CUDA graph (a new Decoder: new
    settings)."""
    dec = fd.Decoder(model)
    dec.pdl = dec.pdl if pdl is None else pdl
    cache = random_caches([model], context + 1, context)[0]
    def step():
        cache.pos = context
        return dec.step(tok, cache)
    graph, _ = bench.capture(step)
    return bench.median_ms(graph.replay, iters, True)


def random_qkv(context):
    """One token's q (H * hd,) and a cache's k, v (1, Hkv, context + 1, hd), bf16."""
    q = torch.randn(cfg.n_head * cfg.head_dim, device=dev, dtype=torch.bfloat16)
    return (q,) + tuple(torch.randn(1, cfg.n_kv_head, context + 1, cfg.head_dim, device=dev,
                                    dtype=torch.bfloat16) for _ in "kv")


def attention_us(fn, q, k, v, context, calls=32):
    """us a call of fn(q, k, v, context), `calls` calls (one per layer, as in a step) in a graph."""
    def layers():
        for _ in range(calls):
            o = fn(q, k, v, context)
        return o
    graph, _ = bench.capture(layers)
    return bench.median_ms(graph.replay, 50, True) * 1e3 / calls


def floor_ms(model, context):
    return (bench.weight_bytes(model) + bench.state_bytes(model, context)) / bw * 1e3


if "sweep" in sys.argv:
    log["sweep"] = []
    for kind_model, context, kinds in [("linear", 1024, ["mlp", "in", "w2", "out", "head"]),
                                       ("teacher", 8192, ["qkv"])]:
        model = bench.build(cfg, kind_model, dev, torch.bfloat16)
        best_ms = step_ms(model, context)
        print(f"{kind_model} {context}: {best_ms:.4f} ms at {fd.CONFIG} "
              f"(floor {floor_ms(model, context):.4f})", flush=True)
        for kind in kinds:
            K = cfg.d_mlp if kind == "w2" else cfg.d_model
            keep = fd.CONFIG[kind]
            for cand in [(br, bk, w) for br in (4, 8, 16, 32) for bk in (512, 1024, 2048, 4096)
                         for w in (4, 8) if bk <= K]:
                fd.CONFIG[kind] = cand
                ms = step_ms(model, context)
                log["sweep"].append([kind_model, context, kind, cand, ms])
                if ms < best_ms:
                    best_ms, keep = ms, cand
            fd.CONFIG[kind] = keep
            print(f"  {kind}: best {keep}, {best_ms:.4f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    log["best_config"] = dict(fd.CONFIG)
    json.dump(log, open(out, "w"), indent=1)

if "pdl" in sys.argv:
    log["pdl"] = {}
    for kind, context in [("linear", 1024), ("hybrid", 8192), ("teacher", 1024), ("teacher", 8192)]:
        model = bench.build(cfg, kind, dev, torch.bfloat16)
        off = step_ms(model, context, pdl=False, iters=100)
        on = step_ms(model, context, pdl=True, iters=100)
        log["pdl"][f"{kind} {context}"] = {"off_ms": off, "on_ms": on,
                                           "floor_ms": floor_ms(model, context)}
        print(f"{kind} {context}: PDL off {off:.4f} ms, on {on:.4f} ms", flush=True)
        if kind == "linear":
            keep = fd.STEP_BP
            for bp in (8, 16, 32, 64):
                fd.STEP_BP = bp
                log["pdl"][f"STEP_BP {bp}"] = step_ms(model, context, iters=100)
                print(f"  STEP_BP {bp}: {log['pdl'][f'STEP_BP {bp}']:.4f} ms", flush=True)
            fd.STEP_BP = keep
        del model
        torch.cuda.empty_cache()
    json.dump(log, open(out, "w"), indent=1)

if "accuracy" in sys.argv:
    log["accuracy"] = {}
    for kind in ("teacher", "hybrid", "linear"):
        model = bench.build(cfg, kind, dev, torch.bfloat16)
        ref = copy.deepcopy(model).double()
        fused, eager, want = random_caches([model, model, ref], 8193, 8192)
        lf, le = fd.Decoder(model).step(tok, fused), model(tok, None, eager)
        lr = ref(tok, None, want)
        log["accuracy"][kind] = {"fused_vs_f64": rel(lf, lr), "torch_bf16_vs_f64": rel(le, lr),
                                 "fused_vs_torch": rel(lf, le)}
        print(f"{kind} 8K: logits vs float64: fused {rel(lf, lr):.4f}, "
              f"PyTorch bf16 {rel(le, lr):.4f}", flush=True)
        del model, ref, fused, eager, want
        torch.cuda.empty_cache()
    json.dump(log, open(out, "w"), indent=1)

if "attention" in sys.argv:
    # one layer's attention, 32 calls in a CUDA graph: PyTorch's SDPA (fused_decode.ATTENTION
    # "sdpa") and our split-KV kernels ("split"), then the teacher's whole step either way
    H, hd = cfg.n_head, cfg.head_dim
    log["attention"] = []
    ways = {"sdpa": lambda q, k, v, pos: torch.nn.functional.scaled_dot_product_attention(
                q.view(1, H, 1, hd), k[:, :, :pos + 1], v[:, :, :pos + 1], enable_gqa=True),
            "split": lambda q, k, v, pos: fd.attend(q, k, v, pos, H)}
    for context in (1024, 8192, 32768, 131072):
        q, k, v = random_qkv(context)
        want = ways["sdpa"](q, k, v, context).reshape(-1)
        floor_us = 2 * k.numel() * k.element_size() / bw * 1e6
        row = {"context": context, "floor_us": floor_us}
        for way, fn in ways.items():
            row[way + "_us"] = attention_us(fn, q, k, v, context)
            row[way + "_err"] = rel(fn(q, k, v, context).reshape(-1).float(), want.float())
        print(f"attention at {context}: " + ", ".join(
            f"{k} {v:.3g}" for k, v in row.items() if k != "context"), flush=True)
        log["attention"].append(row)
    teacher = bench.build(cfg, "teacher", dev, torch.bfloat16)
    for context in (1024, 8192, 32768, 131072):
        for way in ("sdpa", "split"):
            fd.ATTENTION, fd.SPLIT_KEYS = way, 1 << 40       # split at every context
            ms = step_ms(teacher, context)
            log["attention"].append(["teacher step", context, way, ms])
            print(f"teacher step at {context}, {way}: {ms:.4f} ms "
                  f"(floor {floor_ms(teacher, context):.4f})", flush=True)
    json.dump(log, open(out, "w"), indent=1)

if "attention-bt" in sys.argv:
    # fused_decode.attend alone, us a call (docs/h200/attend_bt_11.log)
    for context in (1024, 8192, 32768, 131072):
        q, k, v = random_qkv(context)
        row = [f"{context}: floor {2 * k.numel() * k.element_size() / bw * 1e6:.2f}"]
        for BT in (32, 64, 128):
            fd.ATTEND_BT = BT
            us = attention_us(lambda q, k, v, pos: fd.attend(q, k, v, pos, cfg.n_head),
                              q, k, v, context)
            row.append(f"BT {BT} {us:.2f}")
        print("  ".join(row), flush=True)

if "step" in sys.argv:
    # the linear and hybrid steps with the SSM step kernel under PDL or not, three rounds
    log["step"] = []
    for kind, context in (("linear", 1024), ("hybrid", 1024), ("hybrid", 32768)):
        model = bench.build(cfg, kind, dev, torch.bfloat16)
        ms, keep = {False: [], True: []}, fd.STEP_PDL
        for _ in range(3):
            for flag in ms:
                fd.STEP_PDL = flag
                ms[flag].append(step_ms(model, context, iters=100))
        fd.STEP_PDL = keep
        row = [kind, context, floor_ms(model, context), ms[False], ms[True]]
        log["step"].append(row)
        print(f"{kind} {context}: floor {row[2]:.4f} ms; step plain "
              + "/".join(f"{t:.4f}" for t in ms[False]) + ", under PDL "
              + "/".join(f"{t:.4f}" for t in ms[True]), flush=True)
        del model
        torch.cuda.empty_cache()
    json.dump(log, open(out, "w"), indent=1)

if "attention-pdl" in sys.argv:
    # why the split attention loses inside the teacher's step at 32K+ but not alone: the same
    # step with its two kernels launched plainly (no early launch) beside PDL and SDPA
    teacher, attend = bench.build(cfg, "teacher", dev, torch.bfloat16), fd.attend
    plain = lambda q, k, v, pos, H, pdl=False: attend(q, k, v, pos, H, False)
    for context in [int(c) for c in os.environ.get("CONTEXTS", "1024,8192,32768").split(",")]:
        row = []
        for way, fn in (("sdpa", attend), ("split", attend), ("split, plain launch", plain)):
            fd.ATTENTION, fd.SPLIT_KEYS, fd.attend = way.split(",")[0], 1 << 40, fn
            row.append(f"{way} {step_ms(teacher, context, iters=100):.4f}")
        fd.attend = attend
        print(f"teacher step at {context}: " + ", ".join(row) + " ms", flush=True)

if "kernels" in sys.argv:
    # one graph-replayed step kernel by kernel, in order: each kernel's time and the idle gap
    # before it (the boundary's cost), for a middle layer and summed over the step
    from torch.profiler import ProfilerActivity, profile
    for kind, context, pdl in (("linear", 1024, None), ("teacher", 1024, None),
                               ("linear", 1024, False), ("teacher", 1024, False)):
        model = bench.build(cfg, kind, dev, torch.bfloat16)
        dec = fd.Decoder(model)
        dec.pdl = dec.pdl if pdl is None else pdl                  # False: each kernel alone
        cache = random_caches([model], context + 1, context)[0]
        def step():
            cache.pos = context
            return dec.step(tok, cache)
        graph, _ = bench.capture(step)
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
        ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
        n = len(ev) // 3
        ev = ev[n:2 * n]                                            # the middle replay
        gaps = [0.0] + [b.time_range.start - a.time_range.end for a, b in zip(ev, ev[1:])]
        busy = sum(e.time_range.elapsed_us() for e in ev)
        wall = ev[-1].time_range.end - ev[0].time_range.start
        print(f"{kind} {context}{'' if pdl is None else ', PDL off'}: {n} kernels a step, "
              f"{wall:.0f} us first to last, busy {busy:.0f} us, gaps {sum(gaps[1:]):.0f} us "
              f"(negative: overlap under PDL), floor {floor_ms(model, context) * 1e3:.0f} us")
        per = n // cfg.n_layer
        for e, g in list(zip(ev, gaps))[per * 16:per * 17] + list(zip(ev, gaps))[-2:]:
            print(f"  {e.name[:40]:40s} {e.time_range.elapsed_us():7.2f} us, gap before {g:6.2f}")
        by = {}
        for e, g in zip(ev, gaps):
            t = by.setdefault(e.name[:40], [0, 0.0, 0.0])
            t[0] += 1; t[1] += e.time_range.elapsed_us(); t[2] += g
        for name, (c, t, g) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            print(f"  all {name:40s} {c:4d}x {t:8.1f} us, gaps before them {g:7.1f} us")
        del model, dec, cache, graph
        torch.cuda.empty_cache()
