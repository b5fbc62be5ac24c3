#!/bin/bash
# The `paper` scaling study on a SLURM cluster: one array task per run, each run on one node of 8 GPUs.
#
#   OUT=/scratch/$USER/study-paper
#   zoo study --preset paper --out $OUT --dry-run          # the runs, FLOPs and GPU-hours
#   zoo study --preset paper --out $OUT --prepare-only     # once: convert the shards, write $OUT/runs.txt
#   N=$(wc -l < $OUT/runs.txt)
#   sbatch --array=1-$N%8 --export=ALL,OUT=$OUT docker/slurm_study.sh   # at most 8 runs at a time
#   # after the array (any task can be resubmitted: finished runs are skipped, interrupted ones resumed):
#   zoo study --preset paper --out $OUT                     # all runs done → runs.csv, fits, report.md
#
# Each task runs `zoo study --only RUN`, which starts the run with torchrun (8 ranks, the preset's
# `ranks`) or resumes it from its last checkpoint (`launcher/train.py --resume`), and fits nothing.
# Edit the partition, account and time to your cluster; the data paths are the preset's `train`/`val`.
#SBATCH --job-name=zoo-study
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
: "${OUT:?set OUT to the study folder (sbatch --export=ALL,OUT=...)}"
RUN=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$OUT/runs.txt")
[ -n "$RUN" ] || { echo "no run on line $SLURM_ARRAY_TASK_ID of $OUT/runs.txt" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec zoo study --preset paper --out "$OUT" --only "$RUN"
