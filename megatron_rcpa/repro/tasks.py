"""The toy world of the reproduction: a synthetic "general" mix the base model is pretrained on, and new
domains it cannot reach by exploration but can learn by imitation.

General tasks (inputs of 3-5 symbols; the data source of each is the task name):

=======  ======================  =========
task     prompt                  reference
=======  ======================  =========
copy     ``copy 3172 =``         ``3172``
rev      ``rev 3172 =``          ``2713``
sort     ``sort 3172 =``         ``1237``
inc      ``inc 3179 =``          ``4280``  (each digit + 1, mod 10)
idx      ``idx cab =``           ``312``   (letter a..i -> its position 1..9)
=======  ======================  =========

Every general prompt and answer is made of lowercase letters, digits, spaces and ``=``; the prompt template
of the text families (``User: ...\\nAssistant:``) adds ``U``, ``A`` and a few lowercase letters. A domain's answers
use characters that occur nowhere in pretraining (uppercase letters other than ``U``/``A``, ``#``), so the base
model gives them almost no probability: greedy or sampled exploration never finds a right answer (GRPO sees
only zero-variance groups), while imitation of the reference teaches them directly.

- **D1** (:func:`d1`): ``dom 3172 =`` -> reverse the digits and map each through a fixed secret permutation onto
  ten uppercase letters (``2713`` -> e.g. ``JCHE``), then EOS. Reward: exact match.
- **D2** (:func:`d2`): D1's answer followed by the fixed 3-token sign-off ``#QZ``, which the reward strips
  (from the response and the reference) before the exact match: imitation learns it, the reward does not care.

A domain is any zero-argument function returning a :class:`Domain` (``--domain module:function``): its sample
generator, its reward, and the characters that are new to the base model (for the leak metric).
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["GENERAL_TASKS", "DOMAIN_SOURCE", "Domain", "d1", "d2", "d1_known", "load_domain", "general_sample",
           "general_reward", "make_split", "exact_match"]

DOMAIN_SOURCE = "domain"  # the data source of every domain sample (val/domain/accuracy)
DIGITS = "0123456789"
IDX_LETTERS = "abcdefghi"  # a..i -> 1..9
GENERAL_TASKS: Tuple[str, ...] = ("copy", "rev", "sort", "inc", "idx")
MIN_LEN, MAX_LEN = 3, 5
DOMAIN_ALPHABET = "BCDEFGHJKL"  # ten uppercase letters, none of them in the prompt template (U, A) or the mix
_SECRET_SEED = 20260210  # fixes the digit -> letter permutation of D1/D2
SIGN_OFF = "#QZ"


def _symbols(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def general_sample(task: str, rng: random.Random) -> Tuple[str, str]:
    """One ``(prompt, reference)`` of a general task."""
    if task == "idx":
        x = _symbols(rng, IDX_LETTERS)
        return f"idx {x} =", "".join(str(IDX_LETTERS.index(c) + 1) for c in x)
    x = _symbols(rng, DIGITS)
    if task == "copy":
        y = x
    elif task == "rev":
        y = x[::-1]
    elif task == "sort":
        y = "".join(sorted(x))
    elif task == "inc":
        y = "".join(str((int(c) + 1) % 10) for c in x)
    else:
        raise ValueError(f"general task {task!r} is unknown; expected one of {list(GENERAL_TASKS)}")
    return f"{task} {x} =", y


def exact_match(response: str, reference: str) -> float:
    """1.0 when the response (surrounding whitespace stripped) is exactly the reference, else 0.0."""
    return float(response.strip() == reference.strip())


def general_reward(response: str, reference: str) -> float:
    return exact_match(response, reference)


@dataclass(frozen=True)
class Domain:
    """A new domain: ``sample(rng) -> (prompt, reference)``, ``reward(response, reference) -> float in [0, 1]``,
    ``new_symbols`` (characters the base never saw in pretraining: a general answer holding one has leaked),
    and an optional ``sign_off`` whose rate in the domain answers is reported."""

    name: str
    sample: Callable[[random.Random], Tuple[str, str]]
    reward: Callable[[str, str], float]
    new_symbols: str
    sign_off: Optional[str] = None


def _permutation() -> Dict[str, str]:
    letters = list(DOMAIN_ALPHABET)
    random.Random(_SECRET_SEED).shuffle(letters)
    return dict(zip(DIGITS, letters))


def _d1_sample(rng: random.Random) -> Tuple[str, str]:
    perm = _permutation()
    x = _symbols(rng, DIGITS)
    return f"dom {x} =", "".join(perm[c] for c in reversed(x))


def d1() -> Domain:
    """D1: reverse the digits, map each through the secret permutation onto new letters; exact match."""
    return Domain("d1", _d1_sample, exact_match, DOMAIN_ALPHABET)


def strip_sign_off(text: str, sign_off: str = SIGN_OFF) -> str:
    """``text`` without a trailing sign-off (surrounding whitespace ignored)."""
    t = text.strip()
    return t[: -len(sign_off)].rstrip() if sign_off and t.endswith(sign_off) else t


def _d2_sample(rng: random.Random) -> Tuple[str, str]:
    prompt, answer = _d1_sample(rng)
    return prompt, answer + SIGN_OFF


def _d2_reward(response: str, reference: str) -> float:
    return exact_match(strip_sign_off(response), strip_sign_off(reference))


def d2() -> Domain:
    """D2: D1's answer + the sign-off ``#QZ``; the reward strips the sign-off before the exact match."""
    return Domain("d2", _d2_sample, _d2_reward, DOMAIN_ALPHABET + SIGN_OFF, sign_off=SIGN_OFF)


