"""
The paper's ablations (arXiv 2502.13145 Tables 3-6; docs/method.md §8) at small scale: each
table is a few runs from one trained teacher, and a markdown table of what they reach. Each
run is composed here from distill.py's own stage functions (`row`), not by flags of distill.py.

    python distill.py --preset small --out-dir runs/small      # the teacher (and Table 1)
    python ablate.py --table 3 --run-dir runs/small             # which stages run
    python ablate.py --table all --run-dir runs/small --jobs 4  # Tables 3-6, 4 runs at a time
    python ablate.py --table 5 --run-dir runs/small --steps3 100 --name short  # other flags go
                                                                               # to each run
    python ablate.py row --out-dir D --stages 1,3               # one run by hand (see row)

table  question                                         runs
3      which distillation stages run                    --stages 1,2,3 | 1,3 | 2,3 | 3 | none
4      how the new Mamba-2 parameters start (seed.py)   --stages 1,2,3 --init scratch|inherit|mimic
5      how many attention layers the hybrid keeps       --from-stage2 --stages 3 --attn-layers ...
6      where the kept layers sit                        head/tail, stacked/interleaved
Tables 5 and 6 start stage 3 from one shared stage-2 student: RUN_DIR's, or one trained once
under RUN_DIR/ablate/shared. Each run is a process of its own writing to
RUN_DIR/ablate/t{N}-{row}/ (the teacher is a link; --name picks another folder than ablate/);
a finished run is not repeated; the table goes to RUN_DIR/ablate/table{N}.md.
A GPU runs a small-preset stage far from full, so --jobs 4 takes about a third of the time.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

import distill
import evaluate
from seed import make_hybrid
from session import open_run
from util import ArgumentParser, InputError, load_checkpoint, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))

# the paper's numbers for each row (MME / POPE / TextVQA / SQA-I), arXiv 2502.13145 Tables 3-6
PAPER = {
    3: {"none": "NaN", "1": "969.8 / 70.6 / 13.5 / 40.8", "2": "1007.1 / 72.9 / 25.5 / 52.1",
        "3": "1188.4 / 83.0 / 40.0 / 63.4", "1+2": "1108.9 / 75.3 / 28.0 / 59.3",
        "1+3": "1263.1 / 84.0 / 42.5 / 77.1", "2+3": "1255.5 / 83.5 / 41.1 / 72.1",
        "1+2+3": "1303.5 / 85.2 / 47.7 / 79.2"},
    4: {"scratch": "1214.0 / 83.1 / 40.0 / 67.4", "inherit": "1222.6 / 84.0 / 41.9 / 73.3",
        "mimic": "1303.5 / 85.2 / 47.7 / 79.2"},
    5: {0: "1303.5 / 85.2 / 47.7 / 79.2 (0 of 32)", 1: "1304.3 / 85.5 / 48.0 / 79.3 (1 of 32)",
        2: "1318.4 / 86.3 / 48.4 / 79.9 (2 of 32)", 4: "1329.1 / 86.8 / 51.5 / 82.8 (4 of 32)",
        8: "1371.1 / 86.7 / 55.1 / 86.9 (8 of 32)",
        "teacher": "1433.5 / 87.6 / 66.0 / 94.8 (32 of 32)"},
    6: {"tail-stacked": "1305.5 / 85.9 / 53.7 / 79.4",
        "head-stacked": "1329.4 / 85.9 / 55.0 / 80.8",
        "tail-interleaved": "1308.3 / 86.1 / 55.0 / 86.5",
        "head-interleaved": "1371.1 / 86.7 / 55.1 / 86.9"},
}
TITLES = {3: "Table 3: which distillation stages run (linear student)",
          4: "Table 4: initialisation of the new Mamba-2 parameters (linear student, stages 1+2+3)",
          5: "Table 5: number of kept attention layers (hybrid, stage 3 from one stage-2 student)",
          6: "Table 6: placement of the kept attention layers "
             "(hybrid, stage 3 from one stage-2 student)"}


def layout(n, attn):
    return "".join("A" if i in attn else "M" for i in range(n))


def plan(table, n):
    """-> runs [(name, flags of `row`, needs the shared stage-2 student)] and rows
    [(label, paper key, which record: a function of a results.json record)]."""
    linear, stage3 = "M" * n, ["--from-stage2", "--stages", "3"]
    if table == 3:
        runs = [(s.replace(",", ""), ["--stages", s], False)
                for s in ("1,2,3", "1,3", "2,3", "3", "none")]
        rows = [(s, s, lambda r, s=s: r["stages"] == s and r["layout"] == linear)
                for s in ("none", "1", "2", "3", "1+2", "1+3", "2+3", "1+2+3")]
    elif table == 4:
        names = {"scratch": "scratch", "inherit": "inherit Q, K, V", "mimic": "inherit + mimic"}
        runs = [(i, ["--stages", "1,2,3", "--init", i], False) for i in names]
        rows = [(label, i, lambda r, i=i: r["init"] == i and r["stages"] == "1+2+3"
                 and r["layout"] == linear) for i, label in names.items()]
    elif table == 5:     # the paper's 0, 1, 2, 4, 8 of 32; ours 0, 1, 2, 4 of 8 (2: the hybrid)
        counts = [k for k in (0, 1, 2, 4, 8) if k <= n // 2]
        kept = {k: list(range(0, n, n // k)) if k else [] for k in counts}
        flags = {k: ["--attn-layers", ",".join(map(str, kept[k]))] if k else [] for k in counts}
        runs = [(f"{k}of{n}", stage3 + flags[k], True) for k in counts]
        rows = [(f"{k} of {n}: {layout(n, kept[k])}", k * 32 // n,    # the paper's row: same share
                 lambda r, L=layout(n, kept[k]): r["layout"] == L and r["stage"] == 3)
                for k in counts]
        rows.append((f"{n} of {n}: the teacher", "teacher", lambda r: r["model"] == "teacher"))
    elif table == 6:     # where n // 4 kept layers sit (the paper's 8 of 32)
        k, step = n // 4, 4
        places = {"head-stacked": range(k), "tail-stacked": range(n - k, n),
                  "head-interleaved": range(0, n, step),
                  "tail-interleaved": range(step - 1, n, step)}
        runs = [(p, stage3 + ["--attn-layers", ",".join(map(str, L))], True)
                for p, L in places.items()]
        rows = [(f"{p}: {layout(n, L)}", p,
                 lambda r, L=layout(n, L): r["layout"] == L and r["stage"] == 3)
                for p, L in places.items()]
    return runs, rows


# -----------------------------------------------------------------------------
# one run: distill.py's stage functions, composed


def parse_stages(text):
    """'1,3' -> [1, 3]; 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    try:
        stages = [int(s) for s in text.split(",")]
    except ValueError:
        stages = None
    if not stages or stages != sorted(set(stages)) or not set(stages) <= {1, 2, 3}:
        raise InputError(f"--stages {text!r}: give distillation stages in order, e.g. 1,3 or "
                         "2,3 or 3, or 'none'")
    return stages


