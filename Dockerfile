# megatron_rcpa on an NGC PyTorch image, which brings CUDA torch, transformer-engine and apex (the GPU
# extras this package imports lazily). Build:  docker build -t megatron_rcpa .
# For Slurm + pyxis/enroot:  enroot import dockerd://megatron_rcpa && use the .sqsh as CONTAINER_IMAGE.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    WANDB_MODE=offline

WORKDIR /opt/megatron_rcpa
COPY setup.py README.md pyproject.toml ./
COPY megatron_rcpa ./megatron_rcpa
COPY tools ./tools
COPY examples ./examples
COPY bench ./bench

# The image's torch, transformer-engine and apex stay as they are: megatron-core and our pure-Python
# dependencies are added on top; no dependency may replace the image's CUDA torch. megatron-core is pinned to
# the version the test suite runs against (README's test command, .ci/run); 0.16.1 is tested too.
RUN python -c "import torch, transformer_engine; print('torch', torch.__version__)" \
 && pip install --no-cache-dir "megatron-core==0.19.2" \
 && pip install --no-cache-dir -e ".[wandb]" \
 && python -c "import torch, megatron.core, megatron_rcpa.ops; print('megatron_rcpa ready, torch', torch.__version__)"

ENTRYPOINT []
CMD ["rcpa-train", "--help"]
