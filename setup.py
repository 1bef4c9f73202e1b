"""megatron-rcpa: Reinforced Curriculum Pre-Alignment for VLMs on Megatron-Core.

Dependency decisions (see README "Dependencies"):
- torch is required but NOT pinned to a CUDA build: install the build you need first
  (CPU CI: `pip install torch==2.13.0`; GPU images bring their own).
- megatron-core >= 0.16.1: 0.16.1 is what pip resolves on Python 3.11, 0.17+ need Python 3.12
  (0.19.x works on 3.11 with --ignore-requires-python). psutil is needed by dist_checkpointing but
  not declared by megatron-core.
- torchao (extra `fp8`, pinned: models/fp8.py uses torchao.float8's matmul function) gives FP8 training without
  Transformer Engine; imported lazily. It installs on CPU machines (no dependencies) and the tests use it there.
- transformer-engine and NVIDIA apex are GPU-image extras, imported lazily. Never install
  transformer-engine on a machine without CUDA: an unloadable TE breaks `import megatron.core`.
- nemo-toolkit is not used (3.0 ships only speech collections); HF <-> Megatron conversion is our own.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-rcpa",
    version="0.1.0",
    description="Reinforced Curriculum Pre-Alignment (RCPA) for vision-language models on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rcpa", "megatron_rcpa.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "triton>=3.1",
        "numpy",
        "psutil",
        "pyyaml",
        "tqdm",
        "safetensors",
        "transformers>=5.0",
        "einops",
        "pillow",
        "pyarrow",
        "tensorboard",
        "matplotlib",
    ],
    entry_points={
        "console_scripts": [
            "rcpa-train=megatron_rcpa.train.cli:main",
            "rcpa-plot=megatron_rcpa.train.plot:main",
            "rcpa-plan=megatron_rcpa.plan.cli:main",
            "rcpa-repro=megatron_rcpa.repro.cli:main",
        ],
    },
    extras_require={
        # torchao: the FP8 tests run its float8 casts emulated on a CPU (tests/models/test_fp8.py)
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6.100", "ruff>=0.5", "math-verify>=0.7",
                 "torchao==0.18.0"],
        # FP8 training without Transformer Engine (model.fp8.backend=torchao; megatron_rcpa/models/fp8.py)
        "fp8": ["torchao==0.18.0"],
        "wandb": ["wandb"],
        "math": ["math-verify>=0.7"],
        # GPU images (NGC PyTorch) already ship these; listed so `pip install .[gpu]` documents them.
        "gpu": ["transformer-engine[pytorch]"],
    },
)
