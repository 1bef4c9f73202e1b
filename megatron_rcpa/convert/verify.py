"""Parity gate for a conversion: the same image+text batch through HF and through the megatron checkpoint at
a TP/PP layout, plus a per-tensor round trip (megatron -> HF names at that layout vs the HF files).

    report = verify_conversion(hf_dir, megatron_dir, tp=2, pp=1)
    print(report.format()); sys.exit(0 if report.passed else 1)

The batch (:func:`build_verification_batch`) has two rows of equal length holding three images (one row with
two images), made from deterministic synthetic pictures: for Qwen2.5-VL of different grids, preprocessed as
the HF Qwen2-VL image processor does (:func:`patchify_image`); for LLaVA at the tower's image size
(:func:`normalize_image`); both with the normalisation of the checkpoint's ``preprocessor_config.json``
(no PIL/torchvision needed). Text families get two rows of random tokens. HF runs in fp32 in this process;
megatron runs on ``tp * pp`` ranks (gloo on CPU, NCCL on GPU) in the checkpoint's dtype. Before anything is
loaded, every file of the megatron checkpoint (and of the HF directory, when it has a manifest) is checked
against its manifest, sha256 included, and the dist-checkpoint metadata is read through the allow-list.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_rcpa.convert.checkpoint import ASSETS_DIR, MODEL_DIR, read_metadata
from megatron_rcpa.convert.errors import ConversionError
from megatron_rcpa.convert.families import family_by_name
from megatron_rcpa.convert.hf_io import HFCheckpointReader, load_hf_config
from megatron_rcpa.convert.manifest import MANIFEST_FILE, check_manifest
from megatron_rcpa.convert.safe_metadata import check_dcp_metadata
from megatron_rcpa.data.vision import normalize_image

__all__ = ["TensorCheck", "VerificationReport", "build_verification_batch", "normalize_image", "patchify_image",
           "verify_conversion"]

DEFAULT_TOLERANCES = {"fp32": (1e-3, 0.99999), "bf16": (1.0, 0.999), "fp16": (1.0, 0.999)}


@dataclasses.dataclass
class TensorCheck:
    name: str
    shape: Tuple[int, ...]
    dtype: str
    max_abs_diff: float
    status: str  # "exact" | "differs" | "missing" | "extra" | "shape"


@dataclasses.dataclass
class VerificationReport:
    tp: int
    pp: int
    dtype: str
    atol: float
    min_cosine: float
    max_abs_diff: float
    cosine: torch.Tensor  # [B, S] per-position cosine similarity of the logits
    position_max_abs_diff: torch.Tensor  # [B, S]
    input_ids: torch.Tensor
    tensors: List[TensorCheck]

    @property
    def logits_ok(self) -> bool:
        return self.max_abs_diff <= self.atol and float(self.cosine.min()) >= self.min_cosine

    @property
    def tensors_ok(self) -> bool:
        return all(t.status == "exact" for t in self.tensors)

    @property
    def passed(self) -> bool:
        return self.logits_ok and self.tensors_ok

    def format(self) -> str:
        lines = [f"verify_conversion: TP={self.tp} PP={self.pp} megatron dtype={self.dtype}",
                 "", "per-position logits (HF fp32 vs megatron):",
                 f"  {'row':>3} {'pos':>4} {'token':>8} {'max|dlogit|':>12} {'cosine':>10}"]
        batch, seq = self.input_ids.shape
        for b in range(batch):
            for s in range(seq):
                lines.append(f"  {b:>3} {s:>4} {int(self.input_ids[b, s]):>8} "
                             f"{float(self.position_max_abs_diff[b, s]):>12.3e} {float(self.cosine[b, s]):>10.7f}")
        lines += ["", "per-tensor round trip (HF file vs megatron -> HF at this layout):",
                  f"  {'tensor':<64} {'shape':<18} {'dtype':<9} {'max|d|':>10}  status"]
        for t in self.tensors:
            lines.append(f"  {t.name:<64} {str(list(t.shape)):<18} {t.dtype:<9} {t.max_abs_diff:>10.3e}  {t.status}")
        exact = sum(t.status == "exact" for t in self.tensors)
        lines += ["",
                  f"max |delta logit| = {self.max_abs_diff:.3e} (tolerance {self.atol:g})",
                  f"min cosine        = {float(self.cosine.min()):.7f} (tolerance {self.min_cosine:g})",
                  f"tensors exact     = {exact}/{len(self.tensors)}",
                  f"RESULT: {'PASS' if self.passed else 'FAIL'}"]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the batch
def _synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic RGB picture: smooth gradients, a disc and some noise (uint8 [H, W, 3])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(xx / (7 + seed))
    g = 127 + 120 * np.cos(yy / (5 + seed))
    disc = ((yy - height / 2) ** 2 + (xx - width / 3) ** 2) < (min(height, width) / 3) ** 2
    b = np.where(disc, 230.0, 30.0)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 8, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)




def _processor_settings(asset_dirs: List[str]) -> Dict[str, Any]:
    """Normalisation settings from the first ``preprocessor_config.json`` found (CLIP defaults otherwise)."""
    import json

    for d in asset_dirs:
        path = os.path.join(d, "preprocessor_config.json") if d else ""
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError):
                pass
    return {}


def patchify_image(image: np.ndarray, *, patch_size: int, merge_size: int, temporal_patch_size: int,
                   settings: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, List[int]]:
    """Qwen2-VL flattened patches of one RGB uint8 image whose sides are multiples of patch*merge
    (so the processor would not resize it): rescale, normalise, patchify exactly as the HF image processor
    does. Returns ([h*w, 3*T*P*P] float32, [1, h, w])."""
    height, width, _ = image.shape
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(f"image of {height}x{width} is not a multiple of {unit} on both sides")
    x = normalize_image(image, settings)  # C, H, W
    gh, gw = height // patch_size, width // patch_size
    x = x.reshape(3, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # gh/m, gw/m, m, m, C, P, P
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    patches = np.ascontiguousarray(x).reshape(gh * gw, 3 * temporal_patch_size * patch_size * patch_size)
    return torch.from_numpy(patches.copy()), [1, gh, gw]


def build_verification_batch(hf_config: Any, *, asset_dirs: Optional[List[str]] = None,
                             seed: int = 0) -> Dict[str, torch.Tensor]:
    """input_ids [2, S], pixel_values, image_grid_thw [3, 3], mm_token_type_ids [2, S] (no padding);
    LLaVA: input_ids [2, S] and pixel_values [3, 3, H, W]; text-only families (no ``vision_config``):
    input_ids [2, 16] alone."""
    gen = torch.Generator().manual_seed(seed)
    if getattr(hf_config, "vision_config", None) is None:
        vocab = min(int(hf_config.vocab_size), 100_000)
        return {"input_ids": torch.randint(0, vocab, (2, 16), generator=gen)}
    if getattr(hf_config, "model_type", None) == "llava":
        return _llava_batch(hf_config, _processor_settings(list(asset_dirs or [])), gen)
    vc = hf_config.vision_config
    settings = _processor_settings(list(asset_dirs or []))
    merge = vc.spatial_merge_size
    unit = vc.patch_size * merge
    images = [_synthetic_image(2 * unit, 3 * unit, 1), _synthetic_image(2 * unit, 2 * unit, 2),
              _synthetic_image(2 * unit, 2 * unit, 3)]
    patched = [patchify_image(img, patch_size=vc.patch_size, merge_size=merge,
                              temporal_patch_size=vc.temporal_patch_size, settings=settings) for img in images]
    pixel_values = torch.cat([p for p, _ in patched], dim=0)
    grid = torch.tensor([g for _, g in patched], dtype=torch.long)
    counts = [int(g.prod()) // (merge * merge) for g in grid]

    text_vocab = min(hf_config.text_config.vocab_size, 100_000)
    special = {hf_config.image_token_id, hf_config.video_token_id, hf_config.vision_start_token_id,
               hf_config.vision_end_token_id}

    def text(n: int) -> List[int]:
        ids = torch.randint(0, text_vocab, (n,), generator=gen).tolist()
        return [i if i not in special else (i + 7) % text_vocab for i in ids]

    def image(i: int) -> List[int]:
        image_tokens = [hf_config.image_token_id] * counts[i]
        return [hf_config.vision_start_token_id] + image_tokens + [hf_config.vision_end_token_id]

    row0 = text(4) + image(0) + text(5)
    row1 = text(2) + image(1) + text(3) + image(2)
    row1 += text(len(row0) - len(row1))
    input_ids = torch.tensor([row0, row1], dtype=torch.long)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "image_grid_thw": grid,
            "mm_token_type_ids": (input_ids == hf_config.image_token_id).int()}


def _llava_batch(hf_config: Any, settings: Dict[str, Any], gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Two rows: one image between text; two images (the second at the end). Three synthetic pictures made at
    the tower's image size (no resize), normalised per ``settings``."""
    from megatron_rcpa.models.llava import llava_vision_dims

    side = int(hf_config.vision_config.image_size)
    per_image = llava_vision_dims(hf_config).tokens_per_image
    pixel_values = torch.stack([torch.from_numpy(normalize_image(_synthetic_image(side, side, k), settings))
                                for k in (1, 2, 3)])
    vocab = min(int(hf_config.text_config.vocab_size), 100_000)
    image = int(hf_config.image_token_id)

    def text(n: int) -> List[int]:
        return [i if i != image else (i + 7) % vocab for i in torch.randint(0, vocab, (n,), generator=gen).tolist()]

    row0 = text(4) + [image] * per_image + text(5)
    row1 = text(2) + [image] * per_image + text(3) + [image] * per_image
    row0 += text(max(0, len(row1) - len(row0)))
    row1 += text(max(0, len(row0) - len(row1)))
    return {"input_ids": torch.tensor([row0, row1], dtype=torch.long), "pixel_values": pixel_values}


