#!/usr/bin/env bash
# Every pending GPU check and benchmark in ONE device call (~8 minutes), from the repository root:
#
#     bash bench/fetch_gpu_wheels.sh          # HERE, once: fills .whl/ and prints the run call below
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=570)
#
# Options:
#     --dry-run            print each item's command (and its time limit) without running anything; no GPU needed
#     --only A,B           run only these items (prepare is added when a profile needs it)
#     --prepare-only DIR   only write the profiles' inputs (architecture checkpoints with a synthetic tokenizer,
#                          YAML configs) into DIR; runs on a CPU (tests/bench/test_gpu_session.py does)
#     --fp8                also run the optional FP8 section (off by default; see below)
#     --budget S           total seconds for the items (default 480; GPU_SESSION_BUDGET_S)
#     --no-setup           skip the wheel install and the GPU check (items then run where they are: a CPU test of
#                          the runner itself, with --only; card name CARD, default "nosetup")
#
# Items, in order of value (each under `timeout`; a failure never stops the run; an item that no longer fits the
# remaining budget is skipped and recorded so):
#   env                   nvidia-smi, python/torch/triton/megatron-core/transformers versions
#   prepare               the 2.2B Qwen2.5-VL architecture (bench/make_arch_checkpoint.py) and issue 17's anchor
#                         (examples/configs/hf/anchor_1_75b_config.json: qwen2 family, 24 layers, hidden 2048,
#                         16 heads / 8 KV groups, vocab 151936 untied, 1.74B) as architecture-only checkpoints,
#                         each with a synthetic word-level tokenizer holding Qwen's special tokens at Qwen's ids
#                         (the device has no network; the profile's prompts are random words anyway)
#   ops_pytest            tests/ops compiled on the GPU (TRITON_INTERPRET unset; test_compile.py runs tests/ops/_compile_sm90.py)
#   bench_rollout         bench/bench_rollout.py: old vs static-shape decode, weight-read floor, graph checks
#   rollout_graph_checks  bench_rollout's graph_checks all true (captured step == eager step: tokens, generator)
#   profile_vl            tools/profile_throughput.py (the trainer's phases) on the 2.2B Qwen2.5-VL architecture,
#                         the settings of bench/results/profile_qwen2_5_vl_1.5b_bf16_H200.json, bf16
#   profile_anchor        the same on the anchor: 16 rollouts of 1920 prompt + 128 new tokens = 2048, micro-batch 4
#   static_decode_pytest  tests/rollout/test_{static_decode,compaction,budget}.py on CUDA (the TP=2 test needs 2 GPUs: deselected)
#   bench_logprob         bench/bench_logprob.py --no-compile (fused log-prob / RCPA loss kernels vs torch eager,
#                         megatron, Liger; the torch.compile rows of results/ stay: compiling takes a minute)
#   fp8_gemm              OPTIONAL (--fp8): bf16 vs FP8 (torch._scaled_mm, rowwise scales) GEMM-only ratio at
#                         hidden 4096/8192 shapes
#   fp8_bench             OPTIONAL (--fp8): bench/bench_fp8.py (torchao wheel in .whl): GEMM-only and FP8-linear
#                         ratios, train step at hidden 4096/8192 bf16 vs FP8, 50-step loss curve bf16 vs FP8
#   profile_anchor_fp8    OPTIONAL (--fp8): profile_anchor with --compare bf16,fp8 --fp8-backend torchao
#
# Results: every file under $OUT (at most 8 come back from the device): the summary
# gpu_session_summary_<card>.json (per item: command, exit code, status, seconds), pytest_ops_<card>.txt,
# bench_rollout_<card>.json, profile_qwen2_5_vl_1.5b_bf16_<card>.json, profile_anchor_1_75b_bf16_<card>.json,
# bench_logprob_<card>.json, gpu_session_<card>.log (the whole console) and gpu_session_<card>.tar.gz (every
# item's log, the PNGs, pytest_static_decode_<card>.txt, bench_logprob_<card>.log, copies of the above).
# Copy them into bench/results/ (bench/README.md, "Running the pending GPU work").
set -uo pipefail

