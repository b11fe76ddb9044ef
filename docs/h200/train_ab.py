"""The paper-preset training step (`bench.py train --ways compiled`) under two settings of the
scan's backward, one after the other in one process: v10's (chunks of 64, 4 warps) and v9's
(chunks of 128, 8 warps). The step's other kernels are the same, so the difference is the scan's.

    python docs/h200/train_ab.py OUT_DIR v10 v9

Raw output: docs/h200/train_ab_10.log. The second run's stage-1 peak memory includes what the
first left cached; its times do not depend on that."""
import os
import sys
import time

sys.path.insert(0, os.getcwd())
import bench                                                    # noqa: E402
import scan_fast as sf                                          # noqa: E402

SETTINGS = {"v10": (64, {2: 4, 4: 8}), "v9": (128, {2: 8, 4: 8})}   # BWD_CHUNK, BWD_WARPS
out_dir, names = sys.argv[1], sys.argv[2:]
for name in names:
    sf.BWD_CHUNK, sf.BWD_WARPS = SETTINGS[name]
    print(f"== {name}: BWD_CHUNK {sf.BWD_CHUNK}, warps {sf.BWD_WARPS}", flush=True)
    sys.argv = ["bench.py", "train", "--ways", "compiled", "--out-dir", out_dir]
    start = time.time()
    bench.main()
    print(f"== {name} done in {time.time() - start:.0f} s", flush=True)
