#!/usr/bin/env bash
# RCPA on Qwen2.5-VL-72B: 4 nodes x 8 GPUs, one task per node (srun) launching torchrun.
#
#   cd <repo> && sbatch examples/rcpa_70b.sh    # submit from the repo root (or export REPO_DIR)
#   DRY_RUN=1 bash examples/rcpa_70b.sh         # print the resolved torchrun command, no Slurm needed
#   sbatch examples/rcpa_70b.sh run.steps=100   # trailing key=value overrides (and EXTRA_ARGS) reach the trainer
#
# The log is <submit dir>/<job name>-<job id>.out, appended to across requeues. A subdirectory would have to
# exist before sbatch runs (Slurm opens the file before the script starts; a missing dir fails the job with
# no output at all), so for logs/ use:  mkdir -p logs && sbatch --output=logs/%x-%j.out examples/rcpa_70b.sh
#
# Layout: TP=8 x PP=4 = 32 GPUs per model replica (DP = nodes*8/32 = 1 here; add nodes in multiples of 4
# for data parallelism).
#   - TP=8 keeps tensor parallelism inside a node's NVLink domain (all-reduces every layer). 64 query heads
#     and 8 KV heads divide by 8.
#   - PP=4 across nodes, uneven: 17/21/21/21 decoder layers, because stage 0 also holds the vision tower
#     (0.7B, replicated over TP) and the embedding; only activations cross the (slower) inter-node fabric.
#   - Memory (rcpa-plan, README "Will it fit?"; prompts up to 2048 tokens with a 1280-token image, a 512-token
#     forced prefix, 1024 new tokens): resident 45.6 GiB per GPU on stage 0 (bf16 weights 5.1, fp32 grads
#     10.1, fp32 master + Adam 30.4: with DP=1 the distributed optimizer shards nothing), plus activations
#     with full recompute, sequence parallel and the vision tower's own recompute (28.8), peak 74.4 GiB per
#     GPU: fits an H100-80GB (4.7 GiB headroom) and an H200-141GB. Without recompute the same layout needs
#     ~1.4 TiB on stage 0. A checkpoint with optimizer states is 1.03 TB (run.keep_last=3 keeps 3.1 TB).
# Batch: data.prompts_per_step is the GLOBAL number of prompts per step, over all data-parallel ranks (as in
# NeMo-RL/verl): the config's 64 prompts x rcpa.group_size 8 = 512 rollouts per step, each DP rank generating
# and training on prompts_per_step / DP of the prompts (it must divide by DP), in micro-batches of
# optim.micro_batch_size rollouts. Adding replicas (DP) splits the same batch; it does not grow it.
#
# Save and requeue: Slurm sends USR1 to this script 300 s before the time limit (--signal=B:USR1@300; also
# `scancel --signal=USR1 --batch JOBID` by hand). The trap creates the stop file OUTPUT_DIR/SAVE_AND_EXIT
# (the trainer's run.stop_file; torchrun would die of a forwarded USR1, so the signal is not forwarded): the
# trainer finishes its step, saves, exits 0; then this script requeues the job, and the rerun's
# run.resume=auto continues from that checkpoint. A run that ends without a USR1 is not requeued.
#
# Everything is an environment override (defaults below); for a CPU smoke run without GPUs or a container:
#   NPROC_PER_NODE=1 TP=1 PP=1 CHECKPOINT= DATA= CONFIG=examples/configs/tiny_cpu.yaml \
#     sbatch --nodes=1 --cpus-per-task=2 examples/rcpa_70b.sh model.tiny=true model.dtype=fp32 \
#     parallel.distributed_optimizer=false
#SBATCH --job-name=rcpa-qwen2.5-vl-72b
#SBATCH --nodes=4
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

# ----------------------------------------------------------------------------------------------- paths
# sbatch runs a spool copy of this file (BASH_SOURCE is <spool>/jobNNNN/slurm_script), so under Slurm the
# repository is the directory sbatch was run from; REPO_DIR, when set, wins.
if [[ -z "${REPO_DIR:-}" ]]; then
  if [[ -n "${SLURM_SUBMIT_DIR:-}" ]]; then
    REPO_DIR=$SLURM_SUBMIT_DIR
  else
    REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  fi
fi
if [[ ! -f "$REPO_DIR/megatron_rcpa/train/__main__.py" ]]; then
  echo "rcpa_70b.sh: REPO_DIR=$REPO_DIR is not the megatron_rcpa repository (no megatron_rcpa/train/__main__.py):" \
    "run sbatch from the repository root or export REPO_DIR=<repo>" >&2
  exit 2
