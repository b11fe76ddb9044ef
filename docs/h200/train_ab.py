"""The paper-preset training step (`bench.py train --ways compiled`) under several settings, one
after the other in one process (the same host, so the differences are the settings'):

    v10          the scan's backward in chunks of 64 with 4 warps (scan_fast's settings now)
    v9           ... in chunks of 128 with 8 warps
    rope-inline  RoPE compiled whole, its angles inside the kernel (before session 11: a sine
                 and a cosine per element of q and k)
    now          the code as it is

    python docs/h200/train_ab.py OUT_DIR now rope-inline [-- --profile]

Arguments after `--` go to bench.py. Raw output: docs/h200/train_ab_10.log (v10 v9),
docs/h200/train_ab_11.log (now rope-inline). The second run's stage-1 peak memory includes what
the first left cached; its times do not depend on that."""
import os
import sys
import time

sys.path.insert(0, os.getcwd())
import torch                                                    # noqa: E402

import bench                                                    # noqa: E402
import mmmamba                                                  # noqa: E402
import scan_fast as sf                                          # noqa: E402
import train_fast                                               # noqa: E402

BACKWARD = {"v10": (64, {2: 4, 4: 8}), "v9": (128, {2: 8, 4: 8})}   # BWD_CHUNK, BWD_WARPS
FUSE, ROPE, ROTATE = train_fast.fuse_elementwise, mmmamba.rope, mmmamba.rotate


def rope_inline(models):
    """fuse_elementwise, then RoPE as it was compiled before: angles and rotation in one graph."""
    undo = FUSE(models)
    mmmamba.rope = torch.compile(lambda x, pos, theta: ROTATE(x, *mmmamba.angles(
        x.shape[-2], x.shape[-1], pos, theta, torch.float32, x.device)))

    def undo_both():
        undo()
        mmmamba.rope = ROPE
    return undo_both


args = sys.argv[1:]
extra = args[args.index("--") + 1:] if "--" in args else []
out_dir, names = args[0], args[1:args.index("--")] if "--" in args else args[1:]
for name in names:
    if name not in ("now", "rope-inline", *BACKWARD):
        sys.exit(f"{name}: choose from now, rope-inline, {', '.join(BACKWARD)}")
for name in names:
    sf.BWD_CHUNK, sf.BWD_WARPS = BACKWARD.get(name, BACKWARD["v10"])
    train_fast.fuse_elementwise = rope_inline if name == "rope-inline" else FUSE
    print(f"== {name}: BWD_CHUNK {sf.BWD_CHUNK}, warps {sf.BWD_WARPS}, "
          f"{train_fast.fuse_elementwise.__name__}", flush=True)
    sys.argv = ["bench.py", "train", "--ways", "compiled", "--out-dir", out_dir] + extra
    start = time.time()
    bench.main()
    print(f"== {name} done in {time.time() - start:.0f} s", flush=True)