def hf_logits(hf_dir: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """HF logits [B, S, V] in fp32 on this process's CPU."""
    import transformers

    config = load_hf_config(hf_dir)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True, trust_remote_code=False).eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits.float()


# -------------------------------------------------------------------------------------- megatron side
def _verify_rank(megatron_dir: str, hf_dir: str, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    from megatron.core import parallel_state

    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.convert.megatron_to_hf import export_hf_tensors
    from megatron_rcpa.models.inference import gather_vocab_logits
    from megatron_rcpa.models.pipeline import pipeline_forward

    policy, meta = build_policy_from_checkpoint(megatron_dir)
    policy.eval()
    family = family_by_name(meta.family)
    device = next(policy.parameters()).device
    ids = batch["input_ids"].to(device)
    mb = {k: batch[k].to(device) for k in ("input_ids", "pixel_values", "image_grid_thw") if k in batch}
    outputs = pipeline_forward(policy, [mb], seq_length=ids.shape[1], micro_batch_size=ids.shape[0])
    result: Dict[str, Any] = {"logits": None, "tensors": []}
    if outputs is not None:
        logits = gather_vocab_logits(outputs[0], meta.vocab_size)
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            result["logits"] = logits.float().cpu()

    reader = HFCheckpointReader(hf_dir, family.hf_aliases)
    source = family.hf_config(load_hf_config(hf_dir))
    from megatron_rcpa.models.decoder import parse_dtype

    stored = parse_dtype(meta.dtype)
    for name, tensor in export_hf_tensors(policy, family, source):
        if name not in reader:
            result["tensors"].append(TensorCheck(name, tuple(tensor.shape), str(tensor.dtype), float("nan"), "extra"))
            continue
        original = reader.get(name)
        if tuple(original.shape) != tuple(tensor.shape):
            result["tensors"].append(TensorCheck(name, tuple(tensor.shape), str(tensor.dtype), float("nan"), "shape"))
            continue
        reference = original.to(stored)  # what the checkpoint can hold
        diff = (tensor.float() - reference.float()).abs().max().item() if tensor.numel() else 0.0
        status = "exact" if torch.equal(tensor, reference) else "differs"
        result["tensors"].append(TensorCheck(name, tuple(tensor.shape), str(original.dtype).replace("torch.", ""),
                                             diff, status))
    reader.close()
    return result


def verify_conversion(hf_dir: str, megatron_dir: str, *, tp: int = 1, pp: int = 1, atol: Optional[float] = None,
                      min_cosine: Optional[float] = None, in_process: bool = False,
                      timeout: float = 3600.0, seed: int = 0) -> VerificationReport:
    """Run the parity gate; see the module docstring. Raises ConversionError on bad input."""
    from megatron_rcpa.convert.runtime import run_on_layout
    from megatron_rcpa.models.decoder import check_parallel_layout

    meta = read_metadata(megatron_dir)
    family = family_by_name(meta.family)
    hf_config = family.hf_config(load_hf_config(hf_dir))
    check_manifest(megatron_dir, checksums=True)
    if os.path.isfile(os.path.join(hf_dir, MANIFEST_FILE)):
        check_manifest(hf_dir, checksums=True, what="HF directory")
    check_dcp_metadata(os.path.join(megatron_dir, MODEL_DIR))
    ckpt_config = family.hf_config(load_hf_config(meta.hf_config))
    if family.decoder_dims(hf_config) != family.decoder_dims(ckpt_config):
        raise ConversionError(f"{hf_dir!r} and {megatron_dir!r} describe different models (config.json differs)")
    try:
        check_parallel_layout(family.decoder_dims(hf_config), tp=tp, pp=pp, padded_vocab_size=meta.padded_vocab_size)
        if family.check_tp is not None:
            family.check_tp(hf_config, tp)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    default_atol, default_cos = DEFAULT_TOLERANCES[meta.dtype]
    atol = default_atol if atol is None else atol
    min_cosine = default_cos if min_cosine is None else min_cosine

    batch = build_verification_batch(hf_config, asset_dirs=[hf_dir, os.path.join(megatron_dir, ASSETS_DIR)],
                                     seed=seed)
    reference = hf_logits(hf_dir, batch)
    results = run_on_layout(_verify_rank, tp=tp, pp=pp, args=(os.path.abspath(megatron_dir), hf_dir, batch),
                            timeout=timeout, in_process=in_process)
    logits = next(r["logits"] for r in results if r["logits"] is not None)
    checks = [t for r in results for t in r["tensors"]]
    exported = {t.name for t in checks}
    reader = HFCheckpointReader(hf_dir, family.hf_aliases)
    allowed_missing = {family.tied_head} if family.decoder_dims(hf_config).tie_word_embeddings else set()
    for name in reader.names():
        if name not in exported and name not in allowed_missing and not family.is_ignored(name):
            checks.append(TensorCheck(name, reader.shape(name), reader.dtype(name), float("nan"), "missing"))
    reader.close()

    diff = (logits - reference).abs()
    cosine = torch.nn.functional.cosine_similarity(logits.double(), reference.double(), dim=-1).float()
    return VerificationReport(tp=tp, pp=pp, dtype=meta.dtype, atol=atol, min_cosine=min_cosine,
                              max_abs_diff=float(diff.max()), cosine=cosine,
                              position_max_abs_diff=diff.amax(dim=-1), input_ids=batch["input_ids"],
                              tensors=sorted(checks, key=lambda t: t.name))