def row_args(argv):
    ap = distill.make_parser()
    ap.prog, ap.description = "ablate.py row", "One ablation run (see ablate.row)."
    ap.add_argument("--stages", required=True, help="distillation stages to run, e.g. 1,3, or none")
    ap.add_argument("--from-stage2", action="store_true",
                    help="stage 3 starts from OUT/stage2_linear.pt, not the seeded student")
    args = distill.check_args(ap.parse_args(argv))
    args.stages = parse_stages(args.stages)
    if args.from_stage2 and args.stages != [3]:
        raise InputError("--from-stage2 goes with --stages 3: the stage after stage 2")
    return args


def row(argv):
    """One run of a table, composed from distill.py's own functions: the stages of --stages in
    order, each from the student the one before it left. The first starts from the freshly
    seeded student (--init), or with --from-stage2 from OUT/stage2_linear.pt; 'none' evaluates
    the seeded student as it is. With --attn-layers, stage 3 trains that hybrid."""
    args = row_args(argv)
    torch.manual_seed(args.seed)
    with open_run(args) as run:
        teacher = distill.load_teacher(run, trains_teacher=False)
        hybrid = distill.hybrid_of(args, run.cfg.n_layer) if args.attn_layers is not None else None
        distill.load_data(run)
        evaluate.report_teacher(run, teacher)
        student = distill.load_student(run, 2) if args.from_stage2 else distill.seeded(run, teacher)
        made = ["1", "2"] if args.from_stage2 else []           # the stages behind `student`
        if not args.stages:
            evaluate.report(run, None, "linear", student, 0, stages="none")
        for stage in args.stages:
            made.append(str(stage))
            kind = "hybrid" if stage == 3 and hybrid else "linear"
            model = make_hybrid(student, teacher, hybrid) if kind == "hybrid" else student
            student, secs = distill.train_stage(run, stage, kind, model, teacher)
            evaluate.report(run, stage, kind, student, secs, stages="+".join(made))