usage() { sed -n 2,16p "$0"; }
DRY_RUN=0
SETUP=1
ONLY=""
PREPARE_DIR=""
FP8=${RUN_FP8:-0}
BUDGET_S=${GPU_SESSION_BUDGET_S:-480}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY=${2:?--only needs a comma list of items}; shift ;;
    --prepare-only) PREPARE_DIR=${2:?--prepare-only needs a folder}; shift ;;
    --fp8) FP8=1 ;;
    --no-setup) SETUP=0 ;;
    --budget) BUDGET_S=${2:?--budget needs seconds}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET_S" in ''|*[!0-9]*) echo "gpu_session.sh: --budget '$BUDGET_S' is not a whole number of seconds" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
ALL_ITEMS=(env prepare ops_pytest bench_rollout rollout_graph_checks profile_vl profile_anchor static_decode_pytest
           bench_logprob fp8_gemm fp8_bench profile_anchor_fp8)
if [ -n "$ONLY" ]; then
  for it in ${ONLY//,/ }; do
    case " ${ALL_ITEMS[*]} " in *" $it "*) ;; *) echo "gpu_session.sh: --only names '$it'; items: ${ALL_ITEMS[*]}" >&2; exit 2 ;; esac
  done
fi

# ------------------------------------------------------------------------------------------ profile inputs
# Writes DIR/arch_vl (2.2B Qwen2.5-VL), DIR/anchor (1.74B qwen2), each with hf_assets/ (tokenizer), and
# DIR/profile_vl.yaml, DIR/profile_anchor.yaml. Cheap (no weights): runs on a CPU too.
prepare_inputs() {
  local dir=$1
  mkdir -p "$dir" || return 1
  "$PY" bench/make_arch_checkpoint.py "$dir/arch_vl" --preset 1.5b || return 1
  "$PY" - "$dir" <<'PY'
import itertools
import json
import os
import string
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_rcpa.convert.checkpoint import ASSETS_DIR, METADATA_FILE, MODEL_DIR, CheckpointMetadata

out = sys.argv[1]
# Qwen2 / Qwen2.5-VL special tokens at their real ids (the VL config's image/video/vision ids point at them)
SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|object_ref_start|>",
            151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
            151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
            151655: "<|image_pad|>", 151656: "<|video_pad|>"}


def write_tokenizer(path, eos):
    """Word-level: every lowercase word of 1-3 letters (what the profiler's synthetic prompts are made of) is one
    token, plus the prompt formats' words; reserved fillers up to Qwen's special tokens."""
    words = ["<unk>", "User", "Assistant", "user", "assistant", ":"]
    for n in (1, 2, 3):
        words += ["".join(t) for t in itertools.product(string.ascii_lowercase, repeat=n)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    for i in range(len(vocab), min(SPECIALS)):
        vocab[f"<|reserved_{i}|>"] = i
    vocab.update({w: i for i, w in SPECIALS.items()})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    extra = [w for w in SPECIALS.values() if w not in (eos, "<|endoftext|>")]
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token=eos, pad_token="<|endoftext|>",
                            additional_special_tokens=extra).save_pretrained(path)


# 1. the 2.2B Qwen2.5-VL architecture (make_arch_checkpoint wrote its metadata): Instruct-style EOS
write_tokenizer(os.path.join(out, "arch_vl", ASSETS_DIR), "<|im_end|>")

# 2. issue 17's anchor shape as a qwen2 text LM
with open(os.path.join("examples", "configs", "hf", "anchor_1_75b_config.json")) as f:
    hf = json.load(f)
