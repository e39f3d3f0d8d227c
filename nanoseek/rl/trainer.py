"""The GRPO training loop: rollouts by the inference engine on the policy's own weights.

Per step (GRPOTrainer.train_step):

    prompts   N training prompts: a built-in task's train split (`tasks.get_task(name)
              .generate`, seeded by (seed, step, attempt), so a resumed run draws what an
              uninterrupted one would) or a list of dataset rows {"prompt": ..., columns};
              rendered with the R1-Zero template (templates.py, R1 Table 1) or the chat
              template (optionally opening "<think>\\n").
    rollouts  G completions per prompt from `infer.Engine` over the policy module itself
              (no weight copy: the engine reads the same parameters the optimizer updates;
              its latent cache is its own buffer, so one engine is reused across steps and
              rebuilt only when a longer prompt needs a longer slot; on several processes,
              parallel/grpo.py decodes with a plain copy instead). Each request has its
              own seed from (seed, step, prompt, j): the rollouts are reproducible.
    rewards   the configured functions (rewards.py, TRL signature; `reward_funcs` adds the
              caller's own) combined with the configured weights; the task's `meta`, and
              `answer`, arrive as dataset columns.
    advantages grpo.group_advantages (scale "group" as GRPO, "none" as Dr. GRPO).
    dynamic sampling (DAPO §3.2, optional): groups whose rewards are all equal carry no
              gradient (advantages 0); they are dropped and more prompts are sampled, up to
              `dynamic_sampling_tries` extra rounds, to fill N groups; a step left with no
              informative group makes no update.
    old / ref log-probs under no_grad: the sampling policy's (needed only when mu > 1; with
              mu = 1 the ratio is 1 in value and old_logp = logp.detach() is the same
              number, as TRL does) and the frozen initial model's (only when beta > 0).
    update    mu inner iterations over the same rollouts, each: grpo.grpo_loss (over
              micro-batches with gradient accumulation, weighted so the sum equals the
              full-batch loss of every loss_type), clipping, one AdamW step.

Choices, stated:
- MTP and the balance loss are not used in RL: the objective is the policy's own
  next-token log-probs (sequence_logprobs calls the model without labels, so neither term
  is computed). MTP weights are left as they are (they drift from the trunk; a later
  SFT or a short MTP-only pass re-aligns them for speculative decoding).
- The auxiliary-loss-free expert bias IS updated after each optimizer step
  (`model.update_expert_bias()`) from the expert loads of that step's training forwards,
  as in pre-training (V3 §2.1.2): RL shifts which experts the policy uses, and a frozen
  bias would let the load drift out of balance. Rollout and old/ref forwards run in eval
  mode and count no load.
- The reference model is a frozen copy of the model given to the constructor (the initial
  policy), made before `resume` loads later weights.
- Rollouts run in eval mode with no grad; the model goes back to train mode after.

Logged per step (metrics.jsonl): loss, reward (total mean) and reward_{name} per function
(mean over the samples it applies to), reward_std, accuracy (the accuracy reward's mean,
when configured), response_length, response_length_correct / _incorrect (tokens),
kl, clip_fraction (+ _low/_high), entropy, ratio_mean, grad_norm, groups_kept,
groups_dropped, rollout_tokens, rollout_tokens_per_s, rollout_time_s, step_time_s, lr; and
every eval_every steps (and at step 0, the starting model) eval_accuracy (greedy, held-out
test split), or for a dataset run
with held-out rows (`eval_rows`, `nanoseek grpo --eval-data`) eval_reward and
eval_reward_{name}: the rewards of greedy answers to them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..config import CheckedConfig, described
from ..data.tasks import get_task
from ..infer.config import InferenceConfig
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..train.metrics import ProgressBar, plot_metrics, plot_smoothed, read_metrics
from ..train.optim import build_optimizer
from ..train.precision import PRECISIONS, prepare_precision
from ..train.step import apply_update
from ..loading import resolve_device
from ..train.trainer import Checkpointed, StopRequest, refuse_existing_run, start_run
from .grpo import LOSS_TYPES, SCALES, group_advantages, grpo_loss, sequence_logprobs
from .rewards import combine_rewards, get_reward
from .templates import render_prompt

PROMPT_FORMATS = ("r1_zero", "chat", "chat_think")


@dataclass
class GRPOConfig(CheckedConfig):
    kind = "grpo"
    group_size: int = described(8, "G completions per prompt")
    prompts_per_step: int = described(8, "N prompts per step (B = N x G sequences)")
    max_new_tokens: int = described(128, "tokens per completion at most")
    temperature: float = described(1.0, "sampling temperature of the rollouts")
    top_p: float = described(1.0, "nucleus sampling of the rollouts")
    lr: float = described(1e-5, "learning rate (AdamW, constant)")
    weight_decay: float = described(0.0, "AdamW weight decay")
    grad_clip: float = described(1.0, "clip the gradient norm to this (0: no clipping)")
    beta: float = described(0.001, "KL weight (R1: 0.001); 0 needs no reference model")
    clip_eps: float = described(0.2, "PPO clip range of the ratio")
    clip_eps_high: float | None = described(None, "DAPO clip-higher upper range; null: clip_eps")
    loss_type: str = described("grpo", f"{' | '.join(LOSS_TYPES)} (see rl/grpo.py)")
    scale: str = described("group", "advantages divided by the group's std (group) or not (none, Dr. GRPO)")
    mu: int = described(1, "inner optimizer iterations per batch of rollouts")
    micro_batch: int = described(0, "sequences per forward/backward; 0: the whole batch")
    dynamic_sampling: bool = described(False, "DAPO: drop groups whose rewards are all equal, refill")
    compile_rollouts: bool = described(False, "GPU: torch.compile the engine's decode step")
    ignore_eos: bool = described(False, "rollouts always run to max_new_tokens (benchmarks)")
    precision: str = described("auto", "of the policy's training forwards: auto, bf16, fp32 or fp8 "
                                       "(train/precision.py); rollouts run the BF16 layers")
    dynamic_sampling_tries: int = described(3, "extra sampling rounds to refill the groups")
    rewards: dict = described({"accuracy": 1.0}, "reward name -> weight")
    level: int = described(1, "built-in task difficulty")
    prompt_format: str = described("chat", f"{' | '.join(PROMPT_FORMATS)}")
    eval_every: int = described(0, "held-out evaluation every K steps; 0: only at the end")
    eval_n: int = described(0, "held-out problems per evaluation; 0: no evaluation")
    save_every: int | None = described(None, "checkpoint every K steps (null: every tenth of the run; "
                                             "0: only at the end)")
    keep_last: int = described(3, "checkpoints kept (0: all)")
    steps: int = described(100, "GRPO steps")
    seed: int = described(0, "seed of the prompts and the rollouts")
    device: str = described("auto", "auto (a GPU when there is one), cpu, cuda, cuda:N")

    def __post_init__(self):
        self.check_types()
        need = self.need
        self.need_at_least(1, "group_size", "prompts_per_step", "max_new_tokens", "mu", "steps", "level",
                           "dynamic_sampling_tries")
        need(self.group_size >= 2, "group_size", "must be >= 2 (a group of one has no baseline)")
        self.need_at_least(0, "micro_batch", "eval_every", "eval_n", "keep_last", "seed", "beta",
                           "weight_decay", "grad_clip")
        need(self.save_every is None or self.save_every >= 0, "save_every", "must be >= 0 or null")
        need(self.temperature > 0, "temperature", "must be > 0 (GRPO needs sampled, different completions)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.clip_eps > 0, "clip_eps", "must be > 0")
        need(self.clip_eps_high is None or self.clip_eps_high >= self.clip_eps, "clip_eps_high",
             f"must be >= clip_eps ({self.clip_eps}) or null")
        self.need_one_of("loss_type", LOSS_TYPES)
        self.need_one_of("scale", SCALES)
        self.need_one_of("prompt_format", PROMPT_FORMATS)
        self.need_one_of("precision", PRECISIONS)
        need(bool(self.rewards) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                        for w in self.rewards.values()),
             "rewards", 'must be a non-empty {"name": weight} object')


def grpo_config(**changes) -> GRPOConfig:
    """GRPOConfig with `changes`, checked; an unknown field is named with the known ones."""
    return GRPOConfig.with_changes(**changes)


def informative_groups(rewards: Sequence[float], group_size: int) -> list[bool]:
    """Per group of G contiguous rewards: False when all are equal (advantages 0, no
    gradient: DAPO's dynamic-sampling filter), else True."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    groups = [rewards[i:i + group_size] for i in range(0, len(rewards), group_size)]
    return [max(g) - min(g) > 0 for g in groups]


def _seed(*parts) -> int:
    """A stable 62-bit seed from the parts (Python's hash() of str changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 2


@torch.no_grad()
def generate_repeated(model, tokenizer, prompts: list, params: list[SamplingParams] | SamplingParams,
                      repeat: int = 1, prompt_format: str = "chat", max_new_tokens: int = 512,
                      engine: Engine | None = None, compile: bool = False,
                      max_batch: int | None = None, bar: ProgressBar | None = None) -> tuple[list, list, Engine]:
    """Prompts (questions or chat messages) rendered and encoded once, each run `repeat` times
    in a row through `infer.Engine` on `model` itself, in eval mode (no expert-load counting;
    the mode it had is restored). max_batch: cache slots, runs decoded at once (default: all
    runs; more wait for a slot). bar: moved to the number of finished runs as they finish.
    Returns (prompt ids, RequestOutputs, one per run, and the engine), reusing `engine` when
    its slots and length suffice for the next call."""
    ids = [p for p in (tokenizer.encode(render_prompt(tokenizer, p, prompt_format)) for p in prompts)
           for _ in range(repeat)]
    need, limit = max(map(len, ids)) + max_new_tokens, model.config.max_position_embeddings
    if need > limit:
        raise ValueError(f"a prompt of {need - max_new_tokens} tokens + {max_new_tokens} new tokens "
                         f"exceed the model's context of {limit}; lower --max-tokens (max_new_tokens)")
    slots = min(max_batch or len(ids), len(ids))
    if engine is None or engine.max_len < need or engine.num_slots < slots:
        engine = Engine(model, tokenizer, max_batch=slots, max_len=min(limit, 64 * math.ceil(need / 64)),
                        config=InferenceConfig(compile=compile))
    per_run = params if isinstance(params, list) else [params] * len(ids)
    was_training = model.training
    model.eval()
    try:
        # engine.generate's loop, with a look at the finished runs after each engine step
        runs = [engine.add_request(p, sp) for p, sp in zip(ids, per_run)]
        while any(not r.finished for r in runs):
            engine.step()
            if bar is not None:
                bar.update(sum(r.finished for r in runs))
        return ids, [r.output() for r in runs], engine
    finally:
        model.train(was_training)


def sample_prompts(task_or_rows, cfg: GRPOConfig, step: int, n: int, attempt: int = 0) -> list[dict]:
    """The n rows {"prompt": question, columns...} a run draws at `step` from a built-in task
    (its train split at cfg.level) or dataset rows; the same (cfg.seed, step, attempt) give
    the same rows, so a resumed run, or a side-by-side benchmark, draws what this one does."""
    seed = _seed(cfg.seed, step, attempt)
    if not isinstance(task_or_rows, (list, tuple)):
        examples = task_or_rows.generate(n, level=cfg.level, split="train", seed=seed)
        return [{"prompt": ex.prompt, "answer": ex.answer, "meta": ex.meta} for ex in examples]
    rng = random.Random(seed)
    return [dict(rng.choice(task_or_rows)) for _ in range(n)]


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def rollout_metrics(batch: dict) -> dict:
    """A step's rollout figures: reward (mean, spread, per function over the samples each scores,
    and the share it scores where it skips some), response length, accuracy."""
    rewards, lengths = batch["rewards"], [len(c) for c in batch["completion_ids"]]
    mean = sum(rewards) / len(rewards)
    rec = {"reward": mean,
           "reward_std": (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5,
           "response_length": sum(lengths) / len(lengths)}
    for name, values in batch["per_fn"].items():
        m = _mean(values)
        if m is not None:
            rec[f"reward_{name}"] = m
        # the mean above is over the samples a reward applies to; the share beside it keeps a
        # reward that scores a few samples and leaves the rest at 0 from reading as "all good"
        if any(v is None for v in values):
            rec[f"reward_{name}_applies"] = sum(v is not None for v in values) / len(values)
    if "accuracy" in batch["per_fn"]:
        acc = batch["per_fn"]["accuracy"]
        rec["accuracy"] = rec.get("reward_accuracy", 0.0)
        for label, want in (("correct", True), ("incorrect", False)):
            ls = [n for n, a in zip(lengths, acc) if a is not None and (a > 0) == want]
            if ls:
                rec[f"response_length_{label}"] = sum(ls) / len(ls)
    return rec


class GRPOTrainer(Checkpointed):
    stage = "grpo"

    def __init__(self, model, tokenizer, task_or_dataset: str | Sequence[dict], cfg: GRPOConfig,
                 run_dir: str | Path, reward_funcs: dict[str, Callable] | None = None,
                 tokenizer_dir: str | Path | None = None, extra_state: dict | None = None,
                 eval_rows: Sequence[dict] | None = None):
        """model: a nanoseek Transformer (float32 master weights); tokenizer: a ChatTokenizer.
        task_or_dataset: a built-in task name, or rows {"prompt": str, other columns}.
        eval_rows: held-out rows like the dataset's, scored greedily by the same rewards
        (a built-in task's evaluation uses its own test split instead).
        reward_funcs: name -> TRL-signature function, looked up before the built-in rewards;
        cfg.rewards gives each name's weight."""
        self.cfg, self.tokenizer = cfg, tokenizer
        self.run_dir = Path(run_dir)
        self.tokenizer_dir, self.extra_state = tokenizer_dir, extra_state or {}
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device).train()
        # fp8 swaps the layers for FP8 ones, which run only in train mode: the rollouts and the
        # old / reference log-probs (eval mode) stay in BF16
        self.autocast = prepare_precision(self.model, cfg.precision, self.device)
        if isinstance(task_or_dataset, str):
            self.task, self.rows = get_task(task_or_dataset), None
            self.task.generate(1, level=cfg.level)  # a bad level fails here, not at step 1
        else:
            self.task, self.rows = None, list(task_or_dataset)
            if not self.rows or not all(isinstance(r, dict) and "prompt" in r for r in self.rows):
                raise ValueError("a dataset must be a non-empty list of rows with a 'prompt'")
            if cfg.prompt_format == "r1_zero" and not all(isinstance(r["prompt"], str) for r in self.rows):
                raise ValueError("prompt_format=r1_zero takes question strings; these rows hold "
                                 "chat messages: use prompt_format=chat")
        funcs = []
        for name in cfg.rewards:
            funcs.append((reward_funcs or {}).get(name) or get_reward(name))
        self.reward_names = list(cfg.rewards)
        self.reward_fn = combine_rewards(funcs, list(cfg.rewards.values()))
        # combine_rewards names results after the functions; map back to the config's names
        self._name_of = dict(zip(self.reward_fn.names, self.reward_names))
        self.eval_rows = list(eval_rows or [])
        if self.eval_rows and self.task is not None:
            raise ValueError("eval_rows are for a dataset run; a built-in task evaluates on its test split")
        for rows in (self.rows, self.eval_rows):  # a reward that needs a missing column fails here, not later
            if rows:
                self.score({"rows": rows[:1], "completions": [""]})
        self.ref_model = None
        if cfg.beta > 0:  # before any resume: the reference is the initial policy
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.engine: Engine | None = None
        self.step = 0
        self.last_evaluation: dict | None = None  # evaluate_task's result, per problem, of the latest evaluation

    # ------------------------------------------------------------ prompts
    def sample_prompts(self, n: int, attempt: int = 0) -> list[dict]:
        return sample_prompts(self.task or self.rows, self.cfg, self.step, n, attempt)

    # ------------------------------------------------------------ rollouts
    @property
    def rollout_model(self):
        """The module the engine decodes and evaluates with: the policy itself."""
        return self.model

    def _generate(self, prompts: list, params: list[SamplingParams] | SamplingParams,
                  repeat: int = 1) -> tuple[list, list]:
        """generate_repeated on the policy, keeping its engine for the next call."""
        ids, outs, self.engine = generate_repeated(self.rollout_model, self.tokenizer, prompts, params, repeat,
                                                   self.cfg.prompt_format, self.cfg.max_new_tokens,
                                                   self.engine, self.cfg.compile_rollouts)
        return ids, outs

    def rollout(self, rows: list[dict], attempt: int = 0, first: int = 0) -> dict:
        """G completions per row: prompt ids, completion ids and texts, in row-major order.
        first: the step's index of rows[0], which the rollout seeds take."""
        G, cfg = self.cfg.group_size, self.cfg
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=_seed(cfg.seed, self.step, attempt, first + i, j), ignore_eos=cfg.ignore_eos)
                  for i in range(len(rows)) for j in range(G)]
        prompt_ids, outs = self._generate([r["prompt"] for r in rows], params, repeat=G)
        return {"prompt_ids": prompt_ids,
                "completion_ids": [o.token_ids for o in outs],
                "completions": [o.text for o in outs],
                "rows": [r for r in rows for _ in range(G)]}

    def rollout_scored(self, rows: list[dict], attempt: int) -> tuple[dict, list[float], dict[str, list]]:
        """rollout() of the rows and score() of its completions."""
        batch = self.rollout(rows, attempt)
        return (batch, *self.score(batch))

    def score(self, batch: dict) -> tuple[list[float], dict[str, list]]:
        rows = batch["rows"]
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        totals, per_fn = self.reward_fn([r["prompt"] for r in rows], batch["completions"], **columns)
        return totals, {self._name_of[k]: v for k, v in per_fn.items()}

    # ------------------------------------------------------------ tensors
    def _tensors(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L] (prompt, completion, right padding) and completion mask [B, L]."""
        seqs = [p + c for p, c in zip(batch["prompt_ids"], batch["completion_ids"])]
        L = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_id
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for b, (p, c) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"])):
            ids[b, :len(p) + len(c)] = torch.tensor(p + c)
            mask[b, len(p):len(p) + len(c)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _amp(self):
        return (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
                else contextlib.nullcontext())

    def _chunks(self, B: int) -> list[slice]:
        mb = self.cfg.micro_batch or B
        return [slice(i, min(i + mb, B)) for i in range(0, B, mb)]

    @torch.no_grad()
    def _logprobs_of(self, model, ids, mask) -> torch.Tensor:
        was_training = model.training
        model.eval()  # no expert-load counting for these forwards
        try:
            with self._amp():
                return torch.cat([sequence_logprobs(model, ids[s], mask[s], self.cfg.temperature)
                                  for s in self._chunks(ids.shape[0])])
        finally:
            model.train(was_training)

    def _update(self, ids, mask, advantages, old_logp, ref_logp, n_rows: int, n_tokens: int) -> dict:
        """One optimizer step over the batch in micro-batches; returns loss and stats. n_rows,
        n_tokens: the sequences and completion tokens the loss is normalised by."""
        cfg = self.cfg
        B, n_tokens = ids.shape[0], max(n_tokens, 1)
        totals: dict[str, torch.Tensor] = {}
        for s in self._chunks(B):
            with self._amp():
                logp, entropy = sequence_logprobs(self.model, ids[s], mask[s], cfg.temperature,
                                                  return_entropy=True)
            old = logp.detach() if old_logp is None else old_logp[s]
            loss, stats = grpo_loss(logp, old, None if ref_logp is None else ref_logp[s],
                                    advantages[s], mask[s], cfg.clip_eps, cfg.clip_eps_high,
                                    cfg.beta, cfg.loss_type, entropy=entropy,
                                    max_completion_length=cfg.max_new_tokens)  # Dr. GRPO's T
            # weight so that the micro-batch losses sum to the full-batch loss
            chunk_tokens = mask[s].sum()
            w = chunk_tokens / n_tokens if cfg.loss_type == "dapo" else (s.stop - s.start) / n_rows
            (loss * w).backward()
            tw = chunk_tokens / n_tokens  # token-mean statistics
            for k, v in {"loss": loss.detach() * w, **{k: v * tw for k, v in stats.items()}}.items():
                totals[k] = totals.get(k, 0) + v
        names = list(totals)  # "loss" first: apply_update checks it is finite
        parts = torch.stack([torch.as_tensor(totals[k], device=self.device).float() for k in names])
        values, norm, finite = self.finish_update(parts)
        return {**dict(zip(names, values)), "grad_norm": norm, "skipped": not finite}

    def finish_update(self, parts: torch.Tensor) -> tuple[list[float], float, bool]:
        """train/step.py's apply_update: clip, step or skip; parts (loss first) as floats,
        grad norm, finite."""
        values, norm, finite, _ = apply_update(self.model, self.optimizer, self.cfg.grad_clip, parts)
        return values, norm, finite

    # ------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, G, N = self.cfg, self.cfg.group_size, self.cfg.prompts_per_step
        t0 = time.perf_counter()
        kept: dict = {"prompt_ids": [], "completion_ids": [], "completions": [], "rows": [],
                      "rewards": [], "per_fn": {}}
        everything = {"completion_ids": [], "rewards": [], "per_fn": {}}
        dropped, rollout_time, rollout_tokens = 0, 0.0, 0
        for attempt in range(1 + (cfg.dynamic_sampling_tries if cfg.dynamic_sampling else 0)):
            need = N - len(kept["rows"]) // G
            if need <= 0:
                break
            rows = self.sample_prompts(need if attempt else N, attempt)
            tr = time.perf_counter()
            batch, rewards, per_fn = self.rollout_scored(rows, attempt)
            rollout_time += time.perf_counter() - tr
            rollout_tokens += sum(len(c) for c in batch["completion_ids"])
            everything["completion_ids"] += batch["completion_ids"]
            everything["rewards"] += rewards
            for k, v in per_fn.items():
                everything["per_fn"].setdefault(k, []).extend(v)
            keep = (informative_groups(rewards, G) if cfg.dynamic_sampling
                    else [True] * (len(rewards) // G))
            for g, ok in enumerate(keep):
                if not ok:
                    dropped += 1
                    continue
                if len(kept["rows"]) // G >= N:
                    break
                sl = slice(g * G, (g + 1) * G)
                for key in ("prompt_ids", "completion_ids", "completions", "rows"):
                    kept[key] += batch[key][sl]
                kept["rewards"] += rewards[sl]
                for k, v in per_fn.items():
                    kept["per_fn"].setdefault(k, []).extend(v[sl])

        record = rollout_metrics(everything)
        record.update(groups_kept=len(kept["rows"]) // G, groups_dropped=dropped,
                      rollout_tokens=rollout_tokens, rollout_time_s=rollout_time,
                      rollout_tokens_per_s=rollout_tokens / max(rollout_time, 1e-9), lr=cfg.lr)
        if kept["rows"]:
            advantages = group_advantages(torch.tensor(kept["rewards"]), G, cfg.scale)
            record.update(self.learn(kept, advantages))
        self.step += 1
        record["step_time_s"] = time.perf_counter() - t0
        return record

    def learn(self, batch: dict, advantages: torch.Tensor, n_rows: int | None = None,
              n_tokens: int | None = None) -> dict:
        """cfg.mu updates on the rollouts `batch` (prompt and completion ids) with their
        advantages [B]; the loss is normalised by n_rows sequences and n_tokens completion
        tokens (default: this batch's). Returns the updates' mean stats."""
        cfg = self.cfg
        ids, mask = self._tensors(batch)
        advantages = advantages.to(self.device)
        n_rows = ids.shape[0] if n_rows is None else n_rows
        n_tokens = int(mask.sum()) if n_tokens is None else n_tokens
        old_logp = self._logprobs_of(self.model, ids, mask) if cfg.mu > 1 else None
        ref_logp = self._logprobs_of(self.ref_model, ids, mask) if self.ref_model is not None else None
        stats = [self._update(ids, mask, advantages, old_logp, ref_logp, n_rows, n_tokens) for _ in range(cfg.mu)]
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy accuracy on cfg.eval_n held-out (test split) problems of the task. The
        chat format goes through train.evaluate.evaluate_task (the same figure as `nanoseek
        eval`), whose whole result, each problem's too, stays in `last_evaluation` for a paired
        comparison with another model; the other formats through the engine with the training
        prompt format."""
        cfg = self.cfg
        if self.task is None:
            return self._evaluate_rows()
        if cfg.prompt_format == "chat":
            from ..train.evaluate import evaluate_task
            r = evaluate_task(self.rollout_model, self.tokenizer, self.task.name, cfg.level, n=cfg.eval_n,
                              fmt="chat", max_new_tokens=cfg.max_new_tokens, progress=False,
                              per_problem=True)
            self.model.train()
            self.last_evaluation = r
            return {"eval_accuracy": r["greedy_accuracy"]}
        examples = self.task.generate(cfg.eval_n, level=cfg.level, split="test", seed=1234, unique=True)
        _, outs = self._generate([ex.prompt for ex in examples], SamplingParams(max_tokens=cfg.max_new_tokens))
        right = [self.task.check(ex, o.text) for ex, o in zip(examples, outs)]
        return {"eval_accuracy": sum(right) / len(right)}

    def _evaluate_rows(self) -> dict:
        """Dataset runs: greedy completions of the first eval_n held-out rows, scored by the
        configured rewards: eval_reward (the weighted total) and eval_reward_{name} (each
        function's mean over the rows it applies to)."""
        rows = self.eval_rows[: self.cfg.eval_n]
        if not rows:
            return {}
        _, outs = self._generate([r["prompt"] for r in rows], SamplingParams(max_tokens=self.cfg.max_new_tokens))
        totals, per_fn = self.score({"rows": rows, "completions": [o.text for o in outs]})
        return {"eval_reward": _mean(totals), **{f"eval_reward_{k}": _mean(v) for k, v in per_fn.items()}}

    # ------------------------------------------------------------ state
    def state(self) -> dict:
        return {"stage": self.stage, "step": self.step, "grpo_config": dataclasses.asdict(self.cfg),
                **self.extra_state}

    # ------------------------------------------------------------ loop
    def fit(self, resume: bool = False, progress: bool = True,
            deadline: float | None = None, before: dict | None = None) -> list[dict]:
        """Train to cfg.steps; returns the records of the steps this call trained.

        A fresh run with evaluations (eval_n > 0) first logs the starting model's held-out
        figures as step 0 of metrics.jsonl, so that the curves start where training does:
        `before` when given (figures the caller already has, e.g. {"eval_accuracy": 0.6}),
        else an evaluation here.

        deadline: a `time.time()` after which the run should be over. The loop then stops
        early, after the step that leaves less time than that step took; that step gets the
        final evaluation and the checkpoint as the last one would, and a later `resume`
        goes on toward cfg.steps (GRPO's learning rate is constant: no schedule to cut).
        Ctrl-C or SIGTERM ends the step in flight, saves it and raises TrainingInterrupted."""
        cfg = self.cfg
        start_run(self.run_dir, resume, self.resume, cfg.seed)
        records = []
        logger, bar = self.outputs(progress)
        with logger, bar, StopRequest(bar.write) as stop:
            if self.step == 0 and cfg.eval_n:
                start = before if before is not None else self.evaluate()
                if start:
                    logger.log(0, **start)
            while self.step < cfg.steps and not self.stop_agreed(stop):
                record = self.train_step()
                out_of_time = deadline is not None and time.time() + record["step_time_s"] > deadline
                last = self.step == cfg.steps or out_of_time
                if cfg.eval_n and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    record.update(self.evaluate())
                records.append(logger.log(self.step, **record))
                bar.update(self.step, loss=record.get("loss"), reward=record.get("reward"),
                           accuracy=record.get("accuracy"), held_out=record.get("eval_accuracy"))
                if self.save_due():
                    self.save()
                if out_of_time:
                    break
            if self.is_main:
                plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
                plot_rl_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
            self.end_run(stop)
        return records


def plot_rl_metrics(metrics_jsonl: str | Path, out_dir: str | Path) -> Path | None:
    """rl.png: reward (total, and held-out for dataset runs), accuracy (train and held-out)
    and response length (correct / incorrect) over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    if not records:
        return None

    def series(name):
        pts = [(r["step"], r[name]) for r in records
               if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("reward", ["reward", "eval_reward"]), ("accuracy", ["accuracy", "eval_accuracy"]),
              ("response length (tokens)", ["response_length", "response_length_correct",
                                            "response_length_incorrect"])]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            xs, ys = series(name)
            if xs and name.startswith("eval_"):  # a few held-out points: drawn as they are
                ax.plot(xs, ys, label=name, marker="o", markersize=3, linewidth=1.2)
            elif xs:
                plot_smoothed(ax, xs, ys, name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "rl.png", dpi=110)
    plt.close(fig)
    return out / "rl.png"


def grpo(model_dir: str | Path, task: str | Sequence[dict], cfg: GRPOConfig, out: str | Path,
         resume: bool = False, progress: bool = True, deadline: float | None = None,
         data: str | None = None, eval_rows: Sequence[dict] | None = None,
         before: dict | None = None, parallel=None) -> tuple[GRPOTrainer, list[dict]]:
    """The CLI's stage: a checkpoint (or run directory) + its tokenizer -> GRPO -> out/final.
    task: a built-in task name, or dataset rows (recipe.load_prompt_rows) read from `data`;
    eval_rows: held-out rows for a dataset run. deadline, before: as in GRPOTrainer.fit.
    parallel: a parallel.mesh.ParallelConfig to learn on the processes torchrun started."""
    from ..train.stages import load_base, publish_final
    out = Path(out)
    resolve_device(cfg.device)  # a device this machine lacks fails before any work
    if not resume:
        refuse_existing_run(out)
    src, tok, tok_dir, model = load_base(model_dir, out)
    source = {"task": task} if isinstance(task, str) else {"data": data}
    kind = GRPOTrainer
    if parallel is not None:
        from ..parallel.grpo import ParallelGRPOTrainer
        kind = partial(ParallelGRPOTrainer, parallel=parallel)
    trainer = kind(model, tok, task, cfg, out, tokenizer_dir=tok_dir,
                   extra_state={**source, "base_model": str(src)}, eval_rows=eval_rows)
    records = trainer.fit(resume=resume, progress=progress, deadline=deadline, before=before)
    final = trainer.final_model()
    if final is not None:
        publish_final(final, tok_dir, out)
        (out / "grpo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return trainer, records
