"""Rule-based rewards with TRL's signature, so that users' reward functions drop in.

Every reward is `fn(prompts, completions, **columns) -> list[float | None]`: completions
are strings or chat messages (a list of {"role", "content"}; the last assistant message
counts), and the dataset's other columns arrive as keyword lists, one entry per
completion (`answer=[...]`, `meta=[...]`, `tests=[...]`). None means "not applicable to
this sample" (TRL's convention), e.g. a gold answer that cannot be parsed.

    accuracy_reward    built-in tasks: nanoseek.data.tasks.check with the sample's `meta`
    math_reward        math-verify: numbers, fractions, LaTeX, \\boxed{} against `solution`
                       or `answer`
    code_reward        the completion's code against `tests` in the sandbox (sandbox.py);
                       the fraction of asserts passed
    format_reward      the R1-Zero structure <think>...</think> <answer>...</answer>
    language_consistency_reward
                       R1 §2.3.2: the share of the reasoning's words in the target language
                       (by Unicode script, language.py)
    combine_rewards    a weighted sum, with the per-function values for logging

Where an answer is looked for, it is the content of the last <answer>...</answer> if there
is one, else the whole completion (math-verify then finds the last \\boxed{} or
expression itself).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..data import tasks
from .language import language_share
from .sandbox import run_python

RewardFn = Callable[..., list]


def completion_text(completion) -> str:
    """A completion as text: a string as is; chat messages -> the last assistant content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                return str(message.get("content", ""))
        return ""
    raise TypeError(f"a completion must be a string or a list of chat messages, "
                    f"not {type(completion).__name__}")


def _column(name: str, values, n: int, fn: str) -> list:
    if values is None:
        raise ValueError(f"{fn} needs the dataset column '{name}' (passed as {name}=[...])")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{fn}: column '{name}' has {len(values)} entries for {n} completions")
    return values


# ------------------------------------------------------------------ accuracy (built-in tasks)
def accuracy_reward(prompts, completions, meta=None, **kwargs) -> list[float | None]:
    """1.0 if the built-in task's checker accepts the completion, else 0.0; None for a
    sample without meta. `meta` entries are dicts (or their JSON text) with a "task" key."""
    metas = _column("meta", meta, len(completions), "accuracy_reward")
    out: list[float | None] = []
    for completion, m in zip(completions, metas):
        if isinstance(m, str):
            m = json.loads(m)
        if not m:
            out.append(None)
            continue
        try:
            out.append(float(tasks.check(m, completion_text(completion))))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            out.append(0.0)  # a completion the checker cannot read is wrong, not an error
    return out


# ------------------------------------------------------------------ math (math-verify)
def _timeout() -> int | None:
    """math-verify's timeouts use signal.alarm, which works in the main thread only; in
    other threads (a data loader, a thread pool) they must be off."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(text: str):
    import math_verify
    return math_verify.parse(text, parsing_timeout=_timeout())


def _parsed(result: list) -> bool:
    return any(not isinstance(x, str) for x in result)  # a bare string is a failed parse


def _parse_gold(gold: str) -> list:
    parsed = _parse(gold)
    if not _parsed(parsed) and "$" not in gold and re.search(r"[\\^_{}]", gold):
        parsed = _parse(f"${gold}$")  # bare LaTeX such as \frac{1}{2} or x^2 + 1
    return parsed if _parsed(parsed) else []


def math_reward(prompts, completions, solution=None, answer=None, **kwargs) -> list[float | None]:
    """1.0 if math-verify finds the completion's answer equal to the gold one, else 0.0;
    None where the gold (`solution`, else `answer`) cannot be parsed. Never raises on a
    malformed completion."""
    import math_verify
    golds = _column("solution" if solution is not None else "answer",
                    solution if solution is not None else answer, len(completions), "math_reward")
    out: list[float | None] = []
    for completion, gold in zip(completions, golds):
        try:
            gold_parsed = _parse_gold(str(gold))
        except Exception:
            gold_parsed = []
        if not gold_parsed:
            out.append(None)
            continue
        try:
            text = completion_text(completion)
            tagged = tasks.extract_answer(text) if "<answer>" in text else None
            candidate = _parse(tagged if tagged is not None else text)
            if not candidate and tagged is not None:
                candidate = _parse(f"${tagged}$")
            out.append(float(_parsed(candidate) and math_verify.verify(
                gold_parsed, candidate, timeout_seconds=_timeout())))
        except Exception:
            out.append(0.0)
    return out


# ------------------------------------------------------------------ code (sandboxed tests)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(text: str) -> str:
    """The last ```python fenced block (or an unlabeled ``` block), else the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def code_reward(prompts, completions, tests=None, time_limit: float = 5.0, memory_mb: int = 512,
                max_workers: int = 4, **kwargs) -> list[float | None]:
    """Fraction of the `tests` asserts that pass against the completion's code, run in the
    sandbox (nanoseek.rl.sandbox: time and memory limits, no network, writes confined to a
    throwaway directory). A solution that raises, times out or crashes gets 0.0; a sample
    whose tests are empty or do not parse gets None.

    Partial credit (not 1/0) because it separates "almost right" from "wrong" within a
    group, which is what group-relative advantages feed on; use `lambda *a, **k:
    [float(r == 1.0) ... ]` on top for all-or-nothing."""
    all_tests = _column("tests", tests, len(completions), "code_reward")

    def one(item) -> float | None:
        completion, test = item
        if isinstance(test, (list, tuple)):
            test = "\n".join(test)
        try:
            result = run_python(extract_code(completion_text(completion)), str(test or ""),
                                time_limit=time_limit, memory_mb=memory_mb)
        except SyntaxError:  # the tests, not the completion (whose errors are caught inside)
            return None
        if result.total == 0:
            return None
        return result.fraction if result.status == "ok" else 0.0

    items = list(zip(completions, all_tests))
    if max_workers <= 1 or len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers) as pool:  # subprocesses: threads only wait
        return list(pool.map(one, items))