anchor = os.path.join(out, "anchor")
os.makedirs(os.path.join(anchor, MODEL_DIR), exist_ok=True)
vocab = hf["vocab_size"]
meta = CheckpointMetadata(family="qwen2", hf_config=hf, dtype="bf16", vocab_size=vocab,
                          padded_vocab_size=-(-vocab // 128) * 128, extra={"architecture_only": True})
with open(os.path.join(anchor, METADATA_FILE), "w") as f:
    f.write(meta.to_json())
write_tokenizer(os.path.join(anchor, ASSETS_DIR), "<|endoftext|>")

# 3. the profiler configs. VL: the last H200 profile's settings (8 prompts x 8 rollouts, 128 new tokens,
# micro-batch 16, 56-pixel images = a 1x4x4 grid, beta 0). Anchor: 4 prompts x 4 rollouts of 1920 + 128 = 2048
# tokens, micro-batch 4 (megatron-core's anchor step: 4 x 2048), beta 0.
configs = {
    "profile_vl.yaml": f"""run: {{output_dir: {out}/run_vl}}
model: {{family: qwen2_5_vl, checkpoint: {out}/arch_vl}}
data: {{prompts_per_step: 8, image_size: 56}}
rollout: {{max_new_tokens: 128}}
optim: {{micro_batch_size: 16}}
rcpa: {{group_size: 8, loss: {{beta: 0.0}}}}
""",
    "profile_anchor.yaml": f"""run: {{output_dir: {out}/run_anchor}}
model: {{family: qwen2, checkpoint: {anchor}}}
data: {{prompts_per_step: 4}}
rollout: {{max_new_tokens: 128}}
optim: {{micro_batch_size: 4}}
rcpa: {{group_size: 4, loss: {{beta: 0.0}}}}
""",
}
for name, text in configs.items():
    with open(os.path.join(out, name), "w") as f:
        f.write(text)
print(json.dumps({"prepared": out, "files": sorted(os.listdir(out))}))
PY
}

if [ -n "$PREPARE_DIR" ]; then
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  prepare_inputs "$PREPARE_DIR"
  exit $?
fi

# ------------------------------------------------------------------------------------------ environment
if [ "$DRY_RUN" = 1 ]; then
  CARD=${CARD:-DRYRUN}
  OUT=${OUT:-$(mktemp -d /tmp/gpu_session_dry.XXXXXX)}
elif [ "$SETUP" = 0 ]; then
  CARD=${CARD:-nosetup}
  OUT=${OUT:-$ROOT/bench/results/local}
else
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_session.sh: no wheels in .whl/ (megatron-core is not on the device): run bash bench/fetch_gpu_wheels.sh" \
         "here and name .whl in the run call's carry" >&2
    exit 2
  fi
  # the device README's exact install line
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
  if ! CARD_NAME=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())" 2>/dev/null); then
    echo "gpu_session.sh: no CUDA GPU visible to $PY; this script is for the device machine (--dry-run prints it)" >&2
    exit 2
  fi
  # the card's short name, as bench/bench_rollout.py names its JSON ('NVIDIA H200' -> H200)
  CARD=${CARD:-$(echo "${CARD_NAME#NVIDIA }" | sed -E 's/ \(.*//; s/[^A-Za-z0-9]+/_/g; s/^_+|_+$//g')}
  OUT=${OUT:-$ROOT/bench/results/local}
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
unset TRITON_INTERPRET
mkdir -p "$OUT"
# everything is written under W; $OUT gets 8 files at the end
if [ "$DRY_RUN" = 1 ] || [ "$SETUP" = 0 ]; then W=$(mktemp -d /tmp/gpu_session_work.XXXXXX); else W=${GPU_SESSION_WORK:-/tmp/gpu_session_work}; fi
rm -rf "$W" && mkdir -p "$W/logs" "$W/files" "$W/cmds"
PREP="$W/prep"
LOG="$W/files/gpu_session_$CARD.log"
exec > >(tee "$LOG") 2>&1

