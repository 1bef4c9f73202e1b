"""Token KL to the base model on the held-out references, from the arms' saved checkpoints.

For every checkpoint ``step_N`` of a run (saved at each validation), the policy and the base are run
teacher-forced on ``prompt ⊕ reference ⊕ EOS`` of the held-out domain and general samples; the KL
``sum_v p(v) log p(v)/q(v)`` (p = policy, q = base, full vocabulary, temperature 1) is averaged over the
reference positions of each set. One process, world size 1 (the checkpoints are TP=1 trainer checkpoints).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch

from megatron_rcpa.repro.tasks import DOMAIN_SOURCE

__all__ = ["token_kl_for_runs", "base_diagnostics"]

_BATCH = 128


def _checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        if name.startswith("step_") and not name.endswith(".incomplete"):
            out.append((int(name[len("step_"):]), os.path.join(d, name, "policy")))
    return sorted(out)


def _encode(samples, adapter) -> Dict[str, List[Tuple[List[int], int]]]:
    """data source group ("domain" / "general") -> [(ids, first reference position)]."""
    out: Dict[str, List[Tuple[List[int], int]]] = {"domain": [], "general": []}
    for s in samples:
        p = adapter.format(s)
        key = "domain" if (s.data_source or "") == DOMAIN_SOURCE else "general"
        out[key].append((list(p.prompt_ids) + list(p.reference_ids), len(p.prompt_ids)))
    return out


@torch.no_grad()
def _log_probs(model, seqs: Sequence[Tuple[List[int], int]], pad_id: int, vocab: int) -> List[torch.Tensor]:
    """Per sequence: log-softmax rows [L_ref, vocab] predicting its reference tokens."""
    out = []
    for i in range(0, len(seqs), _BATCH):
        chunk = seqs[i:i + _BATCH]
        width = max(len(ids) for ids, _ in chunk)
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for j, (ids, _) in enumerate(chunk):
            tokens[j, :len(ids)] = torch.tensor(ids)
        logits = model(input_ids=tokens).float()[..., :vocab]  # right padding: causal rows are unaffected
        logp = torch.log_softmax(logits, dim=-1)
        for j, (ids, start) in enumerate(chunk):
            out.append(logp[j, start - 1:len(ids) - 1])
    return out


def _mean_kl(p_rows: List[torch.Tensor], q_rows: List[torch.Tensor]) -> float:
    p, q = torch.cat(p_rows), torch.cat(q_rows)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _setup(base_policy: str):
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint
    from megatron_rcpa.train.config import load_config
    from megatron_rcpa.train.families import adapter_for, build_tokenizer_and_config
    from megatron_rcpa.train.trainer import init_parallel

    cfg = load_config(None, ["model.family=llama", f"model.checkpoint={base_policy}"])
    init_parallel(cfg)
    tok, hf_config = build_tokenizer_and_config(cfg)
    adapter = adapter_for("llama", tok, hf_config, checkpoint=base_policy)
    base, _ = build_policy_from_checkpoint(base_policy)
    return cfg, tok, adapter, base.eval()


def _teardown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def base_diagnostics(base_policy: str, val_paths: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    """How far each domain is from the base, teacher-forced on its held-out references (``val_paths``: domain
    name -> validation file): the mean log-probability per reference token, the probability of the whole
    reference, and the probability of EOS right after the full answer (what an RCPA rollout whose prefix is
    all of the answer must sample to be rewarded)."""
    from megatron_rcpa.data.readers import load_samples

    cfg, tok, adapter, base = _setup(base_policy)
    try:
        out = {}
        for name, path in val_paths.items():
            seqs = _encode(list(load_samples(path, config=cfg.data.reader_config())), adapter)["domain"]
            rows = _log_probs(base, seqs, tok.pad_token_id, tok.vocab_size)
            token_lp, seq_p, eos_p = [], [], []
            for (ids, start), lp in zip(seqs, rows):
                targets = torch.tensor(ids[start:])
                picked = lp.gather(-1, targets[:, None])[:, 0]
                token_lp.append(float(picked.mean()))
                seq_p.append(float(picked.sum().exp()))
                eos_p.append(float(picked[-1].exp()))  # the reference ends with EOS
            n = len(seqs)
            out[name] = {"mean_token_logprob": sum(token_lp) / n, "mean_sequence_prob": sum(seq_p) / n,
                         "mean_eos_prob_after_answer": sum(eos_p) / n, "samples": n}
        return out
    finally:
        _teardown()


def token_kl_for_runs(base_policy: str, runs: Sequence[Tuple[str, str]]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """``runs``: (run_dir, val_path). Returns run_dir -> step -> {"domain": kl, "general": kl}."""
    from megatron_rcpa.convert.checkpoint import build_policy_from_checkpoint, load_checkpoint
    from megatron_rcpa.data.readers import load_samples

    cfg, tok, adapter, base = _setup(base_policy)
    try:
        policy, _ = build_policy_from_checkpoint(base_policy)
        policy.eval()
        vocab = tok.vocab_size
        enc_cache: Dict[str, Dict[str, List[Tuple[List[int], int]]]] = {}
        base_cache: Dict[str, Dict[str, List[torch.Tensor]]] = {}
        out: Dict[str, Dict[int, Dict[str, float]]] = {}
        for run_dir, val_path in runs:
            if val_path not in enc_cache:
                samples = list(load_samples(val_path, config=cfg.data.reader_config()))
                enc_cache[val_path] = _encode(samples, adapter)
                base_cache[val_path] = {k: _log_probs(base, v, tok.pad_token_id, vocab)
                                        for k, v in enc_cache[val_path].items()}
            res: Dict[int, Dict[str, float]] = {}
            for step, ckpt in _checkpoints(run_dir):
                load_checkpoint(policy, ckpt)
                res[step] = {k: _mean_kl(_log_probs(policy, v, tok.pad_token_id, vocab), base_cache[val_path][k])
                             for k, v in enc_cache[val_path].items() if v}
            out[run_dir] = res
        return out
    finally:
        _teardown()
