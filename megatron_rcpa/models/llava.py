"""LLaVA (HF ``LlavaForConditionalGeneration``: CLIP or SigLIP vision tower + MLP projector + Llama / Qwen2
language model) as a Megatron-Core policy at any TP/PP.

Layout: the three modules of megatron's ``LLaVAModel``, under its attribute names, so parameter and
distributed-checkpoint keys are the ones ``LLaVAModel`` uses:

* ``language_model``: megatron ``GPTModel`` (local spec, RoPE), the shared Llama / Qwen2 decoder
  (:func:`~megatron_rcpa.models.decoder.decoder_transformer_config`);
* ``vision_model``: megatron ``CLIPViTModel`` (``model_subtype`` ``"clip"`` or ``"siglip"``), TP-sharded
  like the decoder (column/row-parallel QKV, projection and MLP), non-causal attention, LayerNorm with bias;
  it is built with only the layers HF's ``vision_feature_layer`` reads (``-2``: all but the last);
* ``vision_projection``: megatron ``MultimodalProjector`` (``"mlp"``: linear_fc1 -> act -> linear_fc2),
  column/row parallel.

The vision model and projector live on the first pipeline stage. HF tensors that LLaVA's forward never
reads (the vision tower's layers past ``vision_feature_layer``, its ``post_layernorm``, SigLIP's pooling
head) are kept as frozen buffers under ``vision_unused.`` (first stage only; saved in the checkpoint) so a
checkpoint converts back to HF losslessly; nothing computes with them.

Why not ``LLaVAModel`` itself: its forward expands *one* image token per image into the image's features
(megatron's data convention), while HF prompts already hold one image token per feature; its constructor
cannot build a CLIP ViT without Transformer Engine (it passes ``config=`` to ``torch.nn.LayerNorm``), and
its SigLIP path applies ``post_layernorm``, which HF LLaVA does not. This policy scatters the projected
features into the token embeddings at HF's image-token positions, as transformers does.

:class:`LlavaPolicy` runs the shared forward of every policy
(:meth:`~megatron_rcpa.models.policy_base.DecoderPolicy.forward`; ``pixel_values`` [N, 3, H, W], one image
per block of image tokens; ``image_grid_thw`` must be None): vocab-parallel logits, per-token cross entropy,
``loss_fn``, and KV-cache prefill / decoding. Positions are 0..S-1 per row as in transformers.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_rcpa.models.decoder import DecoderDims
from megatron_rcpa.models.policy_base import DecoderPolicy, build_decoder_policy
from megatron_rcpa.models.text_lm import TEXT_MODEL_TYPES, text_lm_decoder_dims

__all__ = [
    "LLAVA_VISION_TYPES",
    "LlavaPolicy",
    "VisionDims",
    "build_llava_policy",
    "llava_decoder_dims",
    "llava_hf_config",
    "llava_unused_vision_tensors",
    "llava_vision_dims",
    "vit_layer_local_spec",
]

#: HF vision config model_type -> megatron CLIPViTModel subtype
LLAVA_VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


# ------------------------------------------------------------------------------------------ activations
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


#: HF ``hidden_act`` / ``projector_hidden_act`` names -> functions (module level: configs get deep-copied)
_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def _activation(name: str, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"{key}={name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------- config
def llava_hf_config(hf_config: Any):
    """An HF ``LlavaConfig`` from a config object or its ``config.json`` dict; ValueError naming the key
    for a vision tower or language model this policy cannot hold."""
    import transformers

    if isinstance(hf_config, dict):
        if hf_config.get("model_type") != "llava":
            raise ValueError(f"expected a llava config, got model_type={hf_config.get('model_type')!r}")
        hf_config = transformers.LlavaConfig.from_dict(
            {k: v for k, v in copy.deepcopy(hf_config).items() if k != "model_type"})
    if getattr(hf_config, "model_type", None) != "llava":
        raise ValueError(f"expected a llava config, got model_type={getattr(hf_config, 'model_type', None)!r}")
    vision = getattr(hf_config.vision_config, "model_type", None)
    if vision not in LLAVA_VISION_TYPES:
        raise ValueError(f"vision_config.model_type={vision!r} is not supported; expected one of "
                         f"{sorted(LLAVA_VISION_TYPES)}")
    text = getattr(hf_config.text_config, "model_type", None)
    if text not in TEXT_MODEL_TYPES:
        raise ValueError(f"text_config.model_type={text!r} is not supported; expected one of "
                         f"{sorted(TEXT_MODEL_TYPES)}")
    return hf_config


def llava_decoder_dims(hf_config: Any) -> DecoderDims:
    """The language model's sizes; tied embeddings as ``LlavaConfig.tie_word_embeddings`` says (it folds in
    the text config's flag)."""
    hf_config = llava_hf_config(hf_config)
    dims = text_lm_decoder_dims(hf_config.text_config)
    return dataclasses.replace(dims, tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))


