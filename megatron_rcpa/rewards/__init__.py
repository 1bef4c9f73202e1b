"""Rewards for RCPA rollouts, selected by name or import path (see :mod:`.registry` for the contract).

Registered: ``math_answer`` (final-answer match, numbers/fractions/choices), ``math_verify`` (the optional
math-verify package), ``cider_d`` and ``bleu4``
(captioning), ``rouge_l`` and ``token_f1`` (reports), ``format`` (response shape), ``composite``
(weighted sum). ``get_reward(spec, **kwargs)`` returns a callable that also checks the values are finite.
"""

from .adapters import API_STYLES, TrlReward, VerlReward, detect_api
from .caption import CiderD, CiderDReward, bleu4_reward, bleu_stats, cider_d, corpus_bleu, sentence_bleu
from .composite import CompositeReward
from .format import FORMAT_PRESETS, format_ok, format_reward
from .math_answer import (
    extract_answer,
    extract_choice,
    find_boxed,
    grade_answer,
    math_answer_reward,
    parse_answer_number,
    parse_choice,
    parse_number,
)
from .math_verify_reward import MathVerifyReward  # registers "math_verify"; math-verify is imported on use
from .registry import (
    REWARD_REGISTRY,
    RewardError,
    RewardFunction,
    check_rewards,
    get_reward,
    list_rewards,
    register_reward,
)
from .report import lcs_length, normalize_answer, rouge_l, rouge_l_reward, token_f1, token_f1_reward
from .text import answer_span, tokenize

__all__ = [
    "CiderD", "CiderDReward", "bleu4_reward", "bleu_stats", "cider_d", "corpus_bleu", "sentence_bleu",
    "CompositeReward", "FORMAT_PRESETS", "format_ok", "format_reward", "extract_answer", "extract_choice",
    "find_boxed", "grade_answer", "math_answer_reward", "parse_answer_number", "parse_choice", "parse_number",
    "REWARD_REGISTRY", "RewardError", "RewardFunction", "check_rewards", "get_reward", "list_rewards",
    "register_reward", "lcs_length", "normalize_answer", "rouge_l", "rouge_l_reward", "token_f1",
    "token_f1_reward", "answer_span", "tokenize", "API_STYLES", "TrlReward", "VerlReward", "detect_api",
    "MathVerifyReward",
]
