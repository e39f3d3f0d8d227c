"""Expert parallelism: routed experts sharded over the EP group, tokens moved by all-to-all.

Legend: N tokens on this rank, K experts per token, M = N·K (token, slot) pairs, D hidden
size, E routed experts, R ranks in the EP group, L = E/R experts per rank (rank r holds
experts [r·L, (r+1)·L), contiguous), S pairs this rank receives.

A MoE layer's router and shared experts stay replicated (data parallel); only `mlp.experts`
is swapped for `ExpertParallelExperts`, whose parameters are DTensors sharded on dim 0 over
the EP mesh, so that distributed checkpoints see the full [E, F, D] tensors and reshard them.
Its forward:
  1. dispatch   sort the M pairs by expert: the pairs for rank r are then one contiguous
                run; exchange the per-expert counts (one small all-to-all, read on the host:
                the split sizes of the next one), then the rows themselves
                (`all_to_all_single`, variable splits, with autograd);
  2. compute    the received rows come grouped by source rank, then local expert; one
                permutation makes them expert-major for the grouped GEMM of the L local experts;
  3. combine    the inverse permutation, the reverse all-to-all, and each token's K outputs
                weighted by its gate values and summed, in the single-device order.
The backward of each all-to-all is the all-to-all with the splits swapped, so the expert
gradients collect every rank's tokens, and the token gradients go back to their ranks.

Group-limited routing maps to ranks: with contiguous placement and `n_group` a multiple of R,
group g lives on rank g // (n_group / R), so a token's experts sit on at most `topk_group`
ranks, V3's "each token goes to at most M nodes" with ranks for nodes (`ranks_per_token`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..config import ModelConfig
from ..model.moe import Experts, MoE, grouped_mm_supported, grouped_swiglu
from .mesh import ParallelError
from .overlap import turn_point


class _Exchange(torch.autograd.Function):
    """all_to_all_single with autograd whose results, the rows forward and their gradients
    backward, are waited on at their first use. Torch's own backward waits at once: on a GPU
    that queues the other overlapped thread's kernels (overlap.py) behind the exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all_single(x.contiguous(), out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return all_to_all_single(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows of x sent in_splits[r] to rank r; returns those received, out_splits[r] from rank r."""
    return _Exchange.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """`mlp.experts` of one MoE layer, its experts spread over `ep_mesh` (same names, same
    full shapes as `Experts`, so checkpoints and the optimizer see one model)."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        E = experts.gate_proj.shape[0]
        self.ep_mesh = ep_mesh
        self.group = ep_mesh.get_group()
        self.n_ranks = ep_mesh.size()
        if E % self.n_ranks:
            raise ParallelError(f"--ep {self.n_ranks} must divide n_routed_experts ({E})")
        self.n_experts, self.n_local = E, E // self.n_ranks
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            # every rank built the same model from the same seed: each keeps its own rows
            shard = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's L experts as plain tensors (differentiable views of the shards)."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w
                     for w in (self.gate_proj, self.up_proj, self.down_proj))

    def forward(self, x_ND, weight_NK, idx_NK):
        N, K = idx_NK.shape
        R, L = self.n_ranks, self.n_local
        flat_M = idx_NK.flatten()
        order_M = flat_M.argsort(stable=True)                       # by expert, hence by rank
        counts_E = torch.bincount(flat_M, minlength=self.n_experts)
        x_sent_MD = x_ND[order_M // K]
        # turn points (overlap.py) right around the all-to-alls, for DualPipeV's overlapped pairs
        x_sent_MD = turn_point(x_sent_MD)                               # A: before the dispatch
        # recv_counts_RL[s, l]: pairs rank s sends to my local expert l
        recv_counts_RL = all_to_all_single(counts_E, None, None, self.group).wait().view(R, L)
        send_R, recv_R = torch.stack([counts_E.view(R, L).sum(1), recv_counts_RL.sum(1)]).tolist()
        x_recv_SD = turn_point(exchange(x_sent_MD, recv_R, send_R, self.group))  # B: dispatched
        # (source, local expert) order -> local-expert-major, stably: the grouped GEMM's layout
        expert_S = torch.repeat_interleave(torch.arange(L, device=x_ND.device).repeat(R),
                                           recv_counts_RL.flatten(), output_size=sum(recv_R))
        perm_S = expert_S.argsort(stable=True)
        y_SD = self.run_local_experts(x_recv_SD[perm_S], recv_counts_RL.sum(0))
        y_recv_SD = turn_point(torch.empty_like(y_SD).index_put_((perm_S,), y_SD))  # C: before the combine
        y_sent_MD = turn_point(exchange(y_recv_SD, send_R, recv_R, self.group))  # D: combined

        y_NKD = torch.empty_like(y_sent_MD).index_put_((order_M,), y_sent_MD).view(N, K, -1)
        return (y_NKD * weight_NK[..., None].to(y_NKD.dtype)).sum(1).to(x_ND.dtype)

    def run_local_experts(self, x_SD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        """Rows sorted by local expert through their experts: the grouped GEMM, or, where it
        cannot run (e.g. float32 on a GPU), one SwiGLU per expert."""
        w_gate, w_up, w_down = self.local_weights()
        if grouped_mm_supported(x_SD):
            return grouped_swiglu(x_SD, counts_L, w_gate, w_up, w_down)
        out, start = [], 0
        for e, n in enumerate(counts_L.tolist()):
            x = x_SD[start:start + n]
            out.append((F.silu(x @ w_gate[e].T) * (x @ w_up[e].T)) @ w_down[e].T)
            start += n
        return torch.cat(out) if out else x_SD.new_zeros(0, w_down.shape[1])


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[ExpertParallelExperts]:
    """Swap every MoE layer's routed experts (of `model`, a Transformer or a pipeline stage)
    for their expert-parallel twin over `ep_mesh`. Returns the new modules."""
    swapped = []
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, Experts):
            module.experts = ExpertParallelExperts(module.experts, ep_mesh)
            swapped.append(module.experts)
    return swapped


def check_expert_layout(config: ModelConfig, ep: int) -> None:
    """Refuse an EP degree the experts cannot be split by, with the field to change."""
    if ep == 1:
        return
    if not config.is_moe:
        raise ParallelError(f"--ep {ep} needs a MoE model; this one has no routed experts")
    if config.n_routed_experts % ep:
        raise ParallelError(f"--ep {ep} must divide n_routed_experts ({config.n_routed_experts})")


def ranks_per_token(config: ModelConfig, ep: int) -> int:
    """The most EP ranks one token's experts can live on under the config's routing: with
    group-limited routing and groups aligned to ranks, topk_group groups' ranks; else up to K."""
    k = config.num_experts_per_tok
    groups = config.n_group or 1
    if config.topk_method == "greedy" or groups == 1:
        return min(k, ep)
    if groups % ep == 0:            # whole groups per rank
        return min(config.topk_group, ep, k)
    if ep % groups == 0:            # each group spread over ep / n_group ranks
        return min(config.topk_group * (ep // groups), ep, k)
    return min(k, ep)
