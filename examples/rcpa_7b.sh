#!/usr/bin/env bash
# RCPA on Qwen2.5-VL-7B on one node of 8 GPUs: TP=2 (28 query / 4 KV heads divide by 2; 7B fits two GPUs
# with bf16 weights and the distributed optimizer) x PP=1 x DP=4. Batch: data.prompts_per_step is global,
# the config's 64 prompts x group 8 = 512 rollouts per step, 16 prompts (128 rollouts) on each DP rank.
# Same knobs, log, save-and-requeue and environment overrides as rcpa_70b.sh, which this script runs.
#
#   cd <repo> && sbatch examples/rcpa_7b.sh     # submit from the repo root (or export REPO_DIR)
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
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
# sbatch runs a spool copy of this file: under Slurm the repository is the directory sbatch was run from.
if [[ -z "${REPO_DIR:-}" ]]; then
  if [[ -n "${SLURM_SUBMIT_DIR:-}" ]]; then
    REPO_DIR=$SLURM_SUBMIT_DIR
  else
    REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  fi
fi
if [[ ! -f "$REPO_DIR/examples/rcpa_70b.sh" ]]; then
  echo "rcpa_7b.sh: REPO_DIR=$REPO_DIR is not the megatron_rcpa repository (no examples/rcpa_70b.sh):" \
    "run sbatch from the repository root or export REPO_DIR=<repo>" >&2
  exit 2
fi
export REPO_DIR
export CONFIG=${CONFIG:-examples/configs/qwen2_5_vl_7b.yaml}
export CHECKPOINT=${CHECKPOINT-/checkpoints/qwen2_5_vl_7b_megatron}
export OUTPUT_DIR=${OUTPUT_DIR:-/runs/rcpa_qwen2_5_vl_7b}
export TP=${TP:-2} PP=${PP:-1}
export SLURM_JOB_NUM_NODES=${SLURM_JOB_NUM_NODES:-1}
# exec: the same process, so Slurm's USR1 for this batch shell reaches rcpa_70b.sh's trap
exec bash "$REPO_DIR/examples/rcpa_70b.sh" "$@"
