"""Held-out accuracy on the built-in tasks: greedy accuracy and pass@k.

Prompts are the task's test split (disjoint from training by construction). A model after
SFT is prompted with the chat template (the answer is read from `<answer>…</answer>`); a
pretrained-only model with the plain-text format it was trained on ("Question: …\nSolution:").
pass@k: k samples per problem at the given temperature; a problem counts when any is right
(the unbiased estimator of Chen et al. 2021 with n = k). Sampled pass@1 (`samples` > 0): the
mean accuracy of that many samples per problem at the temperature, the metric DeepSeek-R1
reports (at T = 0.6); it moves with what RL sharpens before greedy decoding does. Each
accuracy comes with its 95% interval (intervals.py); `per_problem=True` also returns every
problem's greedy result and sampled score, for a paired comparison of two models on the same
problems.

Held-out loss: the main model's next-token loss over batches the training loaders did not
see (in eval mode, so neither the MTP nor the balance terms), weighted by counted positions.
"""

from __future__ import annotations

import torch

from ..data.tasks import check, get_task
from ..infer import generate
from .intervals import mean_interval, wilson_interval
from .metrics import ProgressBar


def task_prompt(tokenizer, prompt: str, fmt: str) -> list[int]:
    if fmt == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        text = tokenizer.bos + f"Question: {prompt}\nSolution:\n"
    return tokenizer.encode(text)


def evaluate_task(model, tokenizer, task: str, level: int, n: int = 100, k: int = 0,
                  temperature: float = 0.8, fmt: str = "chat", max_new_tokens: int = 160,
                  batch_size: int = 64, seed: int = 1234, progress: bool = True,
                  per_problem: bool = False, samples: int = 0, greedy: bool = True) -> dict:
    if n < 1:
        raise ValueError(f"the number of held-out problems must be positive, got {n}")
    examples = get_task(task).generate(n, level=level, split="test", seed=seed, unique=True)
    prompts = [task_prompt(tokenizer, ex.prompt, fmt) for ex in examples]
    autocast = torch.bfloat16 if next(model.parameters()).is_cuda else None
    k = k if k > 1 else 0
    # greedy, then max(k, samples) sampled runs: pass@k reads the first k, pass@1 the first `samples`
    passes = int(greedy) + max(k, samples)
    bar = ProgressBar(n * passes, desc=f"eval {task} level {level}", unit="answer", disable=not progress)

    def run(temp: float, sample_seed: int | None) -> list[bool]:
        right = []
        for i in range(0, n, batch_size):
            outs = generate(model, prompts[i:i + batch_size], max_new_tokens, tokenizer.eos_id,
                            temperature=temp, seed=sample_seed, autocast=autocast)
            for ex, ids in zip(examples[i:i + batch_size], outs):
                text = tokenizer.decode(ids)
                if fmt != "chat":
                    text = text.split("Answer:")[-1] if "Answer:" in text else text
                right.append(check(ex, text))
            bar.update(bar.done + len(outs), correct=f"{sum(right)}/{len(right)}")
        return right

    with bar:
        result = {"task": task, "level": level, "n": n, "format": fmt}
        if greedy:  # greedy=False: only the sampled figures
            right = run(0.0, None)
            result.update(greedy_accuracy=sum(right) / n, greedy_interval=wilson_interval(sum(right), n))
            if per_problem:
                result["greedy_correct"] = right
        runs = [run(temperature, seed + j) for j in range(max(k, samples))]
        if k:
            hits = [any(r) for r in zip(*runs[:k])]
            result[f"pass@{k}"] = sum(hits) / n
            result[f"pass@{k}_interval"] = wilson_interval(sum(hits), n)
        if samples:
            scores = [sum(r) / samples for r in zip(*runs[:samples])]
            result["sampled_pass@1"] = sum(scores) / n
            result["sampled_pass@1_interval"] = mean_interval(scores) if n > 1 else (0.0, 1.0)
            result["samples"] = samples
            if per_problem:
                result["sampled_scores"] = scores
        if runs:
            result["temperature"] = temperature
    return result


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    """Mean next-token loss of the main model over `batches` ({input_ids, labels} [B, T],
    labels aligned as the loaders make them), each position counted once."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    was_training = model.training
    model.eval()
    total, counted = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in batches:
        labels = batch["labels"].to(device)
        with autocast:
            out = model(batch["input_ids"].to(device), labels=labels)
        n = (labels[:, 1:] != -100).sum()
        total, counted = total + out.main_loss.float() * n, counted + n
    model.train(was_training)
    return float(total / counted.clamp_min(1))
