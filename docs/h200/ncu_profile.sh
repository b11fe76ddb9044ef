#!/bin/bash
# Nsight Compute over the fast scan's forward kernels and one decoder layer's kernels (the
# third call of each; ncu locks the SM clock at its base, 1.35 GHz on the H200, and runs the
# kernels one at a time, so durations are longer than in a run and PDL overlaps nothing).
# Writes OUT/<name>.txt: the details page, then the warp stall reasons per issued instruction.
# docs/kernel_log.md and docs/bench_log.md (session 17) read them (docs/h200/ncu_17/).
#     bash docs/h200/ncu_profile.sh OUT          # on a GPU, from the repository root
set -e
out=${1:?give an output folder}; mkdir -p "$out"
run() {   # name, kernel regex, launches to skip, launches to profile, ncu_targets.py arguments
  local name=$1 regex=$2 skip=$3 count=$4; shift 4
  timeout 300 ncu --set full -k "regex:$regex" --launch-skip "$skip" --launch-count "$count" \
      -f -o "$out/$name" python docs/h200/ncu_targets.py "$@" > "$out/$name.txt" 2>&1
  ncu -i "$out/$name.ncu-rep" --page details >> "$out/$name.txt"
  echo "## warp stall reasons, cycles per issued instruction" >> "$out/$name.txt"
  ncu -i "$out/$name.ncu-rep" --page raw | grep -E "^ *[_a-z].*\(|stalled_.*per_issue_active" \
      | grep -v "_not_issued" >> "$out/$name.txt" || true
  rm -f "$out/$name.ncu-rep"
  grep -E "^  [_a-z].*\(|Duration|DRAM Throughput|Registers Per|Achieved Occupancy" "$out/$name.txt"
}
run scan_8x2048 _scan_kernel 2 1 scan 8x2048
run scan_1x65536 _scan_kernel 2 1 scan 1x65536
run state_1x65536 _state_kernel 2 1 scan 1x65536
# a step launches 5 kernels a Mamba-2 layer (6 an attention layer) and the LM head; layer 16
# of 32 in the third step
run decode_linear "^_(linear|mamba_in|ssm_step|swiglu)_kernel" $((2 * 161 + 16 * 5)) 5 decode linear
run decode_teacher "^_(linear|qkv|attend|combine|swiglu)_kernel" $((2 * 193 + 16 * 6)) 6 \
    decode teacher