fi
abspath() { if [[ "$1" == /* ]]; then echo "$1"; else echo "$REPO_DIR/$1"; fi; }  # relative = to REPO_DIR
CONFIG=$(abspath "${CONFIG:-examples/configs/qwen2_5_vl_72b.yaml}")
CHECKPOINT=${CHECKPOINT-/checkpoints/qwen2_5_vl_72b_megatron}  # tools/convert_hf_to_megatron.py output; empty: none
DATA=${DATA-/data/geo170k/train.jsonl}                         # empty: the config's data (e.g. synthetic)
OUTPUT_DIR=$(abspath "${OUTPUT_DIR:-/runs/rcpa_qwen2_5_vl_72b}")
STOP_FILE=$OUTPUT_DIR/SAVE_AND_EXIT                            # the trainer's run.stop_file (USR1 trap)
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}   # e.g. /images/megatron_rcpa.sqsh from the Dockerfile (pyxis); empty: host
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-/checkpoints:/checkpoints,/data:/data,/runs:/runs,$REPO_DIR:$REPO_DIR}
TP=${TP:-8}
PP=${PP:-4}
EXTRA_ARGS=${EXTRA_ARGS:-}

# ------------------------------------------------------------------------------------------- topology
NNODES=${SLURM_JOB_NUM_NODES:-4}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}   # torchrun processes per node (one per GPU)
WORLD=$((NNODES * NPROC_PER_NODE))
if (( WORLD % (TP * PP) != 0 )); then
  echo "rcpa_70b.sh: $NNODES nodes x $NPROC_PER_NODE processes = $WORLD ranks do not divide by TP=$TP x PP=$PP" >&2
  exit 2
fi
echo "layout: $NNODES nodes x $NPROC_PER_NODE = $WORLD ranks = TP $TP x PP $PP x DP $((WORLD / (TP * PP)))" >&2
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # not head: SIGPIPE + pipefail
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
# Triton compiles into ~/.triton by default, a home directory shared by all nodes on most clusters: give each
# node its own cache (node-local /tmp; the node name keeps a shared TRITON_CACHE_ROOT safe too).
export TRITON_CACHE_ROOT=${TRITON_CACHE_ROOT:-/tmp/${USER:-rcpa}-triton-$JOB_ID}

TORCHRUN=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$JOB_ID"
  -m megatron_rcpa.train --config "$CONFIG")
[[ -n "$CHECKPOINT" ]] && TORCHRUN+=(model.checkpoint="$CHECKPOINT")
[[ -n "$DATA" ]] && TORCHRUN+=(data.path="$DATA")
TORCHRUN+=(run.output_dir="$OUTPUT_DIR" run.resume=auto run.stop_file="$STOP_FILE"
  parallel.tp="$TP" parallel.pp="$PP" parallel.distributed_optimizer=true model.dtype=bf16)
# shellcheck disable=SC2206
TORCHRUN+=($EXTRA_ARGS "$@")   # later overrides win

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${TORCHRUN[@]}"
  echo
  exit 0
fi

# ------------------------------------------------------------------------------------------------ launch
SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
# Slurm 22.05-23.02 do not pass the job's --cpus-per-task on to srun: without it every rank shares one CPU.
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
if [[ -n "$CONTAINER_IMAGE" ]]; then   # pyxis/enroot
  SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS"
    --container-workdir="$REPO_DIR" --no-container-mount-home)
else
  SRUN+=(--chdir="$REPO_DIR")
fi
# On each node: its own Triton cache, then torchrun.
# shellcheck disable=SC2016
NODE_LAUNCH=(bash -c 'export TRITON_CACHE_DIR="$TRITON_CACHE_ROOT/${SLURMD_NODENAME:-$HOSTNAME}";'\
' mkdir -p "$TRITON_CACHE_DIR" && exec "$@"' rcpa-node)

mkdir -p "$OUTPUT_DIR"
rm -f "$STOP_FILE"   # left by the run before a requeue; it would stop this one at once
echo "job $JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $HOSTNAME: output $OUTPUT_DIR"
stop_requested=0
interrupted=0
on_usr1() {
  stop_requested=1 interrupted=1
  echo "USR1 (time limit near or preemption): asking the trainer to save and exit ($STOP_FILE)"
  touch "$STOP_FILE"
}
trap on_usr1 USR1

"${SRUN[@]}" "${NODE_LAUNCH[@]}" "${TORCHRUN[@]}" &
srun_pid=$!
# `wait` returns early (status > 128) when the trap runs; wait again until srun itself has ended (a second
# `wait` on a srun that has already ended returns its exit status).
while :; do
  interrupted=0 rc=0
  wait "$srun_pid" || rc=$?
  (( interrupted )) || break
done
trap - USR1
if (( stop_requested )); then
  echo "training step ended (exit $rc) after a stop request: requeueing job $JOB_ID"
  scontrol requeue "$JOB_ID"
fi
exit "$rc"
