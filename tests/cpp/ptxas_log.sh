#!/usr/bin/env bash
# CUDA compiler launcher of the CMake kernel build: runs one nvcc command and keeps its stderr
# (the ptxas -v resource report) in <object>.ptxas.log for tests/cpp/ptxas_gate.py. Passes
# everything except the report's info lines through to the build log; keeps nvcc's exit code.
out=""
prev=""
for arg in "$@"; do
  if [[ "$prev" == "-o" ]]; then out="$arg"; fi
  prev="$arg"
done
log="${out:-nvcc}.ptxas.log"
"$@" 2>"$log"
rc=$?
grep -v -E '^ptxas info|^    [0-9]+ bytes stack frame' "$log" >&2
exit $rc
