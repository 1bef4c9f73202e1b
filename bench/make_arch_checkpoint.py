"""Write an architecture-only checkpoint directory for profiling: the metadata of a Qwen2.5-VL model (no
weights; ``tools/profile_throughput.py`` without ``--load-weights`` builds it with random weights).

    python bench/make_arch_checkpoint.py OUT_DIR [--preset 1.5b]

Preset ``1.5b``: the Qwen2.5-1.5B language model (hidden 1536, 28 layers, 12 heads / 2 KV heads, FFN 8960,
vocab 151936, tied embeddings; 1.54B parameters) with the Qwen2.5-VL vision tower (depth 32, hidden 1280;
0.67B).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    "1.5b": dict(
        text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1536,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="1.5b")
    args = p.parse_args()
    from transformers import Qwen2_5_VLConfig

    from megatron_rcpa.convert.checkpoint import METADATA_FILE, MODEL_DIR, CheckpointMetadata

    spec = PRESETS[args.preset]
    cfg = Qwen2_5_VLConfig(text_config=spec["text"], vision_config=spec["vision"], image_token_id=151655,
                           video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                           tie_word_embeddings=spec["text"]["tie_word_embeddings"])
    vocab = spec["text"]["vocab_size"]
    meta = CheckpointMetadata(family="qwen2_5_vl", hf_config=cfg.to_dict(), dtype="bf16", vocab_size=vocab,
                              padded_vocab_size=-(-vocab // 128) * 128, extra={"architecture_only": True})
    os.makedirs(os.path.join(args.out, MODEL_DIR), exist_ok=True)
    with open(os.path.join(args.out, METADATA_FILE), "w") as f:
        f.write(meta.to_json())
    print(json.dumps({"out": args.out, "preset": args.preset}))


if __name__ == "__main__":
    main()
