#!/usr/bin/env bash
# One prepared GPU check (under 10 minutes on one GPU; UNTESTED: no GPU was lent when it was written).
#   eSEN and GemNet-OC at width 1024 in bf16, a few steps under each engine (DeepSpeed ZeRO-2 and
#   FSDP2), printing atoms/s, MFU, peak memory against the planner's estimate, and the equivariance
#   error of the bf16 model against fp32.
# Usage (from the repository root, venv active):  bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
MEM=$($PY -c "import torch; print(torch.cuda.get_device_properties(0).total_memory)")

for model in esen gemnet-oc; do
  echo "== zoo plan $model width 1024, 1 GPU"
  timeout 120 $PY -m zoo.cli plan --model $model --width 1024 --gpus 1 --gpu-memory "$MEM" --precision bf16 \
    | tee "$OUT/plan-$model.txt"
  for engine in deepspeed fsdp; do
    run="$OUT/$model-$engine"
    rm -rf "$run"
    echo "== $model width 1024, bf16, --engine $engine (budget: a few steps)"
    timeout 150 torchrun --nproc_per_node 1 launcher/train.py --model $model --width 1024 --precision bf16 \
      --engine $engine --atoms-per-batch 256 --max-atoms 2048 --checkpoint-fraction 1 --max-val-structures 16 \
      --log-every 1 --run-dir "$run" > "$run.log" 2>&1
    echo "exit $?"
    $PY - "$run" <<'PYEOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "metrics.jsonl"
if not path.is_file():
    print("  no metrics (see the .log)"); sys.exit()
rows = [json.loads(l) for l in path.read_text().splitlines()]
train = [r for r in rows if r["kind"] == "train"][1:] or [r for r in rows if r["kind"] == "train"]
end = next((r for r in rows if r["kind"] == "end"), {})
aps = sorted(r["atoms_per_s"] for r in train)
mfu = sorted(r["mfu"] for r in train if r.get("mfu") is not None)
peak, planned = end.get("peak_memory_bytes"), end.get("planned_memory_bytes")
print(f"  atoms/s median {aps[len(aps)//2]:.0f}" if aps else "  no train records",
      f"MFU median {100*mfu[len(mfu)//2]:.1f}%" if mfu else "",
      f"peak {peak/2**30:.2f} GiB vs planned {planned/2**30:.2f} GiB (ratio {planned/peak:.2f})" if peak and planned else "")
PYEOF
  done
done

echo "== equivariance error, bf16 against fp32 (random rotation, forces rotated back)"
timeout 120 $PY - <<'PYEOF'
import torch
from datapipe.graph import batch_from_atoms
from zoo.registry import build
from zoo.testing import random_rotation, water_cluster
atoms = water_cluster(8, seed=0)
rotation = random_rotation(1)
turned = atoms.copy(); turned.positions = atoms.positions @ rotation.T
for name in ("esen", "gemnet-oc"):
    torch.manual_seed(0)
    model = build(name, width=1024).cuda().eval()
    model.set_normalization(None, 1.0)
    r = torch.as_tensor(rotation, dtype=torch.float32, device="cuda")
    out = {}
    for label, enabled in (("fp32", False), ("bf16", True)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            f0 = model(batch_from_atoms([atoms], cutoff=model.data_cutoff).to("cuda"))["forces"].float()
            f1 = model(batch_from_atoms([turned], cutoff=model.data_cutoff).to("cuda"))["forces"].float()
        out[label] = (f0, float((f1 - f0 @ r.T).abs().max() / f0.abs().max()))
    gap = float((out["bf16"][0] - out["fp32"][0]).abs().max() / out["fp32"][0].abs().max())
    print(f"  {name}: rotation error fp32 {out['fp32'][1]:.2e}, bf16 autocast {out['bf16'][1]:.2e}; "
          f"bf16 forces vs fp32 {gap:.2e} (relative max)")
PYEOF
