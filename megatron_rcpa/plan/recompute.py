"""``model.recompute_*`` -> megatron ``TransformerConfig`` keyword arguments (for the family builders'
``config_overrides=``)."""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["recompute_overrides"]


def recompute_overrides(model_cfg: Any) -> Dict[str, Any]:
    """The ``TransformerConfig`` kwargs of ``model_cfg``'s recompute settings (a ``ModelConfig`` or anything
    with ``recompute_granularity`` / ``recompute_method`` / ``recompute_num_layers``); ``{}`` when off.

    ``full``: whole layers are recomputed in backward (``uniform``: the stage's layers in chunks of
    ``recompute_num_layers``, one checkpoint each; ``block``: the first ``recompute_num_layers`` layers of each
    stage). ``selective``: megatron's core-attention checkpointing (``recompute_modules=["core_attn"]``)."""
    granularity = getattr(model_cfg, "recompute_granularity", None)
    method = getattr(model_cfg, "recompute_method", None)
    num_layers = getattr(model_cfg, "recompute_num_layers", None)
    if granularity is None:
        if method is not None or num_layers is not None:
            raise ValueError(f"model.recompute_method = {method!r} / model.recompute_num_layers = {num_layers!r} "
                             "need model.recompute_granularity = 'full'")
        return {}
    if granularity == "full":
        if method not in ("uniform", "block"):
            raise ValueError(f"model.recompute_method = {method!r}: expected 'uniform' or 'block' with "
                             "model.recompute_granularity = 'full'")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"model.recompute_num_layers = {num_layers!r}: expected an integer >= 1 with "
                             "model.recompute_granularity = 'full'")
        return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise ValueError(f"model.recompute_method / recompute_num_layers ({method!r}, {num_layers!r}) apply only "
                             "to model.recompute_granularity = 'full', not 'selective'")
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    raise ValueError(f"model.recompute_granularity = {granularity!r}: expected None, 'full' or 'selective'")