@dataclasses.dataclass(frozen=True)
class VisionDims:
    """The vision tower and projector of a LLaVA config, as the megatron modules need them."""

    kind: str  # "clip" | "siglip"
    num_layers: int  # in the HF tower
    num_layers_used: int  # layers up to the one vision_feature_layer reads
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    head_dim: int
    image_size: int
    patch_size: int
    norm_eps: float
    hidden_act: str
    select_strategy: str  # "default" (drop the first position) | "full"
    projector_act: str
    projector_bias: bool
    text_hidden_size: int

    @property
    def class_token_len(self) -> int:
        return 1 if self.kind == "clip" else 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Image tokens (= features) per image in the prompt."""
        seq = self.num_patches + self.class_token_len
        return seq - 1 if self.select_strategy == "default" else seq


def llava_vision_dims(hf_config: Any) -> VisionDims:
    """Read and check the vision side of a LLaVA config (ValueError naming the key)."""
    hf_config = llava_hf_config(hf_config)
    vc = hf_config.vision_config
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: several feature layers (concatenated) are not "
                         "supported; use one layer index")
    total = int(vc.num_hidden_layers)
    used = layer if layer >= 0 else total + 1 + layer  # HF hidden_states[k] = output after k layers
    if not 1 <= used <= total:
        raise ValueError(f"vision_feature_layer={layer} selects the output of {used} of {total} vision layers; "
                         f"it must select between 1 and {total}")
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r}; expected 'default' or 'full'")
    if int(getattr(vc, "num_channels", 3)) != 3:
        raise ValueError(f"vision_config.num_channels={vc.num_channels}: megatron's CLIPViTModel takes RGB (3)")
    image, patch = int(vc.image_size), int(vc.patch_size)
    if image % patch:
        raise ValueError(f"vision_config.image_size={image} is not a multiple of patch_size={patch}")
    heads, hidden = int(vc.num_attention_heads), int(vc.hidden_size)
    if hidden % heads:
        raise ValueError(f"vision_config.hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    act = vc.hidden_act
    _activation(act, "vision_config.hidden_act")
    _activation(hf_config.projector_hidden_act, "projector_hidden_act")
    return VisionDims(
        kind=LLAVA_VISION_TYPES[vc.model_type], num_layers=total, num_layers_used=used, hidden_size=hidden,
        ffn_hidden_size=int(vc.intermediate_size), num_attention_heads=heads, head_dim=hidden // heads,
        image_size=image, patch_size=patch, norm_eps=float(vc.layer_norm_eps), hidden_act=act,
        select_strategy=strategy, projector_act=hf_config.projector_hidden_act,
        projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
        text_hidden_size=int(hf_config.text_config.hidden_size),
    )


def check_vision_layout(vd: VisionDims, *, tp: int) -> None:
    """Raise ValueError naming the vision / projector size that TP does not divide."""
    for name, value in (("vision_config.num_attention_heads", vd.num_attention_heads),
                        ("vision_config.intermediate_size", vd.ffn_hidden_size),
                        ("text_config.hidden_size (projector width)", vd.text_hidden_size)):
        if value % tp:
            raise ValueError(f"TP={tp} does not divide {name}={value}")


def llava_unused_vision_tensors(hf_config: Any) -> Dict[str, Tuple[int, ...]]:
    """Name (below ``vision_tower.``) -> shape of the HF vision-tower tensors LLaVA's forward never reads:
    layers past ``vision_feature_layer``, ``post_layernorm``, a SigLIP pooling head."""
    import re

    from transformers import AutoModel

    hf_config = llava_hf_config(hf_config)
    vd = llava_vision_dims(hf_config)
    with torch.device("meta"):
        tower = AutoModel.from_config(hf_config.vision_config)
    out = {}
    for name, tensor in tower.state_dict().items():
        if name.startswith("vision_model."):  # transformers-4 layout
            name = name[len("vision_model."):]
        m = re.match(r"encoder\.layers\.(\d+)\.", name)
        if name.startswith(("embeddings.", "pre_layrnorm.")) or (m and int(m.group(1)) < vd.num_layers_used):
            continue
        if name.endswith("position_ids"):  # a non-persistent buffer
            continue
        out[name] = tuple(tensor.shape)
    return out


# ------------------------------------------------------------------------------------- megatron configs
def vit_layer_local_spec():
    """The ViT layer on megatron's local modules: LayerNorm (torch), column/row-parallel linears with bias,
    *non-causal* attention (megatron's ``get_vit_layer_with_local_spec`` masks causally)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                                                   linear_proj=RowParallelLinear),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _common_config_kwargs(*, tp: int, params_dtype: torch.dtype, perform_initialization: bool) -> Dict[str, Any]:
    return dict(
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, use_cpu_initialization=True, perform_initialization=perform_initialization,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, params_dtype=params_dtype,
        pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
    )


def vision_transformer_config(vd: VisionDims, *, tp: int, params_dtype: torch.dtype = torch.float32,
                              perform_initialization: bool = True, **overrides: Any):
    """The ViT's megatron ``TransformerConfig`` (one pipeline stage: the vision model is not pipelined)."""
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=vd.num_layers_used, hidden_size=vd.hidden_size, ffn_hidden_size=vd.ffn_hidden_size,
        num_attention_heads=vd.num_attention_heads, num_query_groups=vd.num_attention_heads,
        kv_channels=vd.head_dim, normalization="LayerNorm", layernorm_epsilon=vd.norm_eps, gated_linear_unit=False,
        activation_func=_activation(vd.hidden_act, "vision_config.hidden_act"), add_bias_linear=True,
        add_qkv_bias=True,
        **_common_config_kwargs(tp=tp, params_dtype=params_dtype, perform_initialization=perform_initialization),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def projection_config(vd: VisionDims, *, tp: int, params_dtype: torch.dtype = torch.float32,
                      perform_initialization: bool = True):
    """The projector's config: an MLP vision hidden -> text hidden -> text hidden (HF ``linear_1``/``linear_2``)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=vd.text_hidden_size, ffn_hidden_size=vd.text_hidden_size,
        num_attention_heads=tp,  # unused by an MLP; megatron wants TP to divide it
        gated_linear_unit=False,
        activation_func=_activation(vd.projector_act, "projector_hidden_act"), add_bias_linear=vd.projector_bias,
        **_common_config_kwargs(tp=tp, params_dtype=params_dtype, perform_initialization=perform_initialization),
    )


class _FrozenTensors(torch.nn.Module):
    """Buffers at nested names (``a.b.0.weight``) mirroring an HF module's state dict; never trained."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], dtype: torch.dtype) -> None:
        super().__init__()
        for name, shape in sorted(shapes.items()):
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_buffer(leaf, torch.zeros(shape, dtype=dtype))


# ----------------------------------------------------------------------------------------------- policy
class LlavaPolicy(DecoderPolicy):
    """A LLaVA policy (one pipeline stage of it). Build it with :func:`build_llava_policy`."""

    def __init__(self, hf_config: Any, config, vision_config, projector_config, *, padded_vocab_size: int,
                 pre_process: bool = True, post_process: bool = True, transformer_layer_spec=None,
                 vision_layer_spec=None) -> None:
        super().__init__(config=config)
        hf_config = llava_hf_config(hf_config)
        self._build_language_model(hf_config, llava_decoder_dims(hf_config), config,
                                   padded_vocab_size=padded_vocab_size, pre_process=pre_process,
                                   post_process=post_process, transformer_layer_spec=transformer_layer_spec)
        vd = llava_vision_dims(hf_config)
        self.vision_dims = vd
        self.image_token_id = int(hf_config.image_token_id)
        self.vision_model = self.vision_projection = self.vision_unused = None
        if not pre_process:
            return
        from megatron.core.models.vision.clip_vit_model import CLIPViTModel
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        self.vision_model = CLIPViTModel(
            vision_config, vision_layer_spec or vit_layer_local_spec(),
            ln_pre_impl=WrappedTorchNorm,
            ln_post_impl=IdentityOp,  # SigLIP: HF LLaVA reads hidden states before post_layernorm
            add_class_token=vd.class_token_len > 0, class_token_len=vd.class_token_len, patch_dim=vd.patch_size,
            img_h=vd.image_size, img_w=vd.image_size, model_subtype=vd.kind,
        )
        self.vision_projection = MultimodalProjector(
            projector_config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            projector_type="mlp", input_size=vd.hidden_size)
        unused = llava_unused_vision_tensors(hf_config)
        self.vision_unused = _FrozenTensors(unused, config.params_dtype) if unused else None

    # ------------------------------------------------------------------------------------ megatron glue
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The language model's, the ViT's and the projector's sharded state (TP-sharded where the modules
        are), plus the frozen unused HF tensors as replicated tensors."""
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for name in ("vision_model", "vision_projection"):
            module = getattr(self, name)
            if module is not None:
                sharded.update(module.sharded_state_dict(prefix=f"{prefix}{name}.", metadata=metadata))
        if self.vision_unused is not None:
            for name, tensor in self.vision_unused.state_dict(keep_vars=True).items():
                key = f"{prefix}vision_unused.{name}"
                sharded[key] = make_sharded_tensor_for_checkpoint(tensor, key, prepend_offsets=sharded_offsets)
        return sharded

    # ---------------------------------------------------------------------------------------- images
    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        want = (3, self.vision_dims.image_size, self.vision_dims.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [num_images, {want[0]}, {want[1]}, {want[2]}] (the vision "
                             f"tower's image_size), got {list(pixel_values.shape)}")

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] preprocessed images -> [N, tokens_per_image, text hidden] projected features."""
        if not self.pre_process:
            raise RuntimeError("image_features() runs on the first pipeline stage only")
        vd = self.vision_dims
        self._check_pixels(pixel_values)
        dtype = self.vision_model.conv1.weight.dtype
        hidden = self.vision_model(pixel_values.to(dtype))  # [N, seq, vision hidden]
        if vd.select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.vision_projection(hidden.contiguous())

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, *,
              strict: bool = True) -> torch.Tensor:
        """[S, B, H] decoder input: token embeddings with the projected image features at the image tokens
        (images in order, ``tokens_per_image`` tokens each). ``strict``: image tokens without
        ``pixel_values`` are an error (off for decode steps)."""

        def features(num_image_tokens: int) -> torch.Tensor:
            self._check_pixels(pixel_values)
            per_image = self.vision_dims.tokens_per_image
            if num_image_tokens != pixel_values.shape[0] * per_image:
                raise ValueError(f"input_ids hold {num_image_tokens} image tokens (id {self.image_token_id}) but "
                                 f"pixel_values has {pixel_values.shape[0]} image(s) of {per_image} tokens each")
            return self.image_features(pixel_values)

        return self._embed_with_images(input_ids, self.image_token_id, pixel_values, features, strict=strict)

    # ------------------------------------------------------------------------------ forward hooks
    def check_image_inputs(self, pixel_values, image_grid_thw) -> None:
        """``pixel_values`` [N, 3, image_size, image_size] in the order of their image tokens (as HF's
        processor expands ``<image>``: ``tokens_per_image`` each); no ``image_grid_thw``."""
        if image_grid_thw is not None:
            raise ValueError("a LLaVA policy takes no image_grid_thw: its images are "
                             f"{self.vision_dims.image_size}x{self.vision_dims.image_size} pixel_values")

    def embed_input(self, input_ids, pixel_values, image_grid_thw, *, strict: bool) -> torch.Tensor:
        return self.embed(input_ids, pixel_values, strict=strict)

    def cast_to(self, dtype: torch.dtype) -> None:
        self.to(dtype=dtype)  # torch norms and the patch convolution are created in fp32


