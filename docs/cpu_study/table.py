"""The study's tables (docs/cpu_study.md) from run.sh's result files, one row per model:

    python docs/cpu_study/table.py docs/cpu_study/v2_results.jsonl [--curve]

--curve adds the QA accuracy at each intermediate evaluation (sweep.py --curve N)."""
import json
import sys

rows = [json.loads(line) for f in sys.argv[1:] if f != "--curve" for line in open(f)]
curve = "--curve" in sys.argv
print("| run | model | QA | caption loss | train s | color | count | exists | shape | size "
      "| where |" + (" QA along the way |" if curve else ""))
print("|---" * (11 + curve) + "|")
for d in sorted(rows, key=lambda d: d["name"]):
    for r in d["rows"]:
        by = " | ".join(f"{v:.2f}" for v in r["qa_by_template"].values())
        along = " ".join(f"{c['qa']:.2f}" for c in d.get("curve", [])) if r["stage"] == 0 else ""
        print(f"| {d['name']} | {r['model']} {r['stage']} | {r['qa_accuracy']:.3f} | "
              f"{r['caption_loss']:.3f} | {r['train_s']:.0f} | {by} |"
              + (f" {along} |" if curve else ""))