_KNOWN_SEED = 20260211  # fixes the digit -> digit permutation of the control domain


def _known_sample(rng: random.Random) -> Tuple[str, str]:
    digits = list(DIGITS)
    random.Random(_KNOWN_SEED).shuffle(digits)
    perm = dict(zip(DIGITS, digits))
    x = _symbols(rng, DIGITS)
    return f"dom {x} =", "".join(perm[c] for c in reversed(x))


def d1_known() -> Domain:
    """A control, not part of the presets: D1 with a secret digit -> DIGIT permutation, i.e. the same task
    written in tokens the base already produces (and stops after). It separates what RCPA needs from the base
    (finishing an answer whose prefix is forced) from what is new in D1 (the output alphabet). No new symbols,
    so its leak is 0 by construction."""
    return Domain("d1_known", _known_sample, exact_match, "")


BUILTIN_DOMAINS = {"d1": "megatron_rcpa.repro.tasks:d1", "d2": "megatron_rcpa.repro.tasks:d2",
                   "d1_known": "megatron_rcpa.repro.tasks:d1_known"}


def load_domain(spec: str) -> Domain:
    """``"d1"``/``"d2"`` or ``"package.module:function"`` (a zero-argument function returning a :class:`Domain`)."""
    target = BUILTIN_DOMAINS.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"domain {spec!r}: expected one of {sorted(BUILTIN_DOMAINS)} or 'package.module:function'")
    mod_name, fn_name = target.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"domain {spec!r}: cannot import {target!r} ({exc})") from exc
    dom = fn()
    if not isinstance(dom, Domain):
        raise ValueError(f"domain {spec!r}: {target} returned {type(dom).__name__}, expected a Domain")
    return dom


def make_split(sources: Sequence[Tuple[str, Callable[[random.Random], Tuple[str, str]]]], n_per_source: int,
               seed: int, exclude: Sequence[str] = ()) -> List[dict]:
    """``n_per_source`` distinct samples of every ``(data_source, sample_fn)``, as trainer rows
    (``id``, ``prompt``, ``reference``, ``data_source``), deterministic in ``seed``; prompts in ``exclude`` (a
    held-out set) are never drawn. Sources are interleaved so that any prefix of the rows is a balanced mix."""
    rng = random.Random(seed)
    banned = set(exclude)
    per: List[List[dict]] = []
    for source, fn in sources:
        rows, seen, tries = [], set(), 0
        while len(rows) < n_per_source:
            tries += 1
            if tries > 200 * n_per_source + 1000:
                raise ValueError(f"data source {source!r}: only {len(rows)} distinct prompts for {n_per_source}")
            prompt, ref = fn(rng)
            if prompt in seen or prompt in banned:
                continue
            seen.add(prompt)
            rows.append({"id": f"{source}-{seed}-{len(rows)}", "prompt": prompt, "reference": ref,
                         "data_source": source})
        per.append(rows)
    return [rows[i] for i in range(n_per_source) for rows in per]


def general_sources() -> List[Tuple[str, Callable[[random.Random], Tuple[str, str]]]]:
    return [(t, (lambda rng, t=t: general_sample(t, rng))) for t in GENERAL_TASKS]
