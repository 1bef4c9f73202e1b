#!/usr/bin/env bash
# Fill .whl/ with the Python 3.12 manylinux wheels the GPU device machine lacks, for bench/gpu_session.sh.
#
# Run HERE (a machine with PyPI), from anywhere inside the repository:
#
#     bash bench/fetch_gpu_wheels.sh            # megatron-core 0.19.2 + liger-kernel (bench_logprob's baseline)
#     bash bench/fetch_gpu_wheels.sh --no-liger # megatron-core only
#
# What the device image already holds is /work/.library/device/KINDS.md's package list (a copy is below, used
# when that file is absent). Every wheel's Requires-Dist (extras skipped) must be in that list or among the
# wheels fetched here: the script checks it with the device README's method and fails naming what is missing.
# The folder is emptied first (two versions of one package stop the whole install there), `/.whl/` is added to
# the repository's info/exclude (so the wheels are never committed and travel only when `carry` names .whl),
# and the size of what travels (tracked + untracked-not-ignored files + .whl) is checked against the 64 MiB
# limit. Last, the exact device `run` call is printed.
set -euo pipefail

WITH_LIGER=1
for arg in "$@"; do
  case "$arg" in
    --no-liger) WITH_LIGER=0 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "fetch_gpu_wheels.sh: unknown argument '$arg' (expected --no-liger or --help)" >&2; exit 2 ;;
  esac
done

# Pinned: megatron-core is the version CI tests (README "Dependencies"); liger-kernel only feeds the
# comparison rows of bench/bench_logprob.py (pure Python + Triton, needs torch and triton: both there).
WANTED=("megatron-core==0.19.2" "torchao==0.18.0")
if [ "$WITH_LIGER" = 1 ]; then WANTED+=("liger-kernel==0.8.5"); fi
LIMIT_MIB=64

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
if ! grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null; then
  echo '/.whl/' >> "$EXCLUDE"
  echo "added /.whl/ to $EXCLUDE"
fi
if [ -n "$(git ls-files .whl)" ]; then
  echo "fetch_gpu_wheels.sh: .whl/ holds tracked files ($(git ls-files .whl | head -3 | tr '\n' ' ')); remove them from git first" >&2
  exit 1
fi

rm -rf .whl
mkdir -p .whl
PY=${PYTHON:-python3}
for spec in "${WANTED[@]}"; do
  # the device README's exact download line
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done

# Requires-Dist of every wheel (extras skipped) against the device's package list + the wheels themselves.
KINDS=/work/.library/device/KINDS.md
"$PY" - "$KINDS" .whl <<'PY'
import glob, os, re, sys, zipfile

kinds, folder = sys.argv[1], sys.argv[2]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
# nvidia-h200 'Python packages already there' (KINDS.md, read 2026-11-17); the file's own list wins when present
device = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
if os.path.isfile(kinds):
    m = re.search(r"nvidia-h200:.*?Packages: (.*?)\.\s*$", open(kinds).read(), re.S | re.M)
    if m:
        device = {norm(p) for p in m.group(1).replace("\n", " ").split(", ")}
wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
have = {norm(os.path.basename(w).split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    needs = []
    for r in reqs:
        if "extra ==" in r or "extra==" in r:
            continue
        name = norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0))
        needs.append(name)
        if name not in device and name not in have:
            missing.append(f"{os.path.basename(w)} needs {r!r}")
    print(f"{os.path.basename(w)}: Requires-Dist (no extras) {', '.join(needs) or '-'}")
if missing:
    sys.exit("fetch_gpu_wheels.sh: not on the device and not fetched:\n  " + "\n  ".join(missing)
             + "\nadd them to WANTED in bench/fetch_gpu_wheels.sh")
dupes = sorted(n for n in have if sum(norm(os.path.basename(w).split("-")[0]) == n for w in wheels) > 1)
if dupes:
    sys.exit(f"fetch_gpu_wheels.sh: two versions of {dupes} in {folder}/: keep one")
PY

# What travels: tracked + untracked-not-ignored files (+ shared/ when the checkout has one) + the carried .whl.
TREE=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s+=$1} END {print s+0}')
WHL=$(du -sb .whl | cut -f1)
TOTAL=$((TREE + WHL))
echo "wheels:"; ls -l .whl | awk 'NR>1 {printf "  %-80s %8.2f MiB\n", $9, $5/1048576}'
printf 'wheels %.2f MiB + working tree %.2f MiB = %.2f MiB of the %d MiB that may travel\n' \
  "$(echo "$WHL/1048576" | bc -l)" "$(echo "$TREE/1048576" | bc -l)" "$(echo "$TOTAL/1048576" | bc -l)" "$LIMIT_MIB"
if [ "$TOTAL" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "fetch_gpu_wheels.sh: over the ${LIMIT_MIB} MiB limit: drop liger-kernel (--no-liger) or ignore large files" >&2
  exit 1
fi
cat <<EOF

The device call (one run; the script keeps itself inside ~8 minutes and writes everything under \$OUT):
  run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=570)
Rerun only some items while the machine is still warm (30 s), e.g.:
  run(command="bash bench/gpu_session.sh --only profile_vl,profile_anchor", carry=[".whl"], timeout_s=300)
EOF
