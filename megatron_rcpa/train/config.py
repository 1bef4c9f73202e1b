"""The run configuration of ``rcpa-train``: one YAML file plus ``key=value`` overrides.

Every option has its default here, once; ``rcpa-train --help`` prints them all from these dataclasses.
A bad key or value is an error naming it (``run.stepz: unknown key ...``). The method's own options are
``rcpa.*`` (:class:`megatron_rcpa.algo.config.RCPAConfig`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from megatron_rcpa.algo.config import RCPAConfig, check_choice, check_int, check_real, fail, from_dict
from megatron_rcpa.data.image_size import (
    DEFAULT_FACTOR,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    OVERSIZE_MODES,
    check_pixel_limits,
)
from megatron_rcpa.models import families as model_families
from megatron_rcpa.train.stop import check_signal_names


@dataclass
class RunConfig:
    name: str = "rcpa"
    output_dir: str = "runs/rcpa"  # checkpoints, metrics.jsonl, TensorBoard events, plots
    seed: int = 1234
    steps: int = 100  # RL steps (one batch of prompts each)
    log_interval: int = 1
    save_interval: int = 50  # steps between checkpoints; 0 = only at the end
    resume: str = "auto"  # auto (latest checkpoint in output_dir if any) | never | a checkpoint directory
    progress_bar: bool = True
    kernels: str = "auto"  # triton | torch | auto (Triton kernels on GPU, the plain-torch path on CPU)
    mode: str = "rcpa"  # rcpa (the method) | sft (imitation of the full reference, no rollouts: the SFT baseline)
    val_interval: int = 0  # steps between validations on data.val_path; 0 = only at the end (if val_path)
    val_before_train: bool = False  # validate at step 0 too: the baseline before any update
    val_greedy: bool = True  # greedy decoding for validation (else the rollout temperature / top-p)
    val_generations: int = 16  # generations written to <output_dir>/generations/step_N.jsonl per validation
    cpu_threads: Optional[int] = None  # intra-op threads of a CPU-only run; None: OMP_NUM_THREADS, else cores/ranks
    # stop early without losing progress (train/stop.py): finish the step, save, exit 0
    save_signals: List[str] = field(default_factory=lambda: ["USR1", "TERM"])  # [] = leave signals alone
    stop_file: str = "SAVE_AND_EXIT"  # relative to output_dir unless absolute; "" = off; removed after the save
    save_by_seconds: Optional[float] = None  # wall-clock budget from process start: save and stop before it ends
    keep_last: int = 0  # keep the N newest complete checkpoints; 0 = all
    export_hf: bool = False  # at the end of training write <output_dir>/hf_export/ (HF directory of the final policy)
    export_max_shard_size: str = "5GB"  # largest safetensors file of the export (transformers' max_shard_size)

    def __post_init__(self) -> None:
        o = "run"
        if self.cpu_threads is not None:
            check_int(o, "cpu_threads", self.cpu_threads, 1)
        check_int(o, "steps", self.steps, 1)
        check_int(o, "log_interval", self.log_interval, 1)
        check_int(o, "save_interval", self.save_interval, 0)
        check_int(o, "seed", self.seed, 0)
        check_int(o, "keep_last", self.keep_last, 0)
        if not isinstance(self.export_hf, bool):
            fail(o, "export_hf", self.export_hf, "true or false")
        from megatron_rcpa.convert.errors import ConversionError
        from megatron_rcpa.convert.megatron_to_hf import parse_size

        try:
            if parse_size(self.export_max_shard_size) < 1:
                raise ConversionError("zero")
        except ConversionError:
            fail(o, "export_max_shard_size", self.export_max_shard_size, "a size such as 5GB, 500MB, 50KB (> 0)")
        check_choice(o, "kernels", self.kernels, ("auto", "triton", "torch"))
        check_choice(o, "mode", self.mode, ("rcpa", "sft"))
        check_int(o, "val_interval", self.val_interval, 0)
        check_int(o, "val_generations", self.val_generations, 0)
        if not isinstance(self.save_signals, list) or not all(isinstance(s, str) for s in self.save_signals):
            fail(o, "save_signals", self.save_signals, "a list of signal names such as [USR1, TERM]")
        check_signal_names(self.save_signals)
        if not isinstance(self.stop_file, str):
            fail(o, "stop_file", self.stop_file, "a file path, or \"\" for none")
        if self.save_by_seconds is not None:
            check_real(o, "save_by_seconds", self.save_by_seconds, lo=0.0, lo_open=True)
        if not isinstance(self.resume, str) or (self.resume not in ("auto", "never") and not os.path.isdir(
                self.resume)):
            fail(o, "resume", self.resume, "auto, never, or an existing checkpoint directory")

    def stop_file_path(self) -> Optional[str]:
        """The stop-request file (absolute, or under output_dir), None when off."""
        if not self.stop_file:
            return None
        return self.stop_file if os.path.isabs(self.stop_file) else os.path.join(self.output_dir, self.stop_file)


@dataclass
class Fp8Config:
    """``model.fp8``: FP8 GEMMs in the decoder's linear layers (megatron_rcpa/models/fp8.py). Needs a CUDA GPU of
    compute capability 8.9+; on a CPU ``enabled = true`` stops before any model is built."""

    enabled: bool = False
    backend: str = "auto"  # auto (te when transformer_engine imports, else torchao) | te | torchao
    recipe: Optional[str] = None  # None: the backend's default; te: delayed | tensorwise | blockwise | mxfp8;
    # torchao: tensorwise (per-tensor scales, E5M2 gradients) | rowwise (per-row power-of-2 scales, E4M3)

    def __post_init__(self) -> None:
        from megatron_rcpa.models.fp8 import FP8_BACKENDS, TE_RECIPES, TORCHAO_RECIPES

        if not isinstance(self.enabled, bool):
            fail("model.fp8", "enabled", self.enabled, "true or false")
        check_choice("model.fp8", "backend", self.backend, FP8_BACKENDS)
        allowed = {"te": TE_RECIPES, "torchao": TORCHAO_RECIPES}.get(self.backend,
                                                                    tuple(dict.fromkeys(TE_RECIPES + TORCHAO_RECIPES)))
        check_choice("model.fp8", "recipe", self.recipe, (None,) + tuple(allowed))


@dataclass
class ModelConfig:
    family: str = "qwen2_5_vl"  # a registered family (models/families): qwen2_5_vl | llava | llama | qwen2
    checkpoint: Optional[str] = None  # a megatron checkpoint, or an HF directory (converted once into output_dir)
    tiny: bool = False  # build a tiny random model from the family's tiny config (demos, tests)
    attention: str = "sdpa"  # core attention: sdpa (torch's fused kernels; GQA without copies) | megatron (unfused)
    vision_recompute: bool = False  # gradient checkpointing of the HF vision tower's blocks (Qwen2.5-VL)
    freeze_vision: bool = False  # VLMs: train the language model (and projector) only; the vision tower is frozen
    freeze_projector: bool = False  # VLMs: freeze the vision-to-language projector (Qwen2.5-VL: the merger) too
    tiny_hidden_size: int = 64  # text families' tiny model: width (MLP 2x, 4 heads, 2 KV heads)
    tiny_num_layers: int = 2  # text families' tiny model: decoder layers
    dtype: str = "auto"  # auto (the checkpoint's stored dtype; fp32 for model.tiny) | fp32 | bf16
    reference_checkpoint: Optional[str] = None  # frozen reference; default = the initial policy
    # activation recomputation of the decoder (megatron TransformerConfig; megatron_rcpa.plan.recompute_overrides)
    recompute_granularity: Optional[str] = None  # None (off) | full (whole layers) | selective (core attention)
    recompute_method: Optional[str] = None  # full only: uniform (chunks of recompute_num_layers) | block
    recompute_num_layers: Optional[int] = None  # full only: layers per chunk (uniform) / recomputed per stage (block)
    fp8: Fp8Config = field(default_factory=Fp8Config)  # FP8 GEMMs (te | torchao); GPU only

    def __post_init__(self) -> None:
        check_choice("model", "family", self.family, tuple(model_families.names()))
        check_choice("model", "attention", self.attention, ("sdpa", "megatron"))
        check_choice("model", "dtype", self.dtype, ("auto", "fp32", "bf16"))
        if self.tiny and self.checkpoint:
            raise ValueError(f"model.tiny = true and model.checkpoint = {self.checkpoint!r} exclude each other: "
                             "set model.tiny=false to train the checkpoint, or drop model.checkpoint for the tiny "
                             "random model")
        check_choice("model", "recompute_granularity", self.recompute_granularity, (None, "full", "selective"))
        check_choice("model", "recompute_method", self.recompute_method, (None, "uniform", "block"))
        if self.recompute_num_layers is not None:
            check_int("model", "recompute_num_layers", self.recompute_num_layers, 1)
        if self.recompute_granularity == "full":
            if self.recompute_method is None or self.recompute_num_layers is None:
                raise ValueError("model.recompute_granularity = 'full' needs model.recompute_method (uniform | "
                                 "block) and model.recompute_num_layers (>= 1)")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ValueError(f"model.recompute_method = {self.recompute_method!r} / model.recompute_num_layers = "
                             f"{self.recompute_num_layers!r} apply only with model.recompute_granularity = 'full' "
                             f"(it is {self.recompute_granularity!r})")
        check_int("model", "tiny_num_layers", self.tiny_num_layers, 1)
        check_int("model", "tiny_hidden_size", self.tiny_hidden_size, 8)
        if self.tiny_hidden_size % 8:
            raise ValueError(f"model.tiny_hidden_size = {self.tiny_hidden_size} is out of range: expected a "
                             "multiple of 8 (4 heads of an even head size)")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size; data parallel = world_size / (tp * pp)
    distributed_optimizer: bool = False
    # memory knobs (models/parallel_knobs.py), all without TE/apex:
    sequence_parallel: bool = False  # split the activations between the TP linears over the sequence (needs tp > 1)
    num_layers_in_first_pipeline_stage: Optional[int] = None  # uneven stages: layers of the first stage (pp > 1)
    num_layers_in_last_pipeline_stage: Optional[int] = None  # ... of the last stage; the rest split evenly

    def __post_init__(self) -> None:
        check_int("parallel", "tp", self.tp, 1)
        check_int("parallel", "pp", self.pp, 1)
        if not isinstance(self.sequence_parallel, bool):
            fail("parallel", "sequence_parallel", self.sequence_parallel, "true or false")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel = true needs parallel.tp > 1 (it splits the sequence over "
                             "the tensor-parallel ranks), got parallel.tp = 1")
        for key in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            value = getattr(self, key)
            if value is not None:
                check_int("parallel", key, value, 1)
                if self.pp == 1:
                    raise ValueError(f"parallel.{key} = {value} needs parallel.pp > 1 (uneven pipeline stages), "
                                     "got parallel.pp = 1")


@dataclass
class DataConfig:
    path: Optional[str] = None  # JSONL, parquet, a saved `datasets` dir or a downloaded hub dataset; None = synthetic
    synthetic: str = "counting"  # counting | geometry (used when path is None)
    synthetic_size: int = 64
    synthetic_reference: str = "full"  # full (a line of reasoning + \boxed{}) | short (just \boxed{answer})
    image_size: int = 56
    prompt_key: str = "prompt"  # text, or a chat message list (verl / TRL); dotted keys reach nested fields
    reference_key: Optional[str] = None  # None: reference, reward_model.ground_truth, completion, solution (first)
    image_key: Optional[str] = None  # None: "images" when present, else "image"
    prompts_per_step: int = 8  # B prompts per step over ALL data-parallel ranks (B / DP each), G rollouts each
    val_path: Optional[str] = None  # held-out data (same format/keys as path) for validation (run.val_interval)
    val_max_samples: int = 0  # validate on the first N held-out samples; 0 = all
    val_synthetic_size: int = 0  # without data.path and data.val_path: N held-out synthetic samples (another seed)
    shuffle: bool = True
    require_reference: bool = True  # RCPA forces reference prefixes: rows without a text reference are skipped
    max_prompt_tokens: int = 4096  # longer prompts (image tokens included) are skipped and counted, or truncated
    long_prompts: str = "skip"  # skip | truncate (keep the prompt text's tail that fits; images are kept whole)
    min_pixels: Optional[int] = DEFAULT_MIN_PIXELS  # Qwen2-VL processor's 56*56; oversize=resize scales smaller up
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # its 28*28*1280: larger images are skipped or resized; null: off
    oversize: str = "skip"  # skip | resize (to the processor's smart_resize size)
    system_prompt: Optional[str] = None  # a system turn for the chat template (replaces the data's own); None: none

    def __post_init__(self) -> None:
        check_int("data", "max_prompt_tokens", self.max_prompt_tokens, 1)
        check_choice("data", "long_prompts", self.long_prompts, ("skip", "truncate"))
        check_choice("data", "oversize", self.oversize, OVERSIZE_MODES)
        check_pixel_limits(self.min_pixels, self.max_pixels, "data", DEFAULT_FACTOR)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"data.system_prompt = {self.system_prompt!r}: expected text or null")
        check_int("data", "synthetic_size", self.synthetic_size, 1)
        check_choice("data", "synthetic", self.synthetic, ("counting", "geometry"))
        check_choice("data", "synthetic_reference", self.synthetic_reference, ("full", "short"))
        check_int("data", "image_size", self.image_size, 28)
        check_int("data", "prompts_per_step", self.prompts_per_step, 1)
        check_int("data", "val_max_samples", self.val_max_samples, 0)
        check_int("data", "val_synthetic_size", self.val_synthetic_size, 0)

    def reader_config(self, **overrides: Any):
        """The :class:`~megatron_rcpa.data.readers.ReaderConfig` these options ask for (``overrides`` are its
        fields); the prompt length is bounded at ``8 * max_prompt_tokens`` characters when read and checked in
        tokens when a sample is drawn (:func:`~megatron_rcpa.data.sampler.prompt_length_check`)."""
        from megatron_rcpa.data.readers import ReaderConfig

        return dataclasses.replace(ReaderConfig(
            prompt_field=self.prompt_key, reference_field=self.reference_key, image_field=self.image_key,
            require_reference=self.require_reference, max_prompt_chars=self.max_prompt_tokens * 8,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, oversize=self.oversize), **overrides)


@dataclass
class RolloutConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: List[str] = field(default_factory=list)  # stop strings besides EOS
    # static (preallocated KV cache, SDPA, CUDA graphs on GPU at PP=1; rows pipelined through the stages at PP>1)
    # | reference (the per-token loop through the policy's forward / megatron's schedule)
    decode: str = "static"
    # rollout rows decoded together (chunks of whole groups): an integer, or auto = as many as rollout.kv_cache_gb
    # of KV cache holds (megatron_rcpa/rollout/budget.py)
    max_rows: Union[int, str] = "auto"
    # KV-cache budget of max_rows = auto, GB per GPU; None: 0.5 x the GPU's free memory once the model and
    # optimizer are built (4 GB on a CPU)
    kv_cache_gb: Optional[float] = None
    stop_check_every: int = 8  # static decode: host checks of stop strings / all-finished every k tokens
    compact: bool = True  # static decode: finished rows leave the batch at the host checks (same rollouts)
    # static decode at PP > 1: micro-batches the rows are split into (null: PP, which keeps every stage busy)
    pp_microbatches: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice("rollout", "decode", self.decode, ("static", "reference"))
        if self.max_rows != "auto":
            if isinstance(self.max_rows, str):
                fail("rollout", "max_rows", self.max_rows, "auto or an integer >= 1")
            check_int("rollout", "max_rows", self.max_rows, 1)
        if self.kv_cache_gb is not None:
            check_real("rollout", "kv_cache_gb", self.kv_cache_gb, lo=0.0, lo_open=True)
            if self.max_rows != "auto":
                fail("rollout", "kv_cache_gb", self.kv_cache_gb,
                     f"unset (null) when rollout.max_rows = {self.max_rows} is fixed: it sizes max_rows = auto only")
        if not isinstance(self.compact, bool):
            fail("rollout", "compact", self.compact, "true or false")
        check_int("rollout", "stop_check_every", self.stop_check_every, 1)
        if self.pp_microbatches is not None:
            check_int("rollout", "pp_microbatches", self.pp_microbatches, 1)
        check_real("rollout", "temperature", self.temperature, lo=0.0, lo_open=True)
        check_real("rollout", "top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        check_int("rollout", "max_new_tokens", self.max_new_tokens, 1)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    micro_batch_size: int = 8  # rollouts per micro-batch in the train step
    updates_per_step: int = 1  # optimizer steps per batch of rollouts (mini-batches)
    recompute_old_logp: str = "auto"  # auto: a separate old-policy forward only when updates_per_step > 1 | always
    length_buckets: bool = True  # micro-batches of similar-length groups, each padded to its own length (PP=1)
    max_skipped_updates: int = 5  # stop after this many consecutive updates skipped for a non-finite grad norm

    def __post_init__(self) -> None:
        check_real("optim", "lr", self.lr, lo=0.0)
        check_choice("optim", "lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        check_int("optim", "warmup_steps", self.warmup_steps, 0)
        check_real("optim", "clip_grad", self.clip_grad, lo=0.0)
        check_int("optim", "micro_batch_size", self.micro_batch_size, 1)
        check_int("optim", "updates_per_step", self.updates_per_step, 1)
        check_choice("optim", "recompute_old_logp", self.recompute_old_logp, ("auto", "always"))
        check_int("optim", "max_skipped_updates", self.max_skipped_updates, 1)


@dataclass
class RewardConfig:
    name: str = "math_answer"  # a registered reward, an import path "pkg.module:fn" or a file "path/x.py:fn"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    api: str = "auto"  # the function's convention: auto (from its signature) | rcpa | verl | trl

    def __post_init__(self) -> None:
        from megatron_rcpa.rewards.adapters import API_STYLES

        if not isinstance(self.name, str) or not self.name:
            fail("reward", "name", self.name, "a registered reward name or an import path 'pkg.module:function'")
        if not isinstance(self.kwargs, dict):
            fail("reward", "kwargs", self.kwargs, "a mapping of keyword arguments, e.g. {preset: boxed}")
        check_choice("reward", "api", self.api, API_STYLES)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_rcpa"  # offline unless WANDB_MODE says otherwise


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rcpa: RCPAConfig = field(default_factory=RCPAConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) reading numbers as YAML 1.2 does: ``1e-6`` and ``1e30`` are floats (1.1
    wants a dot, ``1.0e-6``, and reads ``1e-6`` as a string)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"))


def yaml_load(text):
    """YAML (a string or an open file) with YAML 1.2 numbers."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"override {dotted}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["run.steps=10", "rcpa.loss.beta=0.01"]`` -> a nested dict; values are parsed as YAML scalars, numbers
    as YAML 1.2 reads them (``optim.lr=1e-6`` is a float)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. run.steps=10")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r}: bad key {key!r}")
        _set_dotted(tree, key.strip(), yaml_load(raw) if raw != "" else "")
    return tree


