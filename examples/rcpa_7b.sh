#!/usr/bin/env bash
# RCPA on Qwen2.5-VL-7B on one node of 8 GPUs: TP=2 (28 query / 4 KV heads divide by 2; 7B fits two GPUs
# with bf16 weights and the distributed optimizer) x PP=1 x DP=4. Same knobs as rcpa_70b.sh.
#
#   sbatch examples/rcpa_7b.sh
#   DRY_RUN=1 bash examples/rcpa_7b.sh          # print the resolved torchrun command
#SBATCH --job-name=rcpa-qwen2.5-vl-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export REPO_DIR
export CONFIG=${CONFIG:-$REPO_DIR/examples/configs/qwen2_5_vl_7b.yaml}
export CHECKPOINT=${CHECKPOINT:-/checkpoints/qwen2_5_vl_7b_megatron}
export OUTPUT_DIR=${OUTPUT_DIR:-/runs/rcpa_qwen2_5_vl_7b}
export TP=${TP:-2} PP=${PP:-1}
export SLURM_JOB_NUM_NODES=${SLURM_JOB_NUM_NODES:-1}
exec bash "$REPO_DIR/examples/rcpa_70b.sh"
