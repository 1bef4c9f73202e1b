"""Final-answer match for math / geometry responses: ``math_answer`` (1.0 when the answer is right, else 0.0).

The final answer of a text is, in order of preference (:func:`extract_answer`):

1. the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included;
2. the phrase after the last "answer is" / "answer:" / "answer =" (up to the end of the sentence or line);
3. the whole text when it is a number (``\\frac12``, ``2\\pi``), else the last number in it (``1,234``,
   ``-3.5``, ``3/4``, ``25%``; not an exponent);
4. a choice letter when the whole text is one (``B``, ``(B)``, ``B.``).

The reference goes through the same extraction (a bare reference like ``"3"`` or ``"B"`` is its own answer),
and decides how the two are compared (:func:`grade_answer`):

- **choice** — the reference (or its extracted answer) is a letter among ``choices`` (default A-E) written as
  ``B``, ``(B)``, ``B.``, ``B)``, ``B: text`` or ``(B) text``: the letter picked by the response
  (:func:`extract_choice`) must be the same.
- **number** — the reference answer parses as a number (:func:`parse_number`: integers, decimals, thousands
  commas, ``3/4``, percentages, ``\\frac{a}{b}``, ``\\sqrt{x}``, ``\\pi``, ``^``, degree signs): the response's
  answer must parse too and be within ``rel_tol`` (default 1e-4) or ``abs_tol`` (1e-6) of it. A percentage
  also matches its value over 100 (``25%`` matches ``25`` and ``0.25``). Units and ``x =`` are dropped from
  the response's answer (``12 cm^2``, ``x = 5``).
- **text** — otherwise the two answers must be equal after normalisation (case, spaces, ``$``, ``\\text{}``,
  a trailing period).

Left out (deliberately): symbolic equivalence (``x+1`` vs ``1+x``), mixed numbers (``1\\frac{1}{2}`` reads
as 1 * 1/2), matching a numeric response to a choice's option text.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any, List, Optional, Sequence, Tuple

from .registry import RewardError, register_reward

DEFAULT_REL_TOL = 1e-4
DEFAULT_ABS_TOL = 1e-6
DEFAULT_CHOICES = "ABCDE"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS_RE = re.compile(
    r"answer\s*\**\s*(?:is\s*:?|:|=)\s*(.+?)\s*(?:\.(?=\s|$)|\n|$)", re.IGNORECASE
)
_NUM_TOKEN_RE = re.compile(
    r"(?<![\^{\d.,])(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?"
    r"(?:\s*/\s*\d+(?:\.\d+)?)?(?:\s*\\?%)?"
    r"|(?<![\^{\d.])(?:(?<![\w)])-)?\.\d+"
)


# ---------------------------------------------------------------------------------------------- extraction
def _match_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or -1."""
    depth = 0
    for j in range(open_idx, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def find_boxed(text: str) -> List[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces kept), in order.

    ``\\boxed 5`` (no braces) gives ``"5"``; an unclosed ``\\boxed{`` is ignored.
    """
    out: List[str] = []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            j = _match_brace(text, i)
            if j >= 0:
                out.append(text[i + 1 : j].strip())
        elif m.group(0)[-1:].isspace():
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                out.append(tok.group(0))
    return out


def _answer_phrases(text: str) -> List[str]:
    phrases = []
    for m in _ANSWER_IS_RE.finditer(text):
        p = m.group(1).strip().strip("*`").strip()
        if p:
            phrases.append(p)
    return phrases


def _last_number_token(text: str) -> Optional[str]:
    toks = _NUM_TOKEN_RE.findall(text)
    return toks[-1].strip() if toks else None


def extract_answer(text: Optional[str], choices: str = DEFAULT_CHOICES) -> Optional[str]:
    """The final answer of ``text`` as a string (see the module docstring for the order), or ``None``."""
    if not text:
        return None
    boxed = find_boxed(text)
    if boxed:
        return boxed[-1]
    phrases = _answer_phrases(text)
    if phrases:
        return phrases[-1]
    if len(text) <= 100 and _parse_number_pct(text) is not None:  # the whole text is a number: "\frac12", "2\pi"
        return text.strip()
    num = _last_number_token(text)
    if num is not None:
        return num
    return _bare_choice(text, choices)


def _strip_text_macros(s: str) -> str:
    return re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)


def _bare_choice(s: str, choices: str) -> Optional[str]:
    m = re.fullmatch(rf"\s*\(?([{choices}])\)?\s*[.:]?\s*", _strip_text_macros(s).replace("$", ""))
    return m.group(1) if m else None


def parse_choice(s: Optional[str], choices: str = DEFAULT_CHOICES) -> Optional[str]:
    """The letter when ``s`` *is* a choice: ``B``, ``(B)``, ``B.``, ``B)``, ``B: text``, ``(B) text``; else None.

    ``"A man riding a horse"`` is not a choice (a letter followed only by a space and text).
    """
    if s is None:
        return None
    s = _strip_text_macros(s).replace("$", "").strip()
    m = (re.fullmatch(rf"\(?([{choices}])\)?\s*[.:)]?", s)
         or re.match(rf"\(([{choices}])\)", s)
         or re.match(rf"([{choices}])[.:)]\s*\S", s))
    return m.group(1) if m else None


def _choice_at_start(s: str, choices: str) -> Optional[str]:
    s = _strip_text_macros(s).replace("$", "").strip()
    s = re.sub(r"^(?:option|choice)\s+", "", s, flags=re.IGNORECASE)
    m = re.match(rf"\(?([{choices}])\)?(?=[\s.:),;]|$)", s)
    return m.group(1) if m else None


def extract_choice(text: Optional[str], choices: str = DEFAULT_CHOICES) -> Optional[str]:
    """The choice letter a response picks, or None. Tried in order: the last ``\\boxed{}``; the last
    "answer is ..." phrase (``(B)``, ``B.``, ``option B``); the last "option B"/"choice B"; the whole response
    being a letter; the response starting with ``B.``/``B)``/``B:``; the last ``(B)`` in the text."""
    if not text:
        return None
    for content in reversed(find_boxed(text)):
        c = _choice_at_start(content, choices)
        if c:
            return c
    for phrase in reversed(_answer_phrases(text)):
        c = _choice_at_start(phrase, choices)
        if c:
            return c
    kw = re.findall(rf"\b(?:option|choice)\s+\(?([{choices}])\b", text, flags=re.IGNORECASE)
    if kw:
        return kw[-1]
    c = _bare_choice(text, choices)
    if c:
        return c
    m = re.match(rf"\s*\(?([{choices}])[.:)]\s", text + " ")
    if m:
        return m.group(1)
    paren = re.findall(rf"\(([{choices}])\)", text)
    return paren[-1] if paren else None


# ---------------------------------------------------------------------------------------------- numbers
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_FUNCS = {"sqrt": math.sqrt}
_CONSTS = {"pi": math.pi}


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(b) > 1024:
            raise ValueError("exponent too large")
        r = _BINOPS[type(node.op)](a, b)
        if not isinstance(r, float):  # negative base ** fractional exponent gives a complex number
            raise ValueError("not a real number")
        return r
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and len(node.args) == 1 and not node.keywords:
        return _FUNCS[node.func.id](_eval_node(node.args[0]))
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def _latex_group(s: str, i: int) -> Tuple[str, int]:
    """The argument starting at ``s[i]``: a ``{...}`` group or a single character. Returns (content, next i)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] == "{":
        j = _match_brace(s, i)
        if j < 0:
            raise ValueError("unbalanced braces")
        return s[i + 1 : j], j + 1
    return s[i], i + 1