def build_llava_policy(hf_config: Any, *, vision_layer_spec=None,
                       vision_config_overrides: Optional[Dict[str, Any]] = None, **kwargs: Any) -> LlavaPolicy:
    """Build this rank's stage of a LLaVA policy at the current megatron TP/PP layout (keywords of
    :func:`~megatron_rcpa.models.policy_base.build_decoder_policy`; ``vision_config_overrides`` go to the
    ViT's ``TransformerConfig``; the Qwen2.5-VL-only ``vision_attn_implementation`` is accepted and
    ignored)."""
    hf_config = llava_hf_config(hf_config)
    vd = llava_vision_dims(hf_config)
    kwargs.pop("vision_attn_implementation", None)

    def make(config, *, tp, dtype, perform_initialization, **stage: Any) -> LlavaPolicy:
        check_vision_layout(vd, tp=tp)
        vision = vision_transformer_config(vd, tp=tp, params_dtype=dtype, perform_initialization=perform_initialization,
                                           **(vision_config_overrides or {}))
        projector = projection_config(vd, tp=tp, params_dtype=dtype, perform_initialization=perform_initialization)
        return LlavaPolicy(hf_config, config, vision, projector, vision_layer_spec=vision_layer_spec, **stage)

    return build_decoder_policy(make, llava_decoder_dims(hf_config), what="LLaVA", **kwargs)