def merge_trees(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        # a mapping merges into a mapping; an empty one ({}) replaces it (how `reward.kwargs={}` clears a base's)
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


DEFAULTS_KEY = "defaults"


def load_config_tree(path: str, chain: Sequence[str] = ()) -> dict:
    """One YAML config file as a tree, with the files its ``defaults:`` list names (paths relative to it)
    merged underneath, in order: a later base overrides an earlier one, the file itself overrides them all."""
    if not os.path.isfile(path):
        where = f" (named in defaults: of {chain[-1]!r})" if chain else ""
        raise FileNotFoundError(f"config file {path!r} does not exist{where}")
    real = os.path.realpath(path)
    if real in chain:
        raise ValueError(f"config file {path!r}: defaults: form a cycle ({' -> '.join(list(chain) + [real])})")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path!r} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path!r}: the top level must be a mapping of sections")
    bases = tree.pop(DEFAULTS_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"config file {path!r}: {DEFAULTS_KEY}: must be a list of config file paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = merge_trees(merged, load_config_tree(base_path, list(chain) + [real]))
    return merge_trees(merged, tree)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (optional; ``defaults: [base.yaml, ...]`` in it extends other files) + overrides -> a
    validated TrainConfig. Errors name the file/key/value."""
    tree: dict = load_config_tree(path) if path is not None else {}
    tree = merge_trees(tree, parse_overrides(overrides))
    where = os.path.basename(path) if path else "config"
    try:
        return from_dict(TrainConfig, tree, where)
    except TypeError as e:  # a section given a scalar, e.g. run=3
        raise ValueError(f"{where}: {e}") from e


TEXT_FAMILIES = ("llama", "qwen2")


def check_runnable(cfg: TrainConfig, world_size: Optional[int] = None) -> None:
    """What can be checked before any model is built (``rcpa-train`` calls it, exit 2 on a ValueError):
    the reward resolves with its kwargs, ``parallel.tp x parallel.pp`` divides the world size (``WORLD_SIZE``
    from torchrun, else 1), a text family gets no image data, and ``model.fp8`` can run here (not on a CPU)."""
    from megatron_rcpa.rewards import get_reward

    try:
        get_reward(cfg.reward.name, **cfg.reward.kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"reward.name = {cfg.reward.name!r} with reward.kwargs = {cfg.reward.kwargs!r}: {e}") from e
    if cfg.logging.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("logging.wandb = true needs the wandb package: pip install wandb "
                             "(or pip install 'megatron-rcpa[wandb]')")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size % (tp * pp):
        raise ValueError(f"parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp} does not divide the world size "
                         f"{world_size} (WORLD_SIZE; launch with torchrun --nproc_per_node {tp * pp} or a multiple)")
    from megatron_rcpa.train.phases import check_batch_layout

    groups = {g for g, _ in model_families.get(cfg.model.family).param_groups}
    for group, on in (("vision", cfg.model.freeze_vision), ("projector", cfg.model.freeze_projector)):
        if on and group not in groups:
            raise ValueError(f"model.freeze_{group} = true but model.family = {cfg.model.family!r} has no {group} "
                             f"parameters (freezable groups: {sorted(groups) or 'none'})")

    check_batch_layout(cfg, world_size // (tp * pp))  # the global batch splits over data parallel
    if cfg.model.fp8.enabled:  # FP8 needs a GPU with FP8 tensor cores and a backend (models/fp8.py)
        from megatron_rcpa.models.fp8 import resolve_fp8

        resolve_fp8(cfg.model.fp8)
    if cfg.model.family in TEXT_FAMILIES:
        try:
            where = _image_data(cfg.data)
        except OSError as e:  # the data reader's DataFileError: missing / unreadable file
            raise ValueError(f"data.path = {cfg.data.path!r}: {e}") from e
        if where:
            raise ValueError(f"model.family = {cfg.model.family!r} is a text model but {where}: use a VLM family "
                             "(qwen2_5_vl, llava) or text-only data")


def _image_data(data: DataConfig) -> Optional[str]:
    """Where the configured data holds images (None if it holds none): the synthetic domains always do; a data
    file does when a row has a non-null image field (JSONL: every row is checked; parquet / a datasets dir:
    the image column's null count)."""
    if data.path is None:
        return f"the synthetic data (data.synthetic = {data.synthetic!r}, no data.path) has images"
    from megatron_rcpa.data.readers import detect_format, hf_disk_files

    fields = [data.image_key] if data.image_key else ["images", "image"]
    fmt = detect_format(data.path)
    if fmt == "jsonl":
        import json

        with open(data.path, "rb") as f:
            head = f.read(1)
            f.seek(0)
            rows = json.load(f) if head.strip() == b"[" else (
                json.loads(line) for line in f if line.strip() and _json_ok(line))
            for n, row in enumerate(rows, 1):
                if isinstance(row, dict) and any(row.get(k) not in (None, [], "") for k in fields):
                    return f"{data.path} row {n} has images"
        return None
    import pyarrow.parquet as pq

    files = [data.path] if fmt == "parquet" else hf_disk_files(data.path)
    for f in files:
        if fmt == "parquet":
            table = pq.ParquetFile(str(f)).schema_arrow
            present = [k for k in fields if k in table.names]
            counts = [(k, pq.read_table(str(f), columns=[k]).column(k)) for k in present]
        else:
            import pyarrow as pa

            with pa.memory_map(str(f)) as src:
                try:
                    tbl = pa.ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    src.seek(0)
                    tbl = pa.ipc.open_file(src).read_all()
            counts = [(k, tbl.column(k)) for k in fields if k in tbl.column_names]
        for k, column in counts:
            if column.null_count < len(column):
                return f"{f} has an image column {k!r}"
    return None


def _json_ok(line: bytes) -> bool:
    import json

    try:
        json.loads(line)
    except ValueError:
        return False  # a malformed row: the reader skips and counts it
    return True


def describe_options() -> str:
    """Every option with its default, for ``--help``."""
    lines: List[str] = []

    def walk(obj, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                t = hints.get(f.name)
                tname = getattr(t, "__name__", None) or str(t).replace("typing.", "")
                lines.append(f"  {prefix}{f.name} = {value!r}  ({tname})")

    walk(TrainConfig(), "")
    return "\n".join(lines)


__all__ = ["TrainConfig", "RunConfig", "ModelConfig", "Fp8Config", "ParallelConfig", "DataConfig", "RolloutConfig",
           "OptimConfig", "RewardConfig", "LoggingConfig", "load_config", "check_runnable", "parse_overrides",
           "describe_options"]