# ------------------------------------------------------------------ format (R1-Zero)
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"  # any text without a think/answer tag
_R1_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.S)


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for exactly `<think>...</think> <answer>...</answer>` (whitespace around and
    between, nothing else; no nested, duplicated or missing tags), else 0.0."""
    return [float(_R1_FORMAT.fullmatch(completion_text(c)) is not None) for c in completions]


# ------------------------------------------------------------------ language consistency
def _reasoning(text: str) -> str:
    found = re.findall(r"<think>(.*?)</think>", text, flags=re.S)
    return "\n".join(found) if found else text


def language_consistency_reward(prompts, completions, language="en", **kwargs) -> list[float | None]:
    """The share of the reasoning's words (inside <think>, else the whole completion) written
    in the target language's script (language.py: "en", "zh", "ru", ... or a script name such
    as "Cyrillic"); 1.0 when it has no words (digits and symbols mix no language): scoring
    those lower would pay a policy for writing words. `language` is one target for every
    sample, or a dataset column (one per completion)."""
    targets = (_column("language", language, len(completions), "language_consistency_reward")
               if isinstance(language, (list, tuple)) else [language] * len(completions))
    shares = (language_share(_reasoning(completion_text(c)), target) for c, target in zip(completions, targets))
    return [1.0 if share is None else share for share in shares]


# ------------------------------------------------------------------ registry and sums
REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "math": math_reward,
    "code": code_reward,
    "format": format_reward,
    "language": language_consistency_reward,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward '{name}'; built-in rewards: {', '.join(REWARDS)}")
    return REWARDS[name]


def _name(fn) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__name__", type(inner).__name__)


def combine_rewards(funcs: Sequence[RewardFn], weights: Sequence[float] | None = None):
    """A function (prompts, completions, **columns) -> (totals, per_function):
    totals[i] = Σ_k weight_k · value_k[i], with None counted as 0; per_function maps each
    function's name to its raw values (None kept, for "reward total and per function"
    logging over the samples each applies to). None is neutral only when all of a prompt's
    samples get it, so a reward returns None for what the prompt decides (no gold, no tests),
    never for what a completion does."""
    funcs = list(funcs)
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} weights for {len(funcs)} reward functions")
    names: list[str] = []
    for fn in funcs:
        base, k = _name(fn), 2
        name = base
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)

    def combined(prompts, completions, **columns):
        per_function: dict[str, list[float | None]] = {}
        totals = [0.0] * len(completions)
        for name, fn, w in zip(names, funcs, weights):
            values = list(fn(prompts, completions, **columns))
            if len(values) != len(completions):
                raise ValueError(f"reward '{name}' returned {len(values)} values for "
                                 f"{len(completions)} completions")
            per_function[name] = values
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] += w * float(v)
        return totals, per_function

    combined.names = names
    return combined