# -----------------------------------------------------------------------------
# the tables: runs in processes of their own, then one markdown table


def link(src, dst):
    if not os.path.exists(dst):
        try:
            os.symlink(os.path.abspath(src), dst)
        except OSError:                                             # no symlinks here: copy
            shutil.copy(src, dst)


def new_run_dir(d, run_dir, stage2=None):
    """A run's folder: links to the teacher (and the shared stage-2 student), and the
    teacher's record from RUN_DIR/results.json, so that no run evaluates the teacher again."""
    os.makedirs(d, exist_ok=True)
    link(os.path.join(run_dir, "stage0_teacher.pt"), os.path.join(d, "stage0_teacher.pt"))
    if stage2:
        link(stage2, os.path.join(d, "stage2_linear.pt"))
    teacher = [r for r in evaluate.read_results(run_dir) if r["model"] == "teacher"][-1:]
    if teacher and not os.path.exists(os.path.join(d, "results.json")):
        evaluate.write_json(os.path.join(d, "results.json"), teacher)


def launch(out_dir, flags, extra, log):
    """One run (`row`) in a process of its own, its output in `log`. Returns its error or None."""
    marker, asked = os.path.join(out_dir, "finished"), " ".join([*flags, *extra])
    if os.path.exists(marker):                  # done before: fine if with the same flags
        with open(marker) as f:
            before = f.read()
        if before != asked:
            return (f"{out_dir} was run with '{before}', not '{asked}': pick another --name "
                    "for these runs, or delete that folder")
        return None
    cmd = [sys.executable, os.path.join(HERE, "ablate.py"), "row", "--out-dir", out_dir,
           "--resume", *flags, *extra]
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log) as f:
            last = [line for line in f.read().splitlines() if line.strip()][-1:] or ["?"]
        return f"{' '.join(cmd[1:])} failed: {last[0]} (all of it in {log})"
    with open(marker, "w") as f:
        f.write(asked)
    return None


def shared_stage2(run_dir, name, extra):
    """The stage-2 student Tables 5 and 6 start from: RUN_DIR's, or trained once here."""
    own = os.path.join(run_dir, "stage2_linear.pt")
    if os.path.exists(own) and load_checkpoint(own).get("done"):
        return own
    shared = os.path.join(run_dir, name, "shared")
    new_run_dir(shared, run_dir)
    print(f"no finished {own}: training the shared stage-2 student in {shared}")
    err = launch(shared, ["--stages", "1,2"], extra, os.path.join(shared, "log.txt"))
    if err:
        raise InputError(err)
    return os.path.join(shared, "stage2_linear.pt")