selected() {  # is item $1 to run?
  [ -z "$ONLY" ] && { case "$1" in fp8_gemm|fp8_bench|profile_anchor_fp8) [ "$FP8" = 1 ] ;; *) true ;; esac; } && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  if [ "$1" = prepare ]; then case ",$ONLY," in *,profile_vl,*|*,profile_anchor,*|*,profile_anchor_fp8,*) return 0 ;; esac; fi
  if [ "$1" = rollout_graph_checks ]; then case ",$ONLY," in *,bench_rollout,*) return 0 ;; esac; fi
  return 1
}

# $OUT gets at most 8 files: these 6, the console log and (at the end) one archive of everything. publish runs after
# every item, so that a call cut short still brings back what was done.
KEEP=(gpu_session_summary_$CARD.json pytest_ops_$CARD.txt bench_rollout_$CARD.json
      profile_qwen2_5_vl_1.5b_bf16_$CARD.json profile_anchor_1_75b_bf16_$CARD.json bench_logprob_$CARD.json)
publish() {
  local f
  for f in "${KEEP[@]}"; do if [ -f "$W/files/$f" ]; then cp "$W/files/$f" "$OUT/"; fi; done
  cp "$LOG" "$OUT/gpu_session_$CARD.log"
}

START=$(date +%s)
RESERVE_S=15      # kept back for packing the results
MIN_ITEM_S=20     # an item that would get less than this is skipped
RECORDS="$W/records.tsv"
: > "$RECORDS"

# run_item NAME LIMIT_S COMMAND: runs COMMAND under bash with `timeout`, its output into logs/NAME.log (and the
# console); records name, exit code, status, seconds and limit (records.tsv) and the command (cmds/NAME.sh).
run_item() {
  local name=$1 limit=$2 cmd=$3
  selected "$name" || return 0
  local now left rc status t0 secs
  printf '%s\n' "$cmd" > "$W/cmds/$name.sh"
  now=$(date +%s)
  left=$((BUDGET_S - (now - START) - RESERVE_S))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY_RUN" = 1 ]; then
    printf '[dry-run] %s (timeout %ss):\n  %s\n' "$name" "$2" "$cmd"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "" "dry_run" "0" "$2" >> "$RECORDS"
    return 0
  fi
  if [ "$limit" -lt "$MIN_ITEM_S" ]; then
    echo "=== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "" "skipped_budget" "0" "$limit" >> "$RECORDS"
    return 0
  fi
  echo "=== $name (timeout ${limit}s, $(( $(date +%s) - START ))s elapsed): $cmd"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" bash -o pipefail -c "$cmd" 2>&1 | tee "$W/logs/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(echo "$(date +%s.%N) - $t0" | bc)
  case $rc in 0) status=passed ;; 124|137) status=timed_out ;; *) status=failed ;; esac
  echo "=== $name: $status (exit $rc, ${secs}s)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$status" "$secs" "$limit" >> "$RECORDS"
  publish
}

# ------------------------------------------------------------------------------------------ the items
run_item env 30 "nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv; \
$PY -c 'import sys, torch, triton, transformers, megatron.core as mc; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); print(\"triton\", triton.__version__, \"megatron-core\", getattr(mc, \"__version__\", \"?\"), \"transformers\", transformers.__version__); print(\"megatron from\", mc.__file__)'"

run_item prepare 60 "bash bench/gpu_session.sh --prepare-only $PREP"

run_item ops_pytest 150 "$PY -m pytest -q -ra -p no:cacheprovider tests/ops 2>&1 | tee $W/files/pytest_ops_$CARD.txt"

run_item bench_rollout 240 "$PY bench/bench_rollout.py --out $W/files"

run_item rollout_graph_checks 20 "$PY - $W/files/bench_rollout_$CARD.json <<'PY'
import json, sys
checks = json.load(open(sys.argv[1]))['graph_checks']
print(json.dumps(checks))
bad = [f'{k}.{c}' for k, v in (checks or {}).items() for c, ok in v.items() if ok is not True]
sys.exit(f'graph checks failed: {bad}' if bad or not checks else 0)
PY"

