"""The R1 recipe's data stages around GRPO: prompts in, checked reasoning traces out.

    rows = load_prompt_rows("problems.jsonl")        # [{"prompt": ..., "answer": ...}, ...]
    rows = task_rows("arithmetic", level=2, n=100)   # a built-in task's train split
    samples = sample_engine(model, tokenizer, rows, n=4)        # a local checkpoint
    samples = sample_endpoint("http://host/v1", rows, n=4)      # any OpenAI-compatible API
    judged = judge(rows, samples)                    # correct? well-formed? per sample
    write_jsonl("sft.jsonl", [sft_record(r["prompt"], s.text) ...])  # `nanoseek sft --data`

Rejection sampling (DeepSeek-R1 §2.3.3): from the RL checkpoint, sample N responses per
prompt and keep only those that are correct and well-formed (R1 also drops mixed-language,
overlong or code-block-cluttered chains; here: the rule-based rewards) as SFT data for the
next round. Distillation (R1 §2.4): a strong teacher's reasoning traces, the same kind of
SFT data, teach a small student; the teacher is a local checkpoint or any endpoint that
speaks OpenAI's chat API. A reasoning model behind such an API returns its chain apart
(`reasoning_content`, DeepSeek; `reasoning`, vLLM and others); it is put back inside
<think>…</think> before the answer, the format of the R1 cold start.

Prompt rows are TRL's: a `prompt` (a question string, or a list of {role, content} chat
messages) and any other columns, which reach the reward functions as keyword arguments.
Correctness is judged by the reward that fits the columns (`correctness_reward`): `meta`
(built-in tasks) -> accuracy, `solution` or `answer` -> math (math-verify), `tests` ->
code (sandboxed); well-formedness by the R1 format reward.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..data.datasets import DataError, read_records
from ..data.tasks import get_task
from ..train.metrics import ProgressBar
from .rewards import REWARDS, format_reward

TEACHER_KEY_ENV = "NANOSEEK_TEACHER_API_KEY"


# ------------------------------------------------------------------ prompt rows
def load_prompt_rows(path: str | Path) -> list[dict]:
    """Rows {"prompt": str | messages, other columns} from .jsonl, .json (a list of objects),
    .parquet or a datasets folder; a DataError names the file, the row and what to fix."""
    path = Path(path)
    if path.exists() and not path.is_dir() and path.suffix not in (".jsonl", ".json", ".parquet"):  # not .txt
        raise DataError(f"{path}: prompt rows come from .jsonl, .json (a list of objects), .parquet "
                        f"or a datasets folder, each row with a 'prompt'; not '{path.suffix}'")
    rows = [check_row(where, r) for where, r in read_records(path)]
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def check_row(where: str, row: dict) -> dict:
    prompt = row.get("prompt")
    if prompt is None:
        raise DataError(f"{where}: a row needs a 'prompt' (a string, or a list of {{role, content}} "
                        f"messages); its columns are {', '.join(row) or 'none'}")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
    elif not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant") for m in prompt)):
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of "
                        "{role: system|user|assistant, content: string} messages")
    return dict(row)


def task_rows(task: str, level: int = 1, n: int = 100, seed: int = 0) -> list[dict]:
    """n distinct train-split problems of a built-in task as rows (prompt, answer, meta)."""
    examples = get_task(task).generate(n, level=level, split="train", seed=seed, unique=True)
    return [{"prompt": ex.prompt, "answer": ex.answer, "meta": ex.meta} for ex in examples]


def correctness_reward(rows: Sequence[dict]) -> str:
    """The name of the reward that says whether a completion is right for these rows."""
    for column, reward in (("meta", "accuracy"), ("solution", "math"), ("answer", "math"),
                           ("tests", "code")):
        if all(r.get(column) is not None for r in rows):
            return reward
    raise DataError("cannot check correctness: every row needs 'meta' (built-in tasks), "
                    "'answer' or 'solution' (math, checked with math-verify) or 'tests' (code)")


def prompt_text(prompt) -> str:
    """The user's question: the prompt string, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


# ------------------------------------------------------------------ sampling
@dataclass
class Sample:
    row: int          # index into the rows
    text: str         # the completion, reasoning inside <think>...</think> when there is one
    tokens: int = 0   # completion tokens (as the sampler counted them; 0 if unknown)


SAMPLE_MAX_BATCH = 256  # sequences a local sampler decodes at once (its cache slots)


