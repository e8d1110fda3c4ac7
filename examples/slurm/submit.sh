#!/bin/bash
# Submit the training array, then the evaluation-and-report job that waits for it (--dependency=afterok).
#   examples/slurm/submit.sh                     (SUN_SEG_DATA and SUN_SEG_OUT are passed on to both jobs)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p logs
array=$(sbatch --parsable examples/slurm/train-array.sbatch)
array=${array%%;*}   # --parsable prints "jobid" or "jobid;cluster"
report=$(sbatch --parsable --dependency=afterok:"$array" examples/slurm/evaluate-report.sbatch)
echo "training array: $array   evaluation and report (after it): ${report%%;*}"