run_item profile_vl 150 "$PY tools/profile_throughput.py --config $PREP/profile_vl.yaml --steps 3 --warmup 1 \
--prompt-len 64 --loss-impl triton --out-dir $W/profile_vl && \
cp $W/profile_vl/profile_throughput.json $W/files/profile_qwen2_5_vl_1.5b_bf16_$CARD.json && \
cp $W/profile_vl/profile_throughput.png $W/files/profile_qwen2_5_vl_1.5b_bf16_$CARD.png"

run_item profile_anchor 150 "$PY tools/profile_throughput.py --config $PREP/profile_anchor.yaml --steps 3 --warmup 1 \
--prompt-len 1916 --loss-impl triton --out-dir $W/profile_anchor && \
cp $W/profile_anchor/profile_throughput.json $W/files/profile_anchor_1_75b_bf16_$CARD.json && \
cp $W/profile_anchor/profile_throughput.png $W/files/profile_anchor_1_75b_bf16_$CARD.png"

run_item static_decode_pytest 150 "$PY -m pytest -q -ra -p no:cacheprovider tests/rollout/test_static_decode.py tests/rollout/test_compaction.py tests/rollout/test_budget.py -k 'not tp2' \
2>&1 | tee $W/files/pytest_static_decode_$CARD.txt"

run_item bench_logprob 120 "$PY bench/bench_logprob.py --no-compile --out $W/logprob 2>&1 | tee $W/files/bench_logprob_$CARD.log; \
rc=\${PIPESTATUS[0]}; cp $W/logprob/bench_logprob.json $W/files/bench_logprob_$CARD.json; exit \$rc"

# OPTIONAL (--fp8 / RUN_FP8=1). Issue 17 item 4 (FP8 through torchao) is not integrated yet; when it is, add its
# profile here: tools/profile_throughput.py --compare bf16,fp8 with the torchao backend, on the anchor and on a
# hidden-4096 shape (carry the torchao wheel: add it to bench/fetch_gpu_wheels.sh). Until then, the GEMM-only
# ratio that issue asks to report next to it:
run_item fp8_gemm 60 "$PY - $W/files/fp8_gemm_$CARD.json <<'PY'
import json, sys, torch, triton
res = []
for m, k, n in ((8192, 4096, 4096), (8192, 4096, 14336), (8192, 8192, 8192), (16384, 2048, 5504)):
    a = torch.randn(m, k, device='cuda', dtype=torch.bfloat16)
    b = torch.randn(n, k, device='cuda', dtype=torch.bfloat16)
    ref = a.double() @ b.double().T
    sa = a.float().abs().amax(1, keepdim=True) / 448.0
    sb = b.float().abs().amax(1, keepdim=True) / 448.0
    a8 = (a.float() / sa).to(torch.float8_e4m3fn)
    b8 = (b.float() / sb).to(torch.float8_e4m3fn)
    fp8 = lambda: torch._scaled_mm(a8, b8.T, scale_a=sa, scale_b=sb.T, out_dtype=torch.bfloat16)
    bf16 = lambda: a @ b.T
    row = {'m': m, 'k': k, 'n': n}
    for name, fn in (('bf16', bf16), ('fp8_rowwise', fp8)):
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median')
        out = fn().double()
        row[name + '_ms'] = ms
        row[name + '_tflops'] = 2 * m * k * n / ms / 1e9
        row[name + '_rel_err'] = float((out - ref).norm() / ref.norm())
    row['speedup'] = row['bf16_ms'] / row['fp8_rowwise_ms']
    res.append(row)
    print(json.dumps(row), flush=True)
