"""``rcpa-plan``: will a run fit? Per-GPU memory by pipeline stage for a run configuration.

    rcpa-plan --config examples/configs/qwen2_5_vl_72b.yaml \\
        --hf-config examples/configs/hf/qwen2_5_vl_72b_config.json --nodes 4 --gpu h100-80gb \\
        parallel.tp=8 parallel.pp=4 model.recompute_granularity=full model.recompute_method=uniform \\
        model.recompute_num_layers=1 [--json]

The model's shape comes from ``--hf-config`` (an HF ``config.json``: plans a model without its weights), else
from ``model.checkpoint``'s metadata, else from ``model.tiny``. The memory model is documented in
:mod:`megatron_rcpa.plan.memory`. Keys the trainer's config does not know yet (:data:`PLANNER_KEYS`) are
accepted here, and the output says which of them the trainer ignores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_rcpa.plan.memory import GPUS, GiB, Plan, PlanInputs, plan_memory

__all__ = ["PLANNER_KEYS", "build_parser", "main", "plan_from_config", "format_plan"]

#: planner settings that are not (all) options of rcpa-train yet: dotted key -> default
PLANNER_KEYS: Dict[str, Any] = {
    "parallel.sequence_parallel": False,
    "parallel.num_layers_in_first_pipeline_stage": None,
    "parallel.num_layers_in_last_pipeline_stage": None,
    "rollout.max_rows": None,  # None: the rollout engine's default chunk (auto: what the KV-cache budget holds)
    "model.recompute_granularity": None,
    "model.recompute_method": None,
    "model.recompute_num_layers": None,
    "model.vision_recompute": False,  # HF gradient checkpointing of the vision tower's blocks
    "model.freeze_vision": False,  # vision tower not trained
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rcpa-plan",
        description="Per-GPU memory of an RCPA run by pipeline stage (weights, grads, optimizer, activations, "
                    "rollout KV cache and logits, reference model), against a GPU's memory, and the checkpoint "
                    "size on disk. Options are rcpa-train's (--config + key=value overrides).",
    )
    p.add_argument("--config", help="rcpa-train YAML config")
    p.add_argument("--hf-config", help="an HF config.json (or a directory holding one): the model's shape, "
                                       "without weights (overrides model.checkpoint's)")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="the GPU (default h100-80gb)")
    p.add_argument("--gpu-mem-gb", type=float, help="usable GPU memory in GiB (overrides --gpu)")
    p.add_argument("--nodes", type=int, help="nodes (world size = nodes x --gpus-per-node); default: one model "
                                             "replica, i.e. TP x PP GPUs (DP = 1)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, help="longest prompt in tokens, image tokens included (default: "
                                                     "data.max_prompt_tokens)")
    p.add_argument("--prefix-tokens", type=int, default=0,
                   help="longest forced reference prefix (RCPA) on top of the prompt (default 0)")
    p.add_argument("--image-tokens", type=int, help="image tokens per image (default: from data.max_pixels, or "
                                                    "data.image_size for synthetic data; LLaVA: fixed)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default 1 (0 for text models)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="rcpa-train options, e.g. parallel.tp=8")
    return p


# ----------------------------------------------------------------------------------------------- config
def _split_planner_keys(tree: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], List[str]]:
    """(config tree without the planner-only keys the trainer does not know, their values, those keys)."""
    from megatron_rcpa.train.config import TrainConfig

    values, unknown_to_trainer = {}, []
    trainer = TrainConfig()
    for dotted, default in PLANNER_KEYS.items():
        section, key = dotted.split(".")
        known = hasattr(getattr(trainer, section), key)
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            values[dotted] = node[key] if known else node.pop(key)
            if not known:
                unknown_to_trainer.append(dotted)
        else:
            values[dotted] = default
    return tree, values, unknown_to_trainer


def load_plan_config(path: Optional[str], overrides: Sequence[str]):
    """(TrainConfig, planner-only values, planner-only keys the trainer does not read yet)."""
    from megatron_rcpa.algo.config import from_dict
    from megatron_rcpa.train.config import TrainConfig, load_config_tree, merge_trees, parse_overrides

    tree: Dict[str, Any] = load_config_tree(path) if path is not None else {}  # defaults: [...] included
    tree = merge_trees(tree, parse_overrides(overrides))
    tree, values, unknown = _split_planner_keys(tree)
    where = os.path.basename(path) if path else "config"
    cfg = from_dict(TrainConfig, tree, where)
    for dotted in PLANNER_KEYS:  # the trainer's own value where it has the option
        section, key = dotted.split(".")
        if dotted not in unknown and hasattr(getattr(cfg, section), key):
            values[dotted] = getattr(getattr(cfg, section), key)
    return cfg, values, unknown


def _model_source(cfg, hf_config_path: Optional[str]):
    """(family, HF config (dict or object), padded vocab or None, where it came from)."""
    from megatron_rcpa.convert.families import family_for_config

    family = cfg.model.family
    from megatron_rcpa.train.hf_checkpoint import is_hf_dir

    if not hf_config_path and is_hf_dir(cfg.model.checkpoint):  # an HF model.checkpoint: its config.json
        hf_config_path = cfg.model.checkpoint
    if hf_config_path:
        from megatron_rcpa.plan.shapes import load_hf_config_json

        data = load_hf_config_json(hf_config_path)
        found = family_for_config(data).name
        if found != family:
            raise ValueError(f"--hf-config {hf_config_path!r} holds a {found!r} model but model.family = {family!r}; "
                             f"set model.family={found}")
        return family, data, None, hf_config_path
    if cfg.model.checkpoint:
        from megatron_rcpa.convert.checkpoint import read_metadata

        meta = read_metadata(cfg.model.checkpoint)
        if meta.family != family:
            raise ValueError(f"model.checkpoint {cfg.model.checkpoint!r} holds a {meta.family!r} model but "
                             f"model.family = {family!r}")
        return family, meta.hf_config, meta.padded_vocab_size, cfg.model.checkpoint
    if cfg.model.tiny:
        from megatron_rcpa.train.families import build_tokenizer_and_config

        _, hf = build_tokenizer_and_config(cfg)
        return family, hf, None, "model.tiny"
    raise ValueError("no model shape: pass --hf-config path/to/config.json, or set model.checkpoint or model.tiny")


def plan_dtype(model, hf_config: Any) -> str:
    """``model.dtype``, with ``auto`` resolved as the trainer resolves it: a megatron ``model.checkpoint``'s
    stored dtype, else the HF config's ``dtype`` / ``torch_dtype`` (``--hf-config``, an HF model.checkpoint),
    else fp32 (``model.tiny``)."""
    from megatron_rcpa.train.hf_checkpoint import dtype_of_hf_config, is_hf_dir, resolve_dtype

    if model.dtype != "auto" or model.tiny or (model.checkpoint and not is_hf_dir(model.checkpoint)):
        return resolve_dtype(model)
    return dtype_of_hf_config(hf_config if isinstance(hf_config, dict) else hf_config.to_dict())


def _engine_max_rows():
    import inspect

    from megatron_rcpa.rollout.engine import RolloutEngine

    return inspect.signature(RolloutEngine.__init__).parameters["max_rows"].default  # an int or "auto"


def plan_from_config(cfg, values: Dict[str, Any], *, hf_config: Optional[str] = None, gpu: str = "h100-80gb",
                     gpu_mem_gb: Optional[float] = None, nodes: Optional[int] = None, gpus_per_node: int = 8,
                     prompt_tokens: Optional[int] = None, prefix_tokens: int = 0, image_tokens: Optional[int] = None,
                     images_per_prompt: Optional[int] = None) -> Tuple[Plan, List[str]]:
    """The plan of a loaded config; returns (plan, assumption lines)."""
    from megatron_rcpa.plan.shapes import model_shape
    from megatron_rcpa.train.phases import check_batch_layout

    family, hf, padded, source = _model_source(cfg, hf_config)
    shape = model_shape(family, hf, padded)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    world = nodes * gpus_per_node if nodes else tp * pp
    if world % (tp * pp):
        raise ValueError(f"{world} GPUs ({nodes} nodes x {gpus_per_node}) are not a multiple of parallel.tp x "
                         f"parallel.pp = {tp} x {pp}")
    dp = world // (tp * pp)
    check_batch_layout(cfg, dp)
    g = cfg.rcpa.group_size
    rows_per_rank = cfg.data.prompts_per_step // dp * g
    mbs = min(cfg.optim.micro_batch_size, rows_per_rank)
    n_micro = rows_per_rank // mbs
    notes = [f"model shape from {source}"]
    if prompt_tokens is None:
        prompt_tokens = getattr(cfg.data, "max_prompt_tokens", None)
        if prompt_tokens is None:
            raise ValueError("--prompt-tokens is required (this version's config has no data.max_prompt_tokens)")
        notes.append(f"prompts up to data.max_prompt_tokens = {prompt_tokens} tokens (--prompt-tokens to change)")
    v = shape.vision
    if images_per_prompt is None:
        images_per_prompt = 1 if v is not None else 0
    if v is None:
        image_tokens = 0
    elif v.kind == "llava":
        image_tokens = v.tokens_per_image
    elif image_tokens is None:
        unit = (v.patch_size * v.spatial_merge_size) ** 2
        max_pixels = getattr(cfg.data, "max_pixels", None)
        if cfg.data.path is None:
            image_tokens = cfg.data.image_size ** 2 // unit
            notes.append(f"synthetic images of data.image_size = {cfg.data.image_size}: {image_tokens} tokens each")
        elif max_pixels:
            image_tokens = int(max_pixels) // unit
            notes.append(f"images up to data.max_pixels = {max_pixels}: {image_tokens} image tokens each "
                         "(--image-tokens to change)")
        else:
            raise ValueError("--image-tokens is required (no data.max_pixels in this config)")
    if images_per_prompt * image_tokens > prompt_tokens:
        raise ValueError(f"{images_per_prompt} image(s) x {image_tokens} image tokens exceed the prompt length "
                         f"{prompt_tokens} (--prompt-tokens / data.max_prompt_tokens)")
    prompt_len = prompt_tokens + prefix_tokens
    train_len = -(-(prompt_len + cfg.rollout.max_new_tokens) // 8) * 8  # pack_rollouts pads to a multiple of 8
    max_rows = values.get("rollout.max_rows") or _engine_max_rows()
    rollout_rows = rows_per_rank if max_rows == "auto" else min(max(g, (max_rows // g) * g), rows_per_rank)
    mem = gpu_mem_gb * GiB if gpu_mem_gb else GPUS[gpu]
    inp = PlanInputs(
        shape=shape, tp=tp, pp=pp, dp=dp, dtype=plan_dtype(cfg.model, hf),
        distributed_optimizer=cfg.parallel.distributed_optimizer,
        sequence_parallel=bool(values["parallel.sequence_parallel"]),
        recompute_granularity=values["model.recompute_granularity"], recompute_method=values["model.recompute_method"],
        recompute_num_layers=values["model.recompute_num_layers"],
        num_layers_in_first_pipeline_stage=values["parallel.num_layers_in_first_pipeline_stage"],
        num_layers_in_last_pipeline_stage=values["parallel.num_layers_in_last_pipeline_stage"],
        micro_batch_size=mbs, num_micro_batches=n_micro, train_seq_len=train_len, prompt_len=prompt_len,
        max_new_tokens=cfg.rollout.max_new_tokens, images_per_row=images_per_prompt, image_tokens=image_tokens,
        rollout_rows=rollout_rows, reference=cfg.rcpa.loss.beta > 0, gpu_mem_bytes=mem,
        vision_recompute=bool(values["model.vision_recompute"]), freeze_vision=bool(values["model.freeze_vision"]))
    plan = plan_memory(inp)
    if max_rows == "auto":  # as the engine sizes it: rows whose KV cache fits the budget, whole groups
        from megatron_rcpa.rollout.budget import GB, KV_FREE_FRACTION

        kv_gb = getattr(cfg.rollout, "kv_cache_gb", None)
        fit = min(int((kv_gb * GB if kv_gb is not None else KV_FREE_FRACTION * (mem - st.resident))
                      // (st.kv_cache / rollout_rows)) for st in plan.stages if st.kv_cache > 0)
        chunk = min(max(g, (fit // g) * g), rows_per_rank)
        budget = (f"rollout.kv_cache_gb = {kv_gb:g}" if kv_gb is not None else
                  f"{KV_FREE_FRACTION:g} x the memory left after weights, grads and optimizer")
        notes.append(f"rollout.max_rows = auto: {fit} rows fit the KV-cache budget ({budget}); chunks of {chunk} "
                     f"rows{' (fewer than one group: the engine would refuse)' if fit < g else ''}")
        if chunk != rollout_rows:
            plan = plan_memory(dataclasses.replace(inp, rollout_rows=chunk))
    return plan, notes


# ----------------------------------------------------------------------------------------------- output
def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def format_plan(plan: Plan, *, gpu_name: str, assumptions: Sequence[str] = (), planner_only: Sequence[str] = (),
                keep_last: Optional[int] = None) -> str:
    i = plan.inputs
    d = i.shape.dims
    rec = (f"{i.recompute_granularity}" + (f"/{i.recompute_method}/{i.recompute_num_layers}"
                                           if i.recompute_granularity == "full" else "")
           if i.recompute_granularity else "none")
    opt = (f"distributed over DP={i.dp}" if i.distributed_optimizer else "not distributed") + \
        (" (DP=1: nothing to shard)" if i.distributed_optimizer and i.dp == 1 else "")
    lines = [
        f"rcpa-plan: {i.shape.family} {plan.total_params / 1e9:.2f}B params ({d.num_layers} layers, hidden "
        f"{d.hidden_size}, vocab {i.shape.padded_vocab_size}{', tied' if i.shape.tied else ''})",
        f"  layout TP={i.tp} PP={i.pp} DP={i.dp} ({i.tp * i.pp * i.dp} GPUs), {i.dtype}, optimizer {opt}, "
        f"recompute {rec}, sequence parallel {'on' if i.sequence_parallel else 'off'}",
        f"  train: micro-batch {i.micro_batch_size} rows x {i.train_seq_len} tokens, {i.num_micro_batches} "
        f"micro-batches per step; rollout: {i.rollout_rows} rows x ({i.prompt_len} prompt + {i.max_new_tokens} "
        f"new) tokens; image tokens {i.images_per_row} x {i.image_tokens} per row; reference model "
        f"{'yes' if i.reference else 'no'}",
        "",
    ]
    names = [f"stage {s.stage}" for s in plan.stages]
    rows: List[Tuple[str, List[str]]] = [
        ("layers", [str(s.layers) for s in plan.stages]),
        ("params / GPU (B)", [f"{s.params / 1e9:.2f}" for s in plan.stages]),
        ("weights", [_gib(s.weights) for s in plan.stages]),
        ("grads (fp32)", [_gib(s.grads) for s in plan.stages]),
        ("optimizer states", [_gib(s.optimizer) for s in plan.stages]),
        ("reference model", [_gib(s.reference) for s in plan.stages]),
        ("= resident", [_gib(s.resident) for s in plan.stages]),
        ("micro-batches in flight", [str(s.in_flight) for s in plan.stages]),
        ("train activations", [_gib(s.activations) for s in plan.stages]),
        ("  of which vision tower", [_gib(s.vision_activations) for s in plan.stages]),
        ("  of which logits/loss", [_gib(s.loss) for s in plan.stages]),
        ("rollout KV cache", [_gib(s.kv_cache) for s in plan.stages]),
        ("rollout prefill logits", [_gib(s.prefill_logits) for s in plan.stages]),
        ("rollout prefill transient", [_gib(s.prefill_transient) for s in plan.stages]),
        ("= rollout", [_gib(s.rollout) for s in plan.stages]),
        ("PEAK (resident + max)", [_gib(s.peak) for s in plan.stages]),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    w = max(9, max(len(n) for n in names) + 2)
    lines.append("GiB per GPU".ljust(w0) + "".join(n.rjust(w) for n in names))
    for label, vals in rows:
        lines.append(label.ljust(w0) + "".join(v.rjust(w) for v in vals))
    lines.append("")
    worst = max(plan.stages, key=lambda s: s.peak)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"{gpu_name} ({_gib(i.gpu_mem_bytes)} GiB): {verdict}: peak {_gib(plan.peak)} GiB on stage "
                 f"{worst.stage}, headroom {_gib(plan.headroom)} GiB")
    ckpt = plan.checkpoint_bytes
    keep = f"; run.keep_last={keep_last} keeps {keep_last * ckpt / 1e12:.2f} TB" if keep_last else ""
    lines.append(f"checkpoint on disk: model {plan.model_checkpoint_bytes / 1e9:.0f} GB + optimizer "
                 f"{(ckpt - plan.model_checkpoint_bytes) / 1e9:.0f} GB = {ckpt / 1e12:.2f} TB per save{keep}")
    for note in list(assumptions) + plan.notes:
        lines.append(f"note: {note}")
    if planner_only:
        lines.append("note: planned with " + ", ".join(planner_only) + ": not (yet) read by rcpa-train")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between the flags
    try:
        cfg, values, unknown = load_plan_config(args.config, args.overrides)
        plan, notes = plan_from_config(cfg, values, hf_config=args.hf_config, gpu=args.gpu,
                                       gpu_mem_gb=args.gpu_mem_gb, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                       prompt_tokens=args.prompt_tokens, prefix_tokens=args.prefix_tokens,
                                       image_tokens=args.image_tokens, images_per_prompt=args.images_per_prompt)
    except (ValueError, FileNotFoundError) as e:
        print(f"rcpa-plan: error: {e}", file=sys.stderr)
        return 2
    gpu_name = f"{args.gpu_mem_gb:g} GiB GPU" if args.gpu_mem_gb else args.gpu
    keep_last = getattr(cfg.run, "keep_last", None)
    if args.json:
        out = plan.to_dict()
        out.update(gpu=gpu_name, notes=notes + out["notes"], planner_only_keys=unknown, keep_last=keep_last)
        print(json.dumps(out, indent=2, default=_json_default))
    else:
        print(format_plan(plan, gpu_name=gpu_name, assumptions=notes, planner_only=unknown, keep_last=keep_last))
    return 0


def _json_default(obj: Any):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
