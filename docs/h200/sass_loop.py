"""The fast scan's forward kernel compiled for an H100/H200 (sm_90) without a GPU, through the
ptxas and cuobjdump that ship with triton: its registers, spill stack and shared memory, and
the machine instructions of one trip through its loop over chunks (what docs/kernel_log.md's
session-17 profile counts; Nsight Compute measured ~1170 issued per warp per chunk).

    python docs/h200/sass_loop.py [scan_fast.py or a variant of it]    # any machine
"""
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

path = sys.argv[1] if len(sys.argv) > 1 else "scan_fast.py"
spec = importlib.util.spec_from_file_location("scan_variant", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
cfg, fn = mod.FWD_CONFIG, mod._scan_kernel
Q, BP, BN = cfg["Q"], cfg["BP"], 128                  # the mmMamba shape: P = N = 128, bf16
sig = {a: "i32" for a in fn.arg_names}
for a, block in (("x_ptr", BP), ("B_ptr", BN), ("C_ptr", BN), ("y_ptr", BP)):
    sig[a] = f"tensordesc<bf16[1,{Q},{block}]>"
sig.update(dc_ptr="*fp32", s_ptr="*fp32", final_ptr="*fp32", sb_ptr="*bf16")
consts = dict(Q=Q, BP=BP, BN=BN, HAS_STATE=True, TMA=True)
sig.update({k: "constexpr" for k in consts})
kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 128),
                        options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(kernel.asm["cubin"])
    f.flush()
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                           text=True).stdout
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
print(path, next(l.strip() for l in usage.splitlines() if "REG:" in l), "smem",
      kernel.metadata.shared)

ins = [(int(m.group(1), 16), m.group(2)) for m in
       (re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", l) for l in sass.splitlines()) if m]


def target(text):
    return int(re.search(r"0x([0-9a-f]+)", text.split("BRA")[1]).group(1), 16)


# the loop: the longest conditional branch backwards; inside it, the longest conditional
# branch forwards that stays inside skips the states stored for the backward (nb = 0 here)
branches = [(a, target(t)) for a, t in ins if "BRA" in t and t.startswith("@")]
end, start = max(((a, b) for a, b in branches if b < a), key=lambda ab: ab[0] - ab[1])
inner = [(a, b) for a, b in branches if start <= a < b <= end]
skip = max(inner, key=lambda ab: ab[1] - ab[0]) if inner else (0, 0)
body = [t for a, t in ins if start <= a <= end and not skip[0] < a < skip[1]]
ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
print(f"loop body {len(body)} instructions a warp a chunk:",
      ", ".join(f"{k} {v}" for k, v in ops.most_common(24)))