def sample_engine(model, tokenizer, rows: Sequence[dict], n: int = 4, temperature: float = 0.7,
                  max_tokens: int = 512, top_p: float = 1.0, seed: int = 0,
                  progress: bool = True) -> list[Sample]:
    """n completions per row from a nanoseek model through the engine (continuous batching;
    per-sample seeds, so the same call gives the same samples), chat-templated prompts."""
    from ..infer.sampling import SamplingParams
    from .trainer import _seed, generate_repeated
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             seed=_seed(seed, i, j)) for i in range(len(rows)) for j in range(n)]
    with sampling_bar(len(params), progress) as bar:
        _, outs, _ = generate_repeated(model, tokenizer, [r["prompt"] for r in rows], params, repeat=n,
                                       max_new_tokens=max_tokens, max_batch=SAMPLE_MAX_BATCH, bar=bar)
    return [Sample(k // n, o.text, len(o.token_ids)) for k, o in enumerate(outs)]


def sampling_bar(total: int, progress: bool) -> ProgressBar:
    return ProgressBar(total, desc="sampling", unit="sample", disable=not progress)


def endpoint_url(url: str) -> str:
    """The chat-completions URL of an OpenAI-compatible base URL (".../v1", or a bare host,
    to which /v1 is added; a URL that already ends in /chat/completions stays)."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.count("/") == 2:  # scheme://host[:port] and no path
        url += "/v1"
    return url + "/chat/completions"


def teacher_key(api_key_file: str | Path | None = None) -> str | None:
    """The teacher's API key: the first line of api_key_file, else $NANOSEEK_TEACHER_API_KEY."""
    import os
    if api_key_file:
        path = Path(api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"--api-key-file {path}: no such file")
        key = path.read_text().strip().splitlines()
        if not key or not key[0].strip():
            raise ValueError(f"--api-key-file {path} is empty")
        return key[0].strip()
    return os.environ.get(TEACHER_KEY_ENV) or None


def trace_text(message: dict) -> str:
    """An OpenAI chat message as one completion: reasoning (reasoning_content or reasoning)
    inside <think>…</think>, then the content."""
    content = (message.get("content") or "").strip()
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning and reasoning.strip():
        return f"<think>\n{reasoning.strip()}\n</think>\n{content}"
    return content


class EndpointError(ValueError):
    """The teacher endpoint refused or failed; the message is one line without the key (a
    ValueError, so the CLI prints it as its one error line)."""


def sample_endpoint(url: str, rows: Sequence[dict], n: int = 4, temperature: float = 0.7,
                    max_tokens: int = 512, top_p: float = 1.0, model: str | None = None,
                    api_key: str | None = None, concurrency: int = 8, timeout: float = 600.0,
                    retries: int = 2, seed: int = 0, progress: bool = True) -> list[Sample]:
    """n completions per row from an OpenAI-compatible chat endpoint, one request per sample
    (n=1 each: not every API takes n > 1), `concurrency` at a time. model: the endpoint's
    model name (default: the first of GET /models). 429 and 5xx answers and dropped
    connections are retried `retries` times; other errors end the run (EndpointError)."""
    import httpx
    chat_url = endpoint_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout, headers=headers) as client:
        if model is None:
            models_url = chat_url[: -len("/chat/completions")] + "/models"
            body = _call(client, "GET", models_url, None, retries)
            ids = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
            if not ids:
                raise EndpointError(f"{models_url} lists no models; name one with --teacher-model")
            model = ids[0]

        def one(job: tuple[int, int]) -> Sample:
            i, j = job
            prompt = rows[i]["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            request = {"model": model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": temperature, "top_p": top_p, "n": 1, "seed": seed * 1_000_003 + i * 1009 + j}
            body = _call(client, "POST", chat_url, request, retries)
            try:
                choice = body["choices"][0]
                tokens = (body.get("usage") or {}).get("completion_tokens") or 0
                return Sample(i, trace_text(choice["message"]), tokens)
            except (KeyError, IndexError, TypeError):
                raise EndpointError(f"{chat_url}: an answer without choices[0].message "
                                    f"({json.dumps(body)[:200]})") from None

        jobs = [(i, j) for i in range(len(rows)) for j in range(n)]
        samples: list[Sample] = []
        with ThreadPoolExecutor(max(1, concurrency)) as pool, sampling_bar(len(jobs), progress) as bar:
            for sample in pool.map(one, jobs):  # in order: the bar lags the fastest answers a little
                samples.append(sample)
                bar.update(len(samples))
        return samples


def _call(client, method: str, url: str, body: dict | None, retries: int) -> dict:
    import httpx
    for attempt in range(retries + 1):
        try:
            r = client.request(method, url, json=body)
        except httpx.HTTPError as e:
            if attempt < retries:
                time.sleep(2 ** attempt)
                continue
            raise EndpointError(f"{url}: {type(e).__name__} ({e})") from None
        if (r.status_code == 429 or r.status_code >= 500) and attempt < retries:
            time.sleep(2 ** attempt)
            continue
        if r.status_code != 200:
            try:
                detail = r.json().get("error", {}).get("message") or r.text
            except (ValueError, AttributeError):
                detail = r.text
            hint = " (set NANOSEEK_TEACHER_API_KEY or --api-key-file)" if r.status_code == 401 else ""
            raise EndpointError(f"{url}: HTTP {r.status_code}: {str(detail)[:200]}{hint}")
        try:
            return r.json()
        except ValueError:
            raise EndpointError(f"{url}: the answer is not JSON ({r.text[:100]!r})") from None
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ judging and output
@dataclass
class Judged:
    sample: Sample
    correct: bool | None   # None: correctness not judged
    well_formed: bool


def judge(rows: Sequence[dict], samples: Sequence[Sample], check_correct: bool = True) -> list[Judged]:
    """Each sample's correctness (the reward that fits the rows' columns, value 1.0) and
    well-formedness (the R1 format reward, 1.0)."""
    texts = [s.text for s in samples]
    prompts = [rows[s.row]["prompt"] for s in samples]
    formed = format_reward(prompts, texts)
    correct: list = [None] * len(samples)
    if check_correct:
        name = correctness_reward(rows)
        columns = {k: [rows[s.row].get(k) for s in samples] for k in rows[0] if k != "prompt"}
        values = REWARDS[name](prompts, texts, **columns)
        correct = [v is not None and v >= 1.0 for v in values]
    return [Judged(s, c, f == 1.0) for s, c, f in zip(samples, correct, formed)]


def pass_rates(rows: Sequence[dict], judged: Sequence[Judged], n: int) -> list[float]:
    """Per row: the fraction of its n samples that are correct and well-formed."""
    kept = [0] * len(rows)
    for j in judged:
        kept[j.sample.row] += bool(j.correct) and j.well_formed
    return [k / n for k in kept]


def select(rows: Sequence[dict], judged: Sequence[Judged], n: int, require_correct: bool,
           require_format: bool) -> tuple[list[dict], dict]:
    """SFT records of the samples that pass (exact repeats of a kept completion for the same
    prompt dropped), and the figures: samples, kept, correct, well-formed, repeats, and per
    prompt its pass rate (correct and well-formed, of n)."""
    records, seen, repeats = [], set(), 0
    for j in judged:
        if (require_correct and not j.correct) or (require_format and not j.well_formed):
            continue
        key = (j.sample.row, j.sample.text)
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        records.append(sft_record(rows[j.sample.row]["prompt"], j.sample.text))
    rates = pass_rates(rows, judged, n)
    stats = {"prompts": len(rows), "samples": len(judged), "kept": len(records), "repeats_dropped": repeats,
             "correct": sum(j.correct is True for j in judged),
             "well_formed": sum(j.well_formed for j in judged),
             "with_reasoning": sum("</think>" in j.sample.text for j in judged),
             "prompts_with_a_pass": sum(r > 0 for r in rates),
             "mean_pass_rate": sum(rates) / len(rates) if rates else 0.0,
             "pass_rate_histogram": pass_rate_summary(rates, n),
             "per_prompt": [{"prompt": prompt_text(r["prompt"]), "pass_rate": rate}
                            for r, rate in zip(rows, rates)]}
    return records, stats


def report_lines(stats: dict, n: int, judged_correct: bool = True) -> list[str]:
    s = stats
    lines = [f"kept {s['kept']}/{s['samples']} samples ({s['kept'] / max(s['samples'], 1):.1%}) from "
             f"{s['prompts']} prompts x {n}: " + (f"{s['correct']} correct, " if judged_correct else "")
             + f"{s['well_formed']} well-formed, {s['with_reasoning']} with reasoning, "
             f"{s['repeats_dropped']} repeats dropped"]
    if judged_correct:
        lines.append(f"per-prompt pass rate (correct and well-formed, of {n}): mean {s['mean_pass_rate']:.1%}; "
                     f"{s['prompts_with_a_pass']}/{s['prompts']} prompts pass at least once; "
                     f"prompts by passes: {s['pass_rate_histogram']}")
    return lines


def sft_record(prompt, completion: str) -> dict:
    """One chat for `nanoseek sft --data`: the prompt's messages (or one user turn) and the
    completion as the assistant's reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [
        {"role": m["role"], "content": m["content"]} for m in prompt]
    return {"messages": messages + [{"role": "assistant", "content": completion}]}


def write_jsonl(path: str | Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def pass_rate_summary(rates: Sequence[float], n: int) -> str:
    """'0/4: 3 prompts, 1/4: 5 prompts, ...' over the prompts' kept counts."""
    counts: dict[int, int] = {}
    for r in rates:
        counts[round(r * n)] = counts.get(round(r * n), 0) + 1
    return ", ".join(f"{k}/{n}: {counts[k]}" for k in sorted(counts))


def first_rows(rows: list[dict], num_prompts: int | None) -> list[dict]:
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be positive, got {num_prompts}")
    return rows if num_prompts is None else rows[:num_prompts]


# ------------------------------------------------------------------ the two commands
def prompt_rows(task: str | None, data: str | None, level: int | None = None,
                num_prompts: int | None = None, seed: int = 0) -> list[dict]:
    """--task NAME [--level L] (num_prompts distinct train problems, default 100) or --data FILE
    (its first num_prompts rows, default all)."""
    if data is not None:
        if level is not None:
            raise ValueError("--level sets a built-in task's difficulty; it does not apply to --data")
        return first_rows(load_prompt_rows(data), num_prompts)
    first_rows([], num_prompts)  # validates the count
    return task_rows(task, level or 1, num_prompts or 100, seed)


def load_sampler(model_dir: str | Path, device: str = "auto"):
    """(model, tokenizer) of a checkpoint or run directory, in eval mode on `device`."""
    from ..loading import load_model_dir
    _, model, tokenizer = load_model_dir(model_dir, device)
    return model.eval(), tokenizer


def _check_sampling(n: int, temperature: float, max_tokens: int) -> None:
    if n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {max_tokens}")


def _sft_data(rows: list[dict], out: str | Path, sample: Callable[[], list[Sample]], n: int,
              temperature: float, max_tokens: int, require_correct: bool, require_format: bool) -> dict:
    """rejection_sample's and distill's common body: check the arguments and the rows before
    any sampling, take the n samples per row of `sample()`, keep those that pass (repeats
    dropped) -> `out` (SFT chats), figures -> out.stats.json. Correctness is judged where the
    rows allow it; require_correct makes rows that do not an error."""
    _check_sampling(n, temperature, max_tokens)
    out = Path(out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out {out}: the SFT file is JSONL; name it FILE.jsonl")
    checkable = True
    try:
        correctness_reward(rows)
    except DataError:
        if require_correct:
            raise
        checkable = False
    judged = judge(rows, sample(), check_correct=checkable)
    records, stats = select(rows, judged, n, require_correct, require_format)
    stats["correctness_checked"] = checkable
    write_jsonl(out, records)
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats


def rejection_sample(model_dir: str | Path, rows: list[dict], out: str | Path, n: int = 4,
                     temperature: float = 0.7, max_tokens: int = 256, seed: int = 0,
                     device: str = "auto") -> dict:
    """n samples per row from the checkpoint; the correct and well-formed ones (repeats
    dropped) -> `out` (SFT chats); figures and per-prompt pass rates -> out.stats.json."""
    def sample():
        model, tokenizer = load_sampler(model_dir, device)
        return sample_engine(model, tokenizer, rows, n=n, temperature=temperature,
                             max_tokens=max_tokens, seed=seed)
    return _sft_data(rows, out, sample, n, temperature, max_tokens, require_correct=True, require_format=True)


def is_url(teacher: str) -> bool:
    return str(teacher).startswith(("http://", "https://"))


def distill(teacher: str, rows: list[dict], out: str | Path, n: int = 1, temperature: float = 0.6,
            top_p: float = 0.95, max_tokens: int = 1024, only_correct: bool = False,
            teacher_model: str | None = None, api_key: str | None = None, concurrency: int = 8,
            seed: int = 0, device: str = "auto") -> dict:
    """The teacher's reasoning traces for the rows -> `out` (SFT chats), all of them or only
    the correct ones. teacher: a checkpoint/run directory, or an OpenAI-compatible base URL.
    Sampling defaults are R1's recommended temperature 0.6, top-p 0.95."""
    def sample():
        if is_url(teacher):
            return sample_endpoint(teacher, rows, n=n, temperature=temperature, max_tokens=max_tokens,
                                   top_p=top_p, model=teacher_model, api_key=api_key,
                                   concurrency=concurrency, seed=seed)
        model, tokenizer = load_sampler(teacher, device)
        return sample_engine(model, tokenizer, rows, n=n, temperature=temperature,
                             max_tokens=max_tokens, top_p=top_p, seed=seed)
    return _sft_data(rows, out, sample, n, temperature, max_tokens, require_correct=only_correct,
                     require_format=False)
