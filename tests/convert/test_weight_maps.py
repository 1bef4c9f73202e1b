"""The parameter-name tables and the TP-aware transforms (plain torch, no megatron process)."""

from __future__ import annotations

import pytest
import torch

from megatron_rcpa.convert.weight_maps import (
    Kind,
    LayerLayout,
    ModuleMap,
    TensorMap,
    decoder_tensor_maps,
    expand_tensor_maps,
    globalize_layer_index,
    to_hf_tensors,
    to_megatron_shard,
)
from megatron_rcpa.models.families.qwen2_5_vl import QWEN2_5_VL

LAYOUTS = [  # heads, kv heads, head dim
    (8, 2, 4), (8, 1, 4), (8, 8, 2), (4, 4, 3),
]


def _layout(heads, kv, hd, vocab=11, padded=16):
    return LayerLayout(num_attention_heads=heads, num_kv_heads=kv, head_dim=hd, vocab_size=vocab,
                       padded_vocab_size=padded)


def _round_trip(kind, hf, layout, tp):
    shards = [to_megatron_shard(kind, hf, tp_rank=r, tp_size=tp, layout=layout) for r in range(tp)]
    back = to_hf_tensors(kind, shards, layout=layout)
    assert len(back) == len(hf)
    for a, b in zip(hf, back):
        assert torch.equal(a, b)
    return shards


@pytest.mark.parametrize("heads,kv,hd", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_round_trip_and_group_layout(heads, kv, hd, tp):
    if kv % tp:
        with pytest.raises(ValueError, match=f"TP={tp} does not divide num_kv_heads={kv}"):
            to_megatron_shard(Kind.QKV, [torch.zeros(heads * hd, 5)] + [torch.zeros(kv * hd, 5)] * 2,
                              tp_rank=0, tp_size=tp, layout=_layout(heads, kv, hd))
        return
    layout = _layout(heads, kv, hd)
    hidden = 6
    q, k, v = torch.randn(heads * hd, hidden), torch.randn(kv * hd, hidden), torch.randn(kv * hd, hidden)
    shards = _round_trip(Kind.QKV, [q, k, v], layout, tp)
    _round_trip(Kind.QKV, [torch.randn(heads * hd), torch.randn(kv * hd), torch.randn(kv * hd)], layout, tp)
    # megatron's linear_qkv: per query group g, [q heads of g; k_g; v_g], groups split contiguously over TP
    full = torch.cat(shards, dim=0).view(kv, (heads // kv + 2) * hd, hidden)
    per = heads // kv
    for g in range(kv):
        assert torch.equal(full[g, : per * hd], q[g * per * hd:(g + 1) * per * hd])
        assert torch.equal(full[g, per * hd:(per + 1) * hd], k[g * hd:(g + 1) * hd])
        assert torch.equal(full[g, (per + 1) * hd:], v[g * hd:(g + 1) * hd])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_fc1_vocab_row_column_replicated(tp):
    layout = _layout(4, 2, 2, vocab=11, padded=16)
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    shards = _round_trip(Kind.GATED_FC1, [gate, up], layout, tp)
    for r, shard in enumerate(shards):  # each rank holds [its gate rows; its up rows]
        assert torch.equal(shard, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    table = torch.randn(11, 3)
    shards = _round_trip(Kind.VOCAB, [table], layout, tp)
    padded = torch.cat(shards)
    assert padded.shape == (16, 3) and torch.all(padded[11:] == 0)
    _round_trip(Kind.ROW, [torch.randn(3, 8)], layout, tp)
    _round_trip(Kind.COLUMN, [torch.randn(8, 3)], layout, tp)
    shards = _round_trip(Kind.REPLICATED, [torch.randn(5)], layout, tp)
    assert all(torch.equal(s, shards[0]) for s in shards)


def test_transform_errors_name_the_problem():
    layout = _layout(4, 2, 2, vocab=11, padded=16)
    with pytest.raises(ValueError, match="expected num_heads\\*head_dim = 4\\*2"):
        to_megatron_shard(Kind.QKV, [torch.zeros(6, 3), torch.zeros(4, 3), torch.zeros(4, 3)], tp_rank=0, tp_size=1,
                          layout=layout)
    with pytest.raises(ValueError, match="vocab_size=11"):
        to_megatron_shard(Kind.VOCAB, [torch.zeros(12, 3)], tp_rank=0, tp_size=1, layout=layout)
    with pytest.raises(ValueError, match="differ"):
        to_megatron_shard(Kind.GATED_FC1, [torch.zeros(8, 3), torch.zeros(6, 3)], tp_rank=0, tp_size=1,
                          layout=layout)


def test_decoder_table_is_shared_and_parameterised():
    qwen = decoder_tensor_maps(megatron_prefix="language_model.", hf_prefix="model.", lm_head="lm_head.weight",
                               qkv_bias=True, tied=False)
    llama_like = decoder_tensor_maps(megatron_prefix="", hf_prefix="model.", lm_head="lm_head.weight",
                                     qkv_bias=False, tied=True)
    assert len(qwen) == len(llama_like) + 1  # + the QKV bias
    assert not any(m.megatron.endswith("linear_qkv.bias") for m in llama_like)
    head = [m for m in llama_like if m.megatron == "output_layer.weight"][0]
    assert head.hf == ("model.embed_tokens.weight",) and not head.export  # tied: filled from, not written to
    expanded = expand_tensor_maps(qwen, num_layers=3)
    tmap, hf = expanded["language_model.decoder.layers.2.mlp.linear_fc1.weight"]
    assert tmap.kind is Kind.GATED_FC1
    assert hf == ("model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight")


def test_globalize_layer_index():
    name = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    assert globalize_layer_index(name, 0) == name
    assert globalize_layer_index("language_model.decoder.layers.1.x", 12) == "language_model.decoder.layers.13.x"
    assert globalize_layer_index("vision_model.blocks.1.x", 12) == "vision_model.blocks.1.x"


@pytest.mark.parametrize("tied,kv", [(False, 2), (True, 1)])
def test_qwen2_5_vl_table_covers_every_hf_tensor_exactly_once(tied, kv):
    from megatron_rcpa.models.tiny import tiny_qwen2_5_vl_config

    config = tiny_qwen2_5_vl_config(num_layers=3, num_key_value_heads=kv, tie_word_embeddings=tied)
    expected = QWEN2_5_VL.expected_hf_tensors(config)
    assert ("lm_head.weight" in expected) is not tied
    entries = QWEN2_5_VL.table(config)
    written = []
    for _, (tmap, hf) in expand_tensor_maps(entries, 3).items():
        assert set(hf) <= set(expected), hf
        if tmap.export:
            written += hf
    vision = [e for e in entries if isinstance(e, ModuleMap)]
    assert [(v.megatron_prefix, v.hf_prefix) for v in vision] == [("vision_model.", "visual.")]
    written += [n for n in expected if n.startswith("visual.")]
    assert sorted(written) == sorted(expected)  # every HF tensor written back exactly once
    assert all(isinstance(e, (TensorMap, ModuleMap)) for e in entries)
