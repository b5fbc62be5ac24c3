#!/usr/bin/env bash
# One prepared GPU check, under 10 minutes on one GPU (every step has its own timeout; sum ≤ 560 s).
#   eSEN and GemNet-OC at width 1024 with --precision bf16 (the policy of zoo/models/precision.py:
#   bf16 learned layers, fp32 islands), a few steps under each engine (DeepSpeed ZeRO-2 and FSDP2),
#   printing atoms/s, MFU, peak memory against the planner's estimate, then the bf16 policy's
#   force error and rotation-equivariance error against fp32 (zoo.testing.precision_report).
# Usage (repository root):   bash benchmarks/gpu_check.sh [OUT_DIR]
# Dry run on a CPU host (width 16, same commands and parsing; checks the script, not the GPU):
#                            DRY=1 bash benchmarks/gpu_check.sh [OUT_DIR]
# Measured dry run on the 2-core CPU host: see docs/precision.md.
set -uo pipefail
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [ "${DRY:-0}" = 1 ]; then
  WIDTH=16; DEVICE=cpu; MEM=24GiB; ATOMS=64; MAX_ATOMS=256; RUN_LIMIT=300
  echo "DRY run: CPU, width $WIDTH" | tee "$OUT/gpu.txt"
else
  WIDTH=1024; DEVICE=cuda; ATOMS=256; MAX_ATOMS=1024; RUN_LIMIT=100
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
  MEM=$($PY -c "import torch; print(torch.cuda.get_device_properties(0).total_memory)")
fi
START=$SECONDS
# the final checkpoint also validates on the whole validation split (1,770 structures of the sample):
# give the runs a 16-structure split so that a few steps fit the time limit
VAL="$OUT/val16.aselmdb"
rm -f "$VAL"
timeout 60 $PY - "$VAL" <<'PYEOF'
import sys
import ase.db
src = ase.db.connect("data/omol25_sample/val/data0000.aselmdb")
with ase.db.connect(sys.argv[1], type="aselmdb") as dst:
    for row in src.select(limit=16):
        dst.write(row.toatoms(), data=row.data, key_value_pairs=row.key_value_pairs)
print(f"validation split for the runs: {sys.argv[1]} ({len(dst)} structures)")
PYEOF

for model in esen gemnet-oc; do
  echo "== zoo plan $model width $WIDTH, 1 rank, bf16"
  timeout 45 $PY -m zoo.cli plan --model $model --width $WIDTH --gpus 1 --gpu-memory "$MEM" --precision bf16 \
    --atoms-per-batch $ATOMS | tee "$OUT/plan-$model.txt"
  for engine in deepspeed fsdp; do
    run="$OUT/$model-$engine"
    rm -rf "$run"
    echo "== $model width $WIDTH, --precision bf16, --engine $engine ($MAX_ATOMS atoms, $ATOMS per step; ${RUN_LIMIT} s at most)"
    timeout $RUN_LIMIT $PY -m torch.distributed.run --standalone --nproc_per_node 1 launcher/train.py \
      --model $model --width $WIDTH --precision bf16 --engine $engine --atoms-per-batch $ATOMS \
      --max-atoms $MAX_ATOMS --checkpoint-at 1 --keep-engine-state 1 --val "$VAL" --max-val-structures 16 --log-every 1 \
      --run-dir "$run" > "$run.log" 2>&1
    echo "  exit $? (log: $run.log)"
    $PY - "$run" <<'PYEOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "metrics.jsonl"
if not path.is_file():
    print("  no metrics (see the .log)"); sys.exit()
rows = [json.loads(l) for l in path.read_text().splitlines()]
start = next((r for r in rows if r["kind"] == "start"), {})
train = [r for r in rows if r["kind"] == "train"]
steady = train[1:] or train  # the first step carries start-up costs
end = next((r for r in rows if r["kind"] == "end"), {})
aps = sorted(r["atoms_per_s"] for r in steady)
mfu = sorted(r["mfu"] for r in steady if r.get("mfu") is not None)
peak = end.get("peak_memory_bytes")  # CUDA only, in the end record (a run cut by its timeout has none)
planned = end.get("planned_memory_bytes") or (start.get("memory_plan") or {}).get("estimate_bytes")
print("  precision:", (start.get("precision") or {}).get("compute"), "| steps:", len(train),
      f"| atoms/s median {aps[len(aps)//2]:.0f}" if aps else "| no train records",
      f"| MFU median {100*mfu[len(mfu)//2]:.1f}%" if mfu else "",
      f"| peak {peak/2**30:.2f} GiB vs planned {planned/2**30:.2f} GiB (planned/peak {planned/peak:.2f})"
      if peak and planned else f"| peak {peak} (CUDA only), planned {(planned or 0) / 2**30:.2f} GiB")
PYEOF
  done
done

echo "== bf16 policy against fp32: forces and rotation-equivariance error (width $WIDTH, $DEVICE)"
timeout 90 $PY - "$WIDTH" "$DEVICE" <<'PYEOF'
import sys
import torch
from ase.build import molecule
from zoo.registry import build
from zoo.testing import perturbed, precision_report, random_rotation, water_cluster
width, device = int(sys.argv[1]), sys.argv[2]
atoms = [water_cluster(8, seed=0), perturbed(molecule("C6H6"), 1)]
for name in ("esen", "gemnet-oc"):
    torch.manual_seed(0)
    with torch.device(device):
        model = build(name, width=width)
    model.set_normalization(None, 1.0)
    r = precision_report(model.eval(), atoms, random_rotation(1))
    print(f"  {name}: rotation error fp32 {r['rotation_fp32']:.2e}, bf16 {r['rotation_bf16']:.2e}; "
          f"bf16 forces vs fp32 {r['forces']:.2e} (of max |F|), energy {r['energy_per_atom']:.2e} eV/atom (σ = 1)")
PYEOF
echo "== done in $((SECONDS - START)) s"