def run_table(table, args, extra, n):
    t0 = time.time()
    runs, rows = plan(table, n)
    stage2 = shared_stage2(args.run_dir, args.name, extra) if any(s for _, _, s in runs) else None
    dirs = {}                                   # flags -> folder: identical runs run once
    for name, flags, shared in runs:
        if tuple(flags) not in dirs:
            dirs[tuple(flags)] = d = os.path.join(args.run_dir, args.name, f"t{table}-{name}")
            new_run_dir(d, args.run_dir, stage2 if shared else None)
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = [pool.submit(launch, d, list(flags), extra, os.path.join(d, "log.txt"))
                for flags, d in dirs.items()]
        errors = [e for e in (j.result() for j in tqdm(jobs, desc=f"table {table}", unit="run"))
                  if e]
    if errors:
        raise InputError(errors[0])
    records = []
    for d in dirs.values():
        run = evaluate.read_results(d)
        for r in run:       # training time of a student: all the stages that made it in this run
            chain = (r["stages"] or "").split("+")
            r["train_s"] = sum(x["train_s"] or 0 for x in run
                               if x["stages"] and x["model"] != "teacher"
                               and chain[:len(x["stages"].split("+"))] == x["stages"].split("+")
                               and (x is r or x["layout"] == "M" * n))
        records += run
    teacher = [r for r in records if r["model"] == "teacher"][-1]["qa_accuracy"]
    lines = [f"### {TITLES[table]}", "",
             "| row | QA accuracy | of the teacher | caption loss | train s (its stages) "
             "| paper (MME / POPE / TextVQA / SQA-I) |",
             "|---|---|---|---|---|---|"]
    out = []
    for label, key, match in rows:
        found = [r for r in records if match(r)]
        if not found:
            raise InputError(f"table {table}: no result for row {label!r}; "
                             f"delete {os.path.join(args.run_dir, args.name)} and rerun")
        r = found[-1]
        out.append({"row": label, **r})
        share = f"{r['qa_accuracy'] / teacher:.1%}" if teacher else "-"
        lines.append(f"| {label} | {r['qa_accuracy']:.3f} | {share} | {r['caption_loss']:.3f} | "
                     f"{r['train_s'] or 0:.0f} | {PAPER[table].get(key, '-')} |")
    lines += ["", f"{len(dirs)} runs, {time.time() - t0:.0f} s wall-clock (--jobs {args.jobs}), "
              f"{n}-layer {records[0]['preset']} teacher at {teacher:.3f} QA accuracy", ""]
    text = "\n".join(lines)
    base = os.path.join(args.run_dir, args.name, f"table{table}")
    evaluate.write_json(base + ".json", out)
    with open(base + ".md.tmp", "w") as f:
        f.write(text)
    os.replace(base + ".md.tmp", base + ".md")
    print(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["row"]:
        return row(argv[1:])
    ap = ArgumentParser(description="The paper's ablation tables (3-6), each from one teacher; "
                        "other flags go to each run (distill.py's).")
    add = ap.add_argument
    add("--table", default="all", choices=["3", "4", "5", "6", "all"], help="which table")
    add("--run-dir", default="out", help="a distill.py run's folder: its teacher is used")
    add("--name", default="ablate", help="the folder under --run-dir for these runs")
    add("--jobs", type=int, default=1, help="runs at a time (a GPU fits several small ones)")
    args, extra = ap.parse_known_args(argv)
    row_args(["--stages", "none", *extra])              # a bad flag fails now, not in every run
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: give a positive number")
    teacher = os.path.join(args.run_dir, "stage0_teacher.pt")
    if not os.path.exists(teacher):
        raise InputError(f"{teacher} not found: train a teacher first, e.g. "
                         f"'python distill.py --stage 0 --preset small --out-dir {args.run_dir}'")
    ckpt = load_checkpoint(teacher)
    if ckpt.get("kind") != "teacher" or not ckpt.get("done"):
        raise InputError(f"{teacher} is not a finished teacher: finish it with "
                         f"'python distill.py --stage 0 --resume --out-dir {args.run_dir}'")
    n = ckpt["config"]["n_layer"]
    if n < 4 or n % 4:
        raise InputError(f"the teacher has {n} layers: the ablations need a multiple of 4 "
                         "(tiny and small presets)")
    for table in ([3, 4, 5, 6] if args.table == "all" else [int(args.table)]):
        run_table(table, args, extra, n)


if __name__ == "__main__":
    run_cli(main)