def _latex_to_expr(s: str) -> str:
    """Rewrite the LaTeX subset we evaluate (``\\frac``, ``\\sqrt``, ``\\pi``, ``\\cdot``, ...) into Python."""
    out: List[str] = []
    i = 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _latex_group(s, i + 5)
            den, i = _latex_group(s, i)
            out.append(f"(({_latex_to_expr(num)})/({_latex_to_expr(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            root = None
            if i < len(s) and s[i] == "[":
                j = s.find("]", i)
                if j < 0:
                    raise ValueError("unbalanced [")
                root, i = s[i + 1 : j], j + 1
            arg, i = _latex_group(s, i)
            inner = _latex_to_expr(arg)
            out.append(f"sqrt({inner})" if root is None else f"(({inner})**(1/({_latex_to_expr(root)})))")
        elif s.startswith("\\pi", i):
            out.append("pi")
            i += 3
        elif s[i] == "{":
            j = _match_brace(s, i)
            if j < 0:
                raise ValueError("unbalanced braces")
            out.append(f"({_latex_to_expr(s[i + 1 : j])})")
            i = j + 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _normalise_number_text(s: str) -> Tuple[str, bool]:
    s = s.strip().strip("$").strip()
    s = _strip_text_macros(s)
    for tok in ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\left", "\\right", "\\displaystyle", "\\$"):
        s = s.replace(tok, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\u2212", "-")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\u00b0|\\degree", "", s)
    s = s.strip().rstrip(".").strip()
    pct = False
    if s.endswith("\\%") or s.endswith("%"):
        pct = True
        s = s[: -2 if s.endswith("\\%") else -1].strip()
    # thousands separators: only a well-formed 1,234,567 (with optional decimals) loses its commas
    s = re.sub(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])", lambda m: m.group(1).replace(",", ""), s)
    return s, pct


