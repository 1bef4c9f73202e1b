"""The run configuration of ``rcpa-train``: one YAML file plus ``key=value`` overrides.

Every option has its default here, once; ``rcpa-train --help`` prints them all from these dataclasses.
A bad key or value is an error naming it (``run.stepz: unknown key ...``). The method's own options are
``rcpa.*`` (:class:`megatron_rcpa.algo.config.RCPAConfig`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from megatron_rcpa.algo.config import RCPAConfig, _check_choice, _check_int, _check_real, from_dict
from megatron_rcpa.data.image_size import (
    DEFAULT_FACTOR,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    OVERSIZE_MODES,
    check_pixel_limits,
)


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

    def __post_init__(self) -> None:
        o = "run"
        _check_int(o, "steps", self.steps, 1)
        _check_int(o, "log_interval", self.log_interval, 1)
        _check_int(o, "save_interval", self.save_interval, 0)
        _check_int(o, "seed", self.seed, 0)
        _check_choice(o, "kernels", self.kernels, ("auto", "triton", "torch"))
        _check_choice(o, "mode", self.mode, ("rcpa", "sft"))
        _check_int(o, "val_interval", self.val_interval, 0)
        _check_int(o, "val_generations", self.val_generations, 0)


@dataclass
class ModelConfig:
    family: str = "qwen2_5_vl"  # qwen2_5_vl | llava | llama | qwen2 (text; a checkpoint's must match) | gpt (profiler)
    checkpoint: Optional[str] = None  # a converted megatron checkpoint (tools/convert_hf_to_megatron.py)
    tiny: bool = False  # build a tiny random model from the family's tiny config (demos, tests)
    tiny_hidden_size: int = 64  # text families' tiny model: width (MLP 2x, 4 heads, 2 KV heads)
    tiny_num_layers: int = 2  # text families' tiny model: decoder layers
    dtype: str = "fp32"  # fp32 | bf16
    reference_checkpoint: Optional[str] = None  # frozen reference; default = the initial policy

    def __post_init__(self) -> None:
        _check_choice("model", "family", self.family, ("qwen2_5_vl", "llava", "llama", "qwen2", "gpt"))
        _check_choice("model", "dtype", self.dtype, ("fp32", "bf16"))
        _check_int("model", "tiny_num_layers", self.tiny_num_layers, 1)
        _check_int("model", "tiny_hidden_size", self.tiny_hidden_size, 8)
        if self.tiny_hidden_size % 8:
            raise ValueError(f"model.tiny_hidden_size = {self.tiny_hidden_size} is out of range: expected a "
                             "multiple of 8 (4 heads of an even head size)")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size; data parallel = world_size / (tp * pp)
    distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        _check_int("parallel", "tp", self.tp, 1)
        _check_int("parallel", "pp", self.pp, 1)


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
    shuffle: bool = True
    require_reference: bool = True  # RCPA forces reference prefixes: rows without a text reference are skipped
    max_prompt_tokens: int = 4096  # longer prompts (image tokens included) are skipped and counted
    min_pixels: Optional[int] = DEFAULT_MIN_PIXELS  # Qwen2-VL processor's 56*56; oversize=resize scales smaller up
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # its 28*28*1280: larger images are skipped or resized; null: off
    oversize: str = "skip"  # skip | resize (to the processor's smart_resize size)

    def __post_init__(self) -> None:
        _check_int("data", "max_prompt_tokens", self.max_prompt_tokens, 1)
        _check_choice("data", "oversize", self.oversize, OVERSIZE_MODES)
        check_pixel_limits(self.min_pixels, self.max_pixels, "data", DEFAULT_FACTOR)
        _check_int("data", "synthetic_size", self.synthetic_size, 1)
        _check_choice("data", "synthetic", self.synthetic, ("counting", "geometry"))
        _check_choice("data", "synthetic_reference", self.synthetic_reference, ("full", "short"))
        _check_int("data", "image_size", self.image_size, 28)
        _check_int("data", "prompts_per_step", self.prompts_per_step, 1)
        _check_int("data", "val_max_samples", self.val_max_samples, 0)

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

    def __post_init__(self) -> None:
        _check_real("rollout", "temperature", self.temperature, lo=0.0, lo_open=True)
        _check_real("rollout", "top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("rollout", "max_new_tokens", self.max_new_tokens, 1)


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

    def __post_init__(self) -> None:
        _check_real("optim", "lr", self.lr, lo=0.0)
        _check_choice("optim", "lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        _check_int("optim", "warmup_steps", self.warmup_steps, 0)
        _check_real("optim", "clip_grad", self.clip_grad, lo=0.0)
        _check_int("optim", "micro_batch_size", self.micro_batch_size, 1)
        _check_int("optim", "updates_per_step", self.updates_per_step, 1)
        _check_choice("optim", "recompute_old_logp", self.recompute_old_logp, ("auto", "always"))


@dataclass
class RewardConfig:
    name: str = "math_answer"  # a registered reward, an import path "pkg.module:fn" or a file "path/x.py:fn"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    api: str = "auto"  # the function's convention: auto (from its signature) | rcpa | verl | trl

    def __post_init__(self) -> None:
        from megatron_rcpa.rewards.adapters import API_STYLES

        _check_choice("reward", "api", self.api, API_STYLES)


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
    """``["run.steps=10", "rcpa.loss.beta=0.01"]`` -> a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. run.steps=10")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r}: bad key {key!r}")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (optional) + overrides -> a validated TrainConfig. Errors name the file/key/value."""
    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path!r}: the top level must be a mapping of sections")
    tree = _merge(tree, parse_overrides(overrides))
    where = os.path.basename(path) if path else "config"
    try:
        return from_dict(TrainConfig, tree, where)
    except TypeError as e:  # a section given a scalar, e.g. run=3
        raise ValueError(f"{where}: {e}") from e


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


__all__ = ["TrainConfig", "RunConfig", "ModelConfig", "ParallelConfig", "DataConfig", "RolloutConfig",
           "OptimConfig", "RewardConfig", "LoggingConfig", "load_config", "parse_overrides", "describe_options"]
