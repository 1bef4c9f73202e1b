#!/usr/bin/env bash
# RCPA on Qwen2.5-VL-72B: 4 nodes x 8 GPUs, one task per node (srun) launching torchrun.
#
#   sbatch examples/rcpa_70b.sh                 # submit (set the paths below or export them first)
#   DRY_RUN=1 bash examples/rcpa_70b.sh         # print the resolved torchrun command, no Slurm needed
#
# Layout: TP=8 x PP=4 = 32 GPUs per model replica (DP = nodes*8/32 = 1 here; add nodes in multiples of 4
# for data parallelism).
#   - TP=8 keeps tensor parallelism inside a node's NVLink domain (all-reduces every layer). 64 query heads
#     and 8 KV heads divide by 8.
#   - PP=4 across nodes: 80 decoder layers -> 20 per stage; only activations cross the (slower) inter-node
#     fabric, once per micro-batch per stage boundary.
#   - Memory per GPU, bf16 weights + fp32 Adam states with the distributed optimizer: 72.7e9 params x
#     (2 + 4 + 4 + 4 bytes) / 32 GPUs ~ 32 GB, plus activations and the KV cache for rollouts; a frozen
#     reference (only when rcpa.loss.beta > 0) adds 2 bytes/param / 32 ~ 4.5 GB.
#   - The vision tower (675M) sits on the first stage, replicated over TP.
# Resume on requeue: the job asks Slurm to requeue it shortly before its time limit (or on preemption) and
# run.resume=auto continues from the newest complete checkpoint in OUTPUT_DIR.
#SBATCH --job-name=rcpa-qwen2.5-vl-72b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# ----------------------------------------------------------------------------------------------- paths
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CONFIG=${CONFIG:-$REPO_DIR/examples/configs/qwen2_5_vl_72b.yaml}
CHECKPOINT=${CHECKPOINT:-/checkpoints/qwen2_5_vl_72b_megatron}   # tools/convert_hf_to_megatron.py output
DATA=${DATA:-/data/geo170k/train.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-/runs/rcpa_qwen2_5_vl_72b}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-/images/megatron_rcpa.sqsh}    # built from the repo's Dockerfile
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-/checkpoints:/checkpoints,/data:/data,/runs:/runs,$REPO_DIR:$REPO_DIR}
TP=${TP:-8}
PP=${PP:-4}
EXTRA_ARGS=${EXTRA_ARGS:-}

# ------------------------------------------------------------------------------------------- topology
NNODES=${SLURM_JOB_NUM_NODES:-4}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${SLURM_JOB_ID:-dryrun}

# ------------------------------------------------------------------------------------------ environment
export CUDA_DEVICE_MAX_CONNECTIONS=1        # megatron: keep TP comm and compute kernels ordered
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a hung collective fails the job instead of stalling it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export WANDB_MODE=${WANDB_MODE:-offline}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

TORCHRUN=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$JOB_ID"
  -m megatron_rcpa.train --config "$CONFIG"
  model.checkpoint="$CHECKPOINT" data.path="$DATA" run.output_dir="$OUTPUT_DIR" run.resume=auto
  parallel.tp="$TP" parallel.pp="$PP" parallel.distributed_optimizer=true model.dtype=bf16)
# shellcheck disable=SC2206
TORCHRUN+=($EXTRA_ARGS)

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${TORCHRUN[@]}"
  echo
  exit 0
fi

mkdir -p logs "$OUTPUT_DIR"
requeue() { echo "time limit near: requeueing $JOB_ID"; scontrol requeue "$JOB_ID"; }
trap requeue USR1

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  --container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS" \
  --container-workdir="$REPO_DIR" --no-container-mount-home \
  "${TORCHRUN[@]}" &
wait $!
