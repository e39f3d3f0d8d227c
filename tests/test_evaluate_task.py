"""evaluate_task's greedy accuracy, pass@k and sampled pass@1 (R1's metric), counted by hand
on a scripted model: `generate` is replaced by one that answers problem i right or wrong by a
rule of (i, temperature, seed), so every figure is known in advance."""

import pytest
import torch

from nanoseek.data.tasks import get_task
from nanoseek.train import evaluate
from nanoseek.train.intervals import mean_interval, wilson_interval

N = 12


class CharTokenizer:
    eos_id = 0
    bos = ""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return messages[-1]["content"]


def scripted_generate(examples, seeds_seen):
    """Greedy: problems 0..5 right. Sample with seed s: problem i right when (i + s) % 3 == 0."""
    index = {ex.prompt: i for i, ex in enumerate(examples)}

    def generate(model, prompts, max_new_tokens, eos_id, temperature=0.0, seed=None, autocast=None):
        seeds_seen.append(seed)
        outs = []
        for ids in prompts:
            i = index["".join(chr(c) for c in ids)]
            right = i < 6 if temperature == 0 else (i + seed) % 3 == 0
            answer = examples[i].answer if right else "-1"
            outs.append([ord(c) for c in f"<think>\n</think>\n<answer>{answer}</answer>"])
        return outs
    return generate


def test_greedy_pass_at_k_and_sampled_pass_at_1_counted_by_hand(monkeypatch):
    examples = get_task("arithmetic").generate(N, level=1, split="test", seed=1234, unique=True)
    seeds = []
    monkeypatch.setattr(evaluate, "generate", scripted_generate(examples, seeds))
    r = evaluate.evaluate_task(torch.nn.Linear(1, 1), CharTokenizer(), "arithmetic", 1, n=N, k=2, samples=3,
                               temperature=0.6, progress=False, per_problem=True)
    assert r["greedy_accuracy"] == 6 / N and r["greedy_interval"] == wilson_interval(6, N)
    assert r["greedy_correct"] == [True] * 6 + [False] * 6
    # pass@2 with seeds 1234, 1235: right when (i + 1234) % 3 == 0 or (i + 1235) % 3 == 0, 8 of 12
    assert r["pass@2"] == 8 / N
    # sampled pass@1 over the same runs and one more, seeds 1234..1236 (three residues mod 3):
    # every problem right once in three
    assert r["sampled_scores"] == [pytest.approx(1 / 3)] * N
    assert r["sampled_pass@1"] == pytest.approx(1 / 3) and r["samples"] == 3
    assert r["sampled_pass@1_interval"] == pytest.approx(mean_interval([1 / 3] * N))
    assert r["temperature"] == 0.6
    assert seeds == [None, 1234, 1235, 1236]  # one greedy pass, then 3 sampled runs shared by both figures