json.dump({'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'results': res}, open(sys.argv[1], 'w'), indent=1)
PY"

run_item fp8_bench 240 "$PY bench/bench_fp8.py --out $W/files"

run_item profile_anchor_fp8 240 "$PY tools/profile_throughput.py --config $PREP/profile_anchor.yaml --steps 3 --warmup 1 \
--prompt-len 1916 --loss-impl triton --compare bf16,fp8 --fp8-backend torchao --fp8-recipe tensorwise \
--out-dir $W/profile_anchor_fp8 && \
cp $W/profile_anchor_fp8/profile_throughput.json $W/files/profile_anchor_1_75b_fp8_torchao_$CARD.json && \
cp $W/profile_anchor_fp8/profile_throughput.png $W/files/profile_anchor_1_75b_fp8_torchao_$CARD.png"

# ------------------------------------------------------------------------------------------ summary + packing
"$PY" - "$RECORDS" "$W/files/gpu_session_summary_$CARD.json" "$CARD" "$START" "$BUDGET_S" "$DRY_RUN" <<'PY'
import datetime, json, os, sys, time

records, path, card, start, budget, dry = sys.argv[1:7]
items = []
for line in open(records):
    name, rc, status, secs, limit = line.rstrip("\n").split("\t")
    with open(os.path.join(os.path.dirname(records), "cmds", name + ".sh")) as f:
        cmd = f.read().rstrip("\n")
    items.append({"item": name, "status": status, "exit_code": int(rc) if rc else None,
                  "seconds": round(float(secs), 1), "timeout_s": int(limit), "command": cmd})
summary = {"card": card, "dry_run": dry == "1", "created_utc": datetime.datetime.now(datetime.timezone.utc)
           .strftime("%Y-%m-%dT%H:%M:%SZ"), "budget_s": int(budget), "wall_s": round(time.time() - int(start), 1),
           "passed": [i["item"] for i in items if i["status"] == "passed"],
           "not_passed": [i["item"] for i in items if i["status"] not in ("passed", "dry_run")], "items": items}
files = os.path.dirname(path)
# headline numbers next to the last committed ones, when the runs produced them
def phases(p):
    try:
        run = json.load(open(p))["runs"][0]
    except (OSError, KeyError, IndexError, ValueError):
        return None
    return {ph["phase"]: {"time_s": ph["time_s"], "tflops_per_gpu": ph["tflops_per_gpu"]}
            for ph in run["phases"] + [run["total"]]}
for key, new, old in (("profile_vl", f"profile_qwen2_5_vl_1.5b_bf16_{card}.json",
                       "bench/results/profile_qwen2_5_vl_1.5b_bf16_H200.json"),
                      ("profile_anchor", f"profile_anchor_1_75b_bf16_{card}.json", None)):
    got = phases(os.path.join(files, new))
    if got:
        summary[key] = {"now": got, "before": phases(old) if old else None}
with open(path, "w") as f:
    json.dump(summary, f, indent=1)
print(f"{'item':<22} {'status':<15} {'exit':>4} {'seconds':>8} {'limit':>6}")
for i in items:
    print(f"{i['item']:<22} {i['status']:<15} {str(i['exit_code'] if i['exit_code'] is not None else '-'):>4} "
          f"{i['seconds']:>8} {i['timeout_s']:>6}")
for key in ("profile_vl", "profile_anchor"):
    if key in summary:
        for ph, v in summary[key]["now"].items():
            before = (summary[key]["before"] or {}).get(ph)
            was = f"  (before {before['time_s']:.3f} s, {before['tflops_per_gpu'] or 0:.1f} TFLOP/s)" if before else ""
            tf = v["tflops_per_gpu"]
            print(f"{key:<15} {ph:<10} {v['time_s']:.3f} s  {tf if tf is None else round(tf, 1)} TFLOP/s{was}")
print(json.dumps({"summary": path, "passed": summary["passed"], "not_passed": summary["not_passed"]}))
PY

publish
cp "$W/logs/"*.log "$W/files/" 2>/dev/null
tar -czf "$OUT/gpu_session_$CARD.tar.gz" -C "$W" files logs prep/profile_vl.yaml prep/profile_anchor.yaml 2>/dev/null
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ "$DRY_RUN" = 1 ] || [ "$SETUP" = 0 ]; then rm -rf "$W"; fi
exit 0
