"""The plain text families ``llama`` and ``qwen2``: HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` ->
:mod:`megatron_rcpa.models.text_lm`.

Prompt: the tokenizer's chat template (instruct models; the tiny demo's character tokenizer has a ChatML one),
tokenized as ``tokenizer.apply_chat_template(tokenize=True)`` does; without one (base models)
``User: {prompt}\\nAssistant:`` with the tokenizer's special tokens (BOS). A sample with images is an error.
"""

from __future__ import annotations

from typing import Any, Tuple

from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.weight_maps import Entry, decoder_tensor_maps
from megatron_rcpa.models.families import Family, PromptFormat, register


class TextPrompt(PromptFormat):
    """The chat template's prompt (else ``User: {prompt}\\nAssistant:``); samples with images are refused."""

    processor_tokenization = False  # as tokenizer.apply_chat_template(tokenize=True): no special tokens added

    def __init__(self, tokenizer, hf_config, **kwargs: Any) -> None:
        super().__init__(tokenizer, hf_config, **kwargs)
        self.family = hf_config.model_type
        self._no_template_note("User: {prompt}\\nAssistant: (with the tokenizer's BOS)")

    def format(self, sample):
        if sample.images:
            raise ValueError(f"sample {sample.id!r} has images but model.family={self.family!r} is a text model")
        if self.chat_template is not None:
            return self._prompt_input(sample, self.chat_prompt_ids(sample))
        system = "" if self.system_prompt is None else f"System: {self.system_prompt}\n"
        ids = self.tok.encode(f"{system}User: {sample.prompt}\nAssistant:", add_special_tokens=True)
        return self._prompt_input(sample, ids)


def _init_tiny_weights(policy, seed: int) -> None:
    from megatron_rcpa.runtime.weights import init_global_weights

    init_global_weights(policy.language_model, seed=seed)


def _tiny_tokenizer():
    from megatron_rcpa.data.char_tokenizer import CharTokenizer

    return CharTokenizer()


def _text_family(model_type: str, architecture: str, description: str) -> Family:
    def hf_config(config: Any):
        from megatron_rcpa.models.text_lm import text_lm_hf_config

        if isinstance(config, dict) and config.get("model_type") == model_type:
            try:
                return text_lm_hf_config(config, model_type)
            except ValueError as exc:
                raise ConversionError(str(exc)) from exc
        if isinstance(config, dict):
            from megatron_rcpa.convert.hf_io import load_hf_config

            config = load_hf_config(config)
        if getattr(config, "model_type", None) != model_type:
            raise ConversionError(f"expected a {model_type} config, got model_type="
                                  f"{getattr(config, 'model_type', None)!r}")
        return config

    def dims(config: Any):
        from megatron_rcpa.models.text_lm import text_lm_decoder_dims

        return text_lm_decoder_dims(hf_config(config))

    def table(config: Any) -> Tuple[Entry, ...]:
        d = dims(config)
        return decoder_tensor_maps(megatron_prefix="language_model.", hf_prefix="model.", lm_head="lm_head.weight",
                                   qkv_bias=d.qkv_bias, tied=d.tie_word_embeddings)

    def tiny_config(tok, hidden_size: int = 64, num_layers: int = 2):
        from megatron_rcpa.models.tiny import tiny_text_lm_config

        return tiny_text_lm_config(model_type, vocab_size=tok.vocab_size, tie_word_embeddings=True,
                                   max_position_embeddings=1024, hidden_size=hidden_size,
                                   intermediate_size=2 * hidden_size, num_layers=num_layers)

    def save_tiny_hf(path: str, **kwargs: Any) -> str:
        from megatron_rcpa.models.tiny import save_tiny_text_lm

        return save_tiny_text_lm(path, model_type, **kwargs)

    return Family(
        name=model_type, description=description, architectures=(architecture,), hf_config=hf_config,
        decoder_dims=dims, policy_builder="megatron_rcpa.models.text_lm:build_text_policy", table=table,
        prompt_format="megatron_rcpa.models.families.text_lm:TextPrompt", tiny_tokenizer=_tiny_tokenizer,
        tiny_config=tiny_config, save_tiny_hf=save_tiny_hf, init_tiny_weights=_init_tiny_weights,
    )


LLAMA = register(_text_family("llama", "LlamaForCausalLM", "Llama text LM: GPTModel with RoPE"))
QWEN2 = register(_text_family("qwen2", "Qwen2ForCausalLM", "Qwen2 text LM: GPTModel with RoPE and QKV bias"))
