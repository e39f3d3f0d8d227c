"""GRPO's learner on several processes (`torchrun ... -m nanoseek grpo --dp N`): rl/trainer.py's
step, data parallel, with the update of one process on the same global batch.

- Rollouts. Every rank draws the step's same prompts and rolls out its contiguous share of
  them; prompt i of the step keeps its seeds (seed, step, attempt, i, j), so the ranks'
  rollouts together are the one-process run's. A rank decodes with a plain, unsharded copy of
  the policy: an FSDP module cannot decode (its forward is a collective, and the ranks
  generate different lengths). The copy takes the sharded weights after every update, as TRL
  refreshes its vLLM engine.
- Each rank scores its own completions; completions and rewards are then gathered on every
  rank, so the advantages, dynamic sampling's keep-or-resample decisions and the logged
  rollout figures are the same everywhere without further agreement.
- Learner. Each rank takes a contiguous share of the kept sequences, padded to the largest
  share with empty completions (they weigh nothing) so that every rank runs the same FSDP
  forwards. The loss is normalised by the global batch's sequence and token counts, the
  step's figures are summed over the ranks, and apply_parallel_update steps (or skips, on
  every rank alike) with global gradient norm and expert loads.
- The reference model (beta > 0) stays a plain frozen copy on every rank: a rank holds a whole
  copy of the policy for decoding anyway, the reference has no gradients or optimizer state,
  and its forwards over a rank's own rows need no other rank.
- Checkpoints are distributed (parallel/checkpoint.py); metrics, progress, plots, evaluations
  and the final model come from rank 0.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..rl.trainer import GRPOConfig, GRPOTrainer
from ..train.optim import build_optimizer
from .data_parallel import apply_data_parallel
from .mesh import ParallelConfig, ParallelError, build_mesh, device_type, init_distributed
from .step import all_reduce, apply_parallel_update
from .trainer import DistributedRun


def check_grpo_layout(parallel: ParallelConfig, cfg: GRPOConfig) -> None:
    """What GRPO supports on several processes: data parallelism (FSDP2 or replicated)."""
    for flag, value in (("--ep", parallel.ep), ("--pp", parallel.pp)):
        if value > 1:
            raise ParallelError(f"grpo {flag} {value}: GRPO's learner runs data parallel only "
                                f"(--dp N, FSDP2 or --replicate); drop {flag}")
    if parallel.cpu_offload:
        raise ParallelError("grpo --cpu-offload is not supported (the rollout copy is refreshed from "
                            "device weights); drop it")
    if cfg.precision == "fp8":
        raise ParallelError("precision=fp8 is not supported with grpo --dp yet; drop it")
    if cfg.device not in ("auto", device_type()):
        raise ParallelError(f"device={cfg.device!r}: a parallel run uses one {device_type()} per "
                            "process; leave device=auto")


def share(n: int, parts: int, index: int) -> slice:
    """The index-th of `parts` contiguous, near-equal slices of range(n)."""
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return slice(start, start + size + (index < extra))


class ParallelGRPOTrainer(DistributedRun, GRPOTrainer):
    def __init__(self, model, tokenizer, task_or_dataset, cfg: GRPOConfig, run_dir, parallel: ParallelConfig,
                 **kwargs):
        check_grpo_layout(parallel, cfg)
        rank, world = init_distributed()
        parallel.check_world(world)
        super().__init__(model, tokenizer, task_or_dataset, cfg, run_dir, **kwargs)
        self.rank, self.n_ranks, self.is_main = rank, world, rank == 0
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model_config = self.model.config
        self.plain = copy.deepcopy(self.model)        # before sharding: the decoding copy
        # the objective never calls MTP: without this its parameters would have no optimizer
        # state to save, which a fresh optimizer expects when a distributed checkpoint loads
        self.model.mtp_layers.requires_grad_(False)
        self.mesh = build_mesh(parallel) if world > 1 else None
        if self.mesh is not None:
            apply_data_parallel(self.model, self.mesh, parallel)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay)

    @property
    def rollout_model(self):
        return self.plain

    @torch.no_grad()
    def sync_rollout_model(self) -> None:
        """The decoding copy takes the sharded weights (a collective: every rank calls it)."""
        plain = self.plain.state_dict()
        for name, t in self.model.state_dict().items():
            plain[name].copy_(t.full_tensor() if isinstance(t, DTensor) else t)

    def _gather(self, local):
        if self.n_ranks == 1:
            return [local]
        gathered = [None] * self.n_ranks
        dist.all_gather_object(gathered, local)
        return gathered

    def rollout_scored(self, rows: list[dict], attempt: int) -> tuple[dict, list[float], dict[str, list]]:
        mine = share(len(rows), self.n_ranks, self.rank)
        keys = ("prompt_ids", "completion_ids", "completions")
        local = {k: [] for k in keys}, [], {}
        if mine.stop > mine.start:
            batch = self.rollout(rows[mine], attempt, first=mine.start)
            local = {k: batch[k] for k in keys}, *self.score(batch)
        batch, rewards, per_fn = {k: [] for k in keys}, [], {}
        for part, part_rewards, part_per_fn in self._gather(local):   # in rank order: prompt order
            for k in keys:
                batch[k] += part[k]
            rewards += part_rewards
            for name, values in part_per_fn.items():
                per_fn.setdefault(name, []).extend(values)
        batch["rows"] = [r for r in rows for _ in range(self.cfg.group_size)]
        return batch, rewards, per_fn

    def learn(self, batch: dict, advantages: torch.Tensor, n_rows=None, n_tokens=None) -> dict:
        """`batch` is the step's whole batch (the same on every rank): this rank learns on its
        share, normalised by the whole batch's counts, then refreshes the decoding copy."""
        n_rows = len(batch["completion_ids"])
        mine = share(n_rows, self.n_ranks, self.rank)
        pad = -(-n_rows // self.n_ranks) - (mine.stop - mine.start)
        local = {"prompt_ids": batch["prompt_ids"][mine] + batch["prompt_ids"][:1] * pad,
                 "completion_ids": batch["completion_ids"][mine] + [[]] * pad}
        stats = super().learn(local, torch.cat([advantages[mine], advantages.new_zeros(pad)]),
                              n_rows=n_rows, n_tokens=sum(map(len, batch["completion_ids"])))
        self.sync_rollout_model()
        return stats

    def finish_update(self, parts: torch.Tensor) -> tuple[list[float], float, bool]:
        all_reduce(parts)   # each rank holds its share of the global figures
        values, norm, finite, _ = apply_parallel_update(self.model, self.model.routers(), self.mesh,
                                                        self.optimizer, self.cfg.grad_clip, parts)
        return values, norm, finite

    def evaluate(self) -> dict:
        return super().evaluate() if self.is_main else {}

    def resume(self) -> bool:
        found = super().resume()
        if found:
            self.sync_rollout_model()
        return found

    def fit(self, resume: bool = False, progress: bool = True, deadline: float | None = None,
            before: dict | None = None) -> list[dict]:
        if deadline is not None:  # each rank would judge its own clock and stop at another step
            raise ParallelError("a deadline is not supported with grpo --dp; set steps instead")
        return super().fit(resume, progress, None, before)

    def final_model(self):
        return self.plain if self.is_main else None