def _parse_number_pct(s: Optional[str]) -> Optional[Tuple[float, bool]]:
    if s is None:
        return None
    try:
        text, pct = _normalise_number_text(s)
        if not text or "," in text or "=" in text:
            return None
        expr = _latex_to_expr(text)
        expr = expr.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("^", "**")
        expr = expr.replace("×", "*").replace("÷", "/")
        if "\\" in expr or not re.fullmatch(r"[0-9a-z+\-*/(). ]+", expr):
            return None
        # implicit multiplication: 2sqrt(3), 2pi, (1)(2), 2(3); "1e-3" stays a literal
        expr = re.sub(r"(?<=[\d).])\s*(?=\(|[a-df-z]|e(?![+\-]?\d))", "*", expr)
        expr = re.sub(r"(?<=pi)\s*(?=[\d(a-z])", "*", expr)
        names = set(re.findall(r"[a-z]+", re.sub(r"\d+(?:\.\d*)?e[+\-]?\d+", "0", expr)))
        if not names <= set(_FUNCS) | set(_CONSTS):
            return None
        value = _eval_node(ast.parse(expr, mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError, RecursionError, MemoryError):
        return None
    if not math.isfinite(value):
        return None
    return (value / 100.0 if pct else value), pct


def parse_number(s: Optional[str]) -> Optional[float]:
    """The value of a number written in ``s``, or None. ``"1,234"`` -> 1234, ``"3/4"`` -> 0.75,
    ``"25%"`` -> 0.25, ``"\\frac{3}{4}"`` -> 0.75, ``"2\\sqrt{3}"`` -> 3.4641..., ``"45^\\circ"`` -> 45.
    The whole string must be a number (``"12 cm"`` is None; see :func:`parse_answer_number`)."""
    r = _parse_number_pct(s)
    return None if r is None else r[0]


def _answer_number(s: Optional[str]) -> Optional[Tuple[float, bool]]:
    """Like :func:`_parse_number_pct` but tolerant of ``x = 5``, leading words and trailing units."""
    if s is None:
        return None
    r = _parse_number_pct(s)
    if r is not None:
        return r
    if "=" in s:
        r = _parse_number_pct(s.rsplit("=", 1)[1])
        if r is not None:
            return r
    stripped = _strip_text_macros(s).strip().rstrip(".")
    stripped = re.sub(r"^(?:[a-zA-Z]+\s+)+", "", stripped)  # leading words: "about 12"
    while True:  # trailing unit words, not LaTeX commands like \pi: "12 square units", "12 cm^2"
        new = re.sub(r"\s*(?<![\\a-zA-Z])[a-zA-Z]+(?:\^\{?\d\}?|[\u00b2\u00b3])?\s*$", "", stripped)
        if new == stripped:
            break
        stripped = new
    if stripped and stripped != s:
        return _parse_number_pct(stripped)
    return None


def parse_answer_number(s: Optional[str]) -> Optional[float]:
    """A number from an answer phrase, tolerating ``x = 5`` and units: ``"12 cm^2"`` -> 12."""
    r = _answer_number(s)
    return None if r is None else r[0]


def _numbers_match(a: Tuple[float, bool], b: Tuple[float, bool], rel_tol: float, abs_tol: float) -> bool:
    cands_a = [a[0]] + ([a[0] * 100.0] if a[1] else [])
    cands_b = [b[0]] + ([b[0] * 100.0] if b[1] else [])
    return any(math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol) for x in cands_a for y in cands_b)


def _normalise_text_answer(s: str) -> str:
    s = _strip_text_macros(s).replace("$", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip().lower()
    return s


# ---------------------------------------------------------------------------------------------- grading
def grade_answer(response: str, reference: str, rel_tol: float = DEFAULT_REL_TOL, abs_tol: float = DEFAULT_ABS_TOL,
                 choices: str = DEFAULT_CHOICES) -> bool:
    """True when the final answer of ``response`` matches that of ``reference`` (see the module docstring)."""
    ref_ans = extract_answer(reference, choices)
    if ref_ans is None:
        ref_ans = reference.strip()
    ref_choice = parse_choice(reference, choices) or parse_choice(ref_ans, choices)
    if ref_choice is not None:
        return extract_choice(response, choices) == ref_choice
    pred_ans = extract_answer(response, choices)
    if pred_ans is None:
        return False
    ref_num = _parse_number_pct(ref_ans)
    if ref_num is None:
        ref_num = _answer_number(ref_ans)
    if ref_num is not None:
        pred_num = _answer_number(pred_ans)
        return pred_num is not None and _numbers_match(pred_num, ref_num, rel_tol, abs_tol)
    return _normalise_text_answer(pred_ans) == _normalise_text_answer(ref_ans)


@register_reward("math_answer")
def math_answer_reward(responses: Sequence[str], references: Sequence[Optional[str]], *,
                       rel_tol: float = DEFAULT_REL_TOL, abs_tol: float = DEFAULT_ABS_TOL,
                       choices: str = DEFAULT_CHOICES, **_: Any) -> List[float]:
    """1.0 where the response's final answer matches the reference's, else 0.0 (:func:`grade_answer`).

    A missing reference is an error naming the sample: this reward cannot judge without one.
    """
    out = []
    for i, (resp, ref) in enumerate(zip(responses, references)):
        if ref is None:
            raise RewardError(f"math_answer needs a reference, sample {i} has none (response {str(resp)[:80]!r})")
        out.append(1.0 if grade_answer(resp or "", str(ref), rel_tol, abs_tol, choices) else 0.0)
    return out
