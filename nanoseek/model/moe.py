"""DeepSeekMoE: fine-grained routed experts + shared experts (V2 §2.2, V3 §2.1.2).

Legend: B batch, T tokens per sequence, N = B·T tokens, D hidden_size, E routed experts,
K experts per token, F moe_intermediate_size, G expert groups.

Routing (V3 eq. 12-16). Affinities s_{i,t} = sigmoid(u_t·e_i) (V3) or softmax (V2, GShard).
Selection adds a per-expert bias b_i (`e_score_correction_bias`) to s for choosing only;
the gate values g_{i,t} are the unbiased s of the chosen experts, normalised over the top-K
when `norm_topk_prob`, times `routed_scaling_factor`. Group-limited routing first keeps the
`topk_group` best of `n_group` groups, a group scored by its best expert (V2,
`group_limited_greedy`) or the sum of its best two (V3, `noaux_tc`), then picks K experts
inside them, which bounds how many devices a token's experts live on.

Balancing.
- Auxiliary-loss-free (V3 §2.1.2): after each optimizer step, b_i += γ·sign(mean load −
  load_i) from that step's expert loads: overloaded experts become less attractive. The
  loads are counted in the forward pass (`Router.load`), the update is `update_bias()`.
- Sequence-wise balance loss (V3 eq. 17-20): per sequence, f_i = E/(K·T)·Σ_t 1[i ∈ TopK_t],
  P_i = 1/T·Σ_t s'_{i,t} with s' the affinities normalised per token, L = α·Σ_i f_i·P_i,
  averaged over sequences (`seq_aux=True`).
- Batch-wise auxiliary loss (GShard / V2 eq. 12-14): the same formula over all N tokens
  (`seq_aux=False`), for the GShard baseline.
Balance is watched through MaxVio = (max_i load_i − mean load) / mean load (V3 §4.5.2).

Experts. Routed experts are stored stacked ([E, F, D] and [E, D, F]). Every path below
computes the same sum; which one runs is the model's `ExpertPath` (`Transformer.
set_expert_path`; the inference engine sets it from its config), and `Experts.last_path`
names the one the last eager forward took:
- grouped: one grouped GEMM over the tokens sorted by expert (`torch._grouped_mm`), no host
  sync: training and prefill;
- gather: each (token, expert) pair's weights gathered and applied as batched matrix-vector
  products (gpt-fast's decode MoE): three plain kernels instead of a sort, a grouped GEMM
  over all E groups and a scatter, for a decode step of a few pairs;
- gather_gemv: gathered, the down projection through the GEMV of kernels/fp8_linear.py (FP8
  experts: gate and up too), for timing against Inductor's reductions; never under "auto";
- small_batch: kernels/moe.py's two expert-major Triton kernels, which read each chosen
  expert's weights once with no sort and no scatter: decode steps of up to 64 tokens;
- loop: one plain SwiGLU per expert over its tokens, the reference twin (it syncs to find
  each expert's tokens).
"auto" gathers up to `gather_max_pairs` pairs, takes the small-batch kernels above that
where they were measured faster than the grouped GEMM (kernels.fast_kernels_supported;
benchmarks/results/moe_sweep.json), else the grouped GEMM. Under autograd it never gathers
nor takes the kernels. Where the grouped GEMM cannot run (an older GPU, CPU under
torch.compile) a dense form or the loop stands in for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import fast_kernels_supported, triton_runs


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """`mlp.gate` in the checkpoints: weight [E, D] and, for V3, e_score_correction_bias [E]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.n_group, self.topk_group = c.n_group or 1, c.topk_group or 1
        self.norm_topk_prob, self.scaling = c.norm_topk_prob, c.routed_scaling_factor
        self.bias_update_speed = c.bias_update_speed
        self.weight = nn.Parameter(torch.empty(self.n_experts, c.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None
        # tokens routed to each expert since the last update_bias() (training mode only)
        self.register_buffer("load", torch.zeros(self.n_experts), persistent=False)

    def forward(self, x_ND):
        with torch.autocast(x_ND.device.type, enabled=False):  # gating stays in float32
            if torch.compiler.is_compiling() and x_ND.shape[0] <= PRODUCT_LOGITS_MAX:
                # a few tokens: a product and a sum that Inductor fuses with the scoring below
                logits_NE = (x_ND.float()[:, None, :] * self.weight.float()).sum(-1)
            else:
                logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.sigmoid() if self.scoring_func == "sigmoid" else logits_NE.softmax(-1)
        choice_NE = scores_NE
        if self.e_score_correction_bias is not None:
            choice_NE = scores_NE + self.e_score_correction_bias
        # a few tokens under torch.compile (decode): ranks by pairwise comparison, which
        # Inductor fuses into a couple of kernels, instead of a sort-based torch.topk per
        # selection (two kernels each, three selections per layer); eagerly the comparisons
        # would be more kernels than topk's. The same choice wherever scores are not tied.
        pairwise = torch.compiler.is_compiling() and x_ND.shape[0] * self.n_experts ** 2 <= PAIRWISE_TOPK_MAX
        if self.topk_method != "greedy" and self.n_group > 1:
            groups_NGX = choice_NE.unflatten(-1, (self.n_group, -1))
            if self.topk_method == "noaux_tc" and pairwise:  # a group's score: the sum of its top two
                group_score_NG = groups_NGX.where(top_mask(groups_NGX, 2, pairwise), 0.0).sum(-1)
            elif self.topk_method == "noaux_tc":
                group_score_NG = groups_NGX.topk(2, dim=-1).values.sum(-1)
            else:
                group_score_NG = groups_NGX.amax(-1)
            keep_NG = top_mask(group_score_NG, self.topk_group, pairwise)
            choice_NE = groups_NGX.masked_fill(~keep_NG[..., None], float("-inf")).flatten(1)
        idx_NK = (rank_order(ranks(choice_NE), self.top_k) if pairwise
                  else choice_NE.topk(self.top_k, dim=-1).indices)
        weight_NK = scores_NE.gather(1, idx_NK)
        if self.norm_topk_prob:
            weight_NK = weight_NK / (weight_NK.sum(-1, keepdim=True) + 1e-20)
        weight_NK = weight_NK * self.scaling
        if self.training:
            with torch.no_grad():
                self.load.scatter_add_(0, idx_NK.flatten(), torch.ones_like(idx_NK.flatten(), dtype=self.load.dtype))
        return weight_NK, idx_NK, scores_NE

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """b_i += γ·sign(mean load − load_i) from the loads counted since the last call.

        Returns those loads and resets the counter. A no-op on the bias for routers
        without one (V2, GShard)."""
        load = self.load.clone()
        if self.e_score_correction_bias is not None:  # no load counted: sign(0 - 0) = 0, no change
            self.e_score_correction_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        self.load.zero_()
        return load


# tokens x experts^2 up to which a compiled router ranks its scores by pairwise comparison
# instead of torch.topk (64 experts: 256 tokens)
PAIRWISE_TOPK_MAX = 2**20
# tokens up to which a compiled router's logits are a product and a sum, not a GEMM
PRODUCT_LOGITS_MAX = 32


def top_mask(x: torch.Tensor, k: int, pairwise: bool) -> torch.Tensor:
    """True at the k largest entries along the last dimension (ties: the lower index), by
    pairwise ranks or by torch.topk."""
    if pairwise:
        return ranks(x) < k
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dimension, 0 for the largest: how many entries are
    greater, or equal with a lower index. [..., E] -> [..., E] (compares E^2 pairs). NaN
    ranks as -inf, so the ranks stay a permutation (a non-finite step is skipped anyway)."""
    E = x.shape[-1]
    x = x.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    i = torch.arange(E, device=x.device)
    x_i, x_j = x[..., :, None], x[..., None, :]
    beats = (x_j > x_i) | ((x_j == x_i) & (i[None, :] < i[:, None]))  # [..., i, j]: j ranks above i
    return beats.sum(-1)


def rank_order(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ranks 0..k-1 in that order (torch.topk(k).indices): [..., E] -> [..., k]."""
    E = rank.shape[-1]
    hit = rank[..., :, None] == torch.arange(k, device=rank.device)        # [..., E, k]
    return (hit * torch.arange(E, device=rank.device)[:, None]).sum(-2)


def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load − mean load) / mean load."""
    mean = load_E.float().mean()
    return (load_E.float().max() - mean) / mean.clamp_min(1e-9)


def balance_loss(scores_BTE, idx_BTK, n_experts: int, alpha: float, per_sequence: bool):
    """α·Σ_i f_i·P_i, per sequence (V3 eq. 17-20) or over the batch (GShard, V2 eq. 12-14)."""
    B, T, K = idx_BTK.shape
    if not per_sequence:
        scores_BTE, idx_BTK = scores_BTE.reshape(1, B * T, -1), idx_BTK.reshape(1, B * T, K)
        T = B * T
    probs = scores_BTE / scores_BTE.sum(-1, keepdim=True)  # s'_{i,t}
    counts_BE = torch.zeros(idx_BTK.shape[0], n_experts, device=idx_BTK.device).scatter_add_(
        1, idx_BTK.flatten(1), torch.ones(idx_BTK.shape[0], T * K, device=idx_BTK.device))
    f_BE = counts_BE * n_experts / (K * T)
    P_BE = probs.mean(1)
    return alpha * (f_BE * P_BE).sum(-1).mean()


EXPERT_PATHS = ("auto", "grouped", "gather", "gather_gemv", "small_batch", "loop")


@dataclass(frozen=True)
class ExpertPath:
    """How the routed experts are computed (module docstring). kind: one of EXPERT_PATHS;
    gather_max_pairs: under "auto", the (token, expert) pairs up to which a forward without
    autograd gathers (0: never); small_batch_launch: launch shapes of kernels/moe.py's
    kernels, {"up": {...}, "down": {...}} over its SMALL_BATCH_EXPERTS_LAUNCH (None: those)."""

    kind: str = "auto"
    gather_max_pairs: int = 16
    small_batch_launch: dict | None = None

    def __post_init__(self):
        if self.kind not in EXPERT_PATHS:
            raise ValueError(f"expert path {self.kind!r}: must be one of {', '.join(EXPERT_PATHS)}")
        if self.gather_max_pairs < 0:
            raise ValueError(f"gather_max_pairs must be >= 0, got {self.gather_max_pairs}")


def small_batch_kernels_take(x: torch.Tensor, weights: tuple[torch.Tensor, ...], n_tokens: int,
                             launch: dict | None = None, anywhere: bool = False,
                             scales: tuple[torch.Tensor, ...] | None = None,
                             block: tuple[int, int] | None = None) -> bool:
    """Whether kernels/moe.py can take the experts of these n_tokens rows: no autograd, the
    weights (stacked gate [E, F, D], up, down) in the compute dtype, or FP8 with their block
    scales, and the kernels' own limits (kernels.moe.unsupported). anywhere: wherever Triton
    runs (the CPU tests run its interpreter); else only where the kernels were measured faster
    (fast_kernels_supported, for the compute dtype)."""
    if torch.is_grad_enabled() or (scales is None and compute_dtype(x) != weights[0].dtype):
        return False
    if not (triton_runs(x.device) if anywhere else fast_kernels_supported(x.device, compute_dtype(x))):
        return False
    from ..kernels import moe as moe_kernels  # imports Triton (and registers the op) on first use
    return moe_kernels.unsupported(n_tokens, *weights, launch=launch, scales=scales, block=block) is None


class Experts(nn.Module):
    """E SwiGLU experts stored stacked. Checkpoint keys are per expert (see hf.py)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, path: ExpertPath | None = None):
        super().__init__()
        self.path = path or ExpertPath()
        self.last_path: str | None = None  # the path the last eager forward took
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def choose_path(self, x_ND: torch.Tensor, idx_NK: torch.Tensor) -> str:
        """The computation this forward takes: grouped, gather, gather_gemv, small_batch, loop, or dense
        (the grouped GEMM's stand-in under torch.compile where it cannot run)."""
        kind = self.path.kind
        if kind == "loop":
            return "loop"
        if kind == "gather_gemv" and not torch.is_grad_enabled() and triton_runs(x_ND.device):
            return "gather_gemv"
        if not torch.is_grad_enabled() and (
                kind == "gather" or (kind == "auto" and idx_NK.numel() <= self.path.gather_max_pairs)):
            return "gather"
        if kind in ("auto", "small_batch"):
            weights, scales, block = self.small_batch_weights()
            if small_batch_kernels_take(x_ND, weights, x_ND.shape[0], self.path.small_batch_launch,
                                        anywhere=kind == "small_batch", scales=scales, block=block):
                return "small_batch"
        if grouped_mm_supported(x_ND):
            return "grouped"
        return "dense" if torch.compiler.is_compiling() else "loop"

    def small_batch_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None,
                                           tuple[int, int] | None]:
        """What kernels/moe.py reads in place: the stacked weights, and for FP8 weights their
        block scales and scale block (a quantised subclass returns those)."""
        return (self.gate_proj, self.up_proj, self.down_proj), None, None

    def expert_weights(self, idx: torch.Tensor | int | None = None) -> tuple[torch.Tensor, ...]:
        """The weights the paths compute with, (gate [E, F, D], up [E, F, D], down [E, D, F]),
        or the rows idx of each: the one place they are read (a quantised subclass dequantises
        here)."""
        if idx is None:
            return self.gate_proj, self.up_proj, self.down_proj
        return self.gate_proj[idx], self.up_proj[idx], self.down_proj[idx]

    def forward(self, x_ND, weight_NK, idx_NK):
        path = self.choose_path(x_ND, idx_NK)
        if not torch.compiler.is_compiling():
            self.last_path = path
        forward = {"grouped": self.forward_grouped, "gather": self.forward_gathered,
                   "gather_gemv": self.forward_gathered_gemv, "small_batch": self.forward_small_batch,
                   "dense": self.forward_dense, "loop": self.forward_loop}[path]
        return forward(x_ND, weight_NK, idx_NK)

    def forward_grouped(self, x_ND, weight_NK, idx_NK):
        N, K = idx_NK.shape
        E = self.gate_proj.shape[0]
        flat_M = idx_NK.flatten()                       # M = N·K (token, slot) pairs
        order_M = flat_M.argsort(stable=True)          # sorted by expert
        token_M = order_M // K
        counts_E = torch.zeros(E, dtype=torch.int32, device=x_ND.device).scatter_add_(
            0, flat_M, torch.ones_like(flat_M, dtype=torch.int32))
        y_MD = self.swiglu_sorted(x_ND[token_M], counts_E)
        # back to (token, slot) order, a permutation: a plain scatter, then each token's K
        # outputs summed at once (fp32 inside the reduction). An index_add_ of the rows would
        # accumulate with atomics in the activation dtype: bf16 sums in whatever order the
        # GPU runs them, so the same prompt could decode differently from run to run.
        y_NKD = torch.empty_like(y_MD).index_put_((order_M,), y_MD).view(N, K, -1)
        return (y_NKD * weight_NK[..., None].to(y_NKD.dtype)).sum(1).to(x_ND.dtype)

    def swiglu_sorted(self, x_MD, counts_E):
        """The experts on rows sorted by expert, counts_E [E] of them each: grouped_swiglu
        (FP8 training, nanoseek/fp8, runs its own here)."""
        return grouped_swiglu(x_MD, counts_E, *self.expert_weights())

    def forward_gathered(self, x_ND, weight_NK, idx_NK):
        """Each (token, expert) pair on its own copy of that expert's weights: M = N·K gathered
        [F, D] / [D, F] matrices and batched matrix-vector products. Reads M experts' weights
        (a repeated expert twice), so it is for small M only; no sort, no host sync."""
        N, K = idx_NK.shape
        dtype = compute_dtype(x_ND)
        gate_MFD, up_MFD, down_MDF = (w.to(dtype) for w in self.expert_weights(idx_NK.flatten()))
        if torch.compiler.is_compiling():
            h_M1F = gathered_hidden(x_ND, gate_MFD, up_MFD)[:, None, :]
            y_MD = (down_MDF * h_M1F).sum(-1, dtype=torch.float32)
            return (y_MD.view(N, K, -1) * weight_NK[..., None]).sum(1).to(x_ND.dtype)
        x_MD1 = x_ND.to(dtype).repeat_interleave(K, dim=0)[:, :, None]
        gate_MF1 = torch.bmm(gate_MFD, x_MD1)
        up_MF1 = torch.bmm(up_MFD, x_MD1)
        y_MD1 = torch.bmm(down_MDF, F.silu(gate_MF1) * up_MF1)
        y_NKD = y_MD1.view(N, K, -1) * weight_NK[..., None].to(y_MD1.dtype)
        return y_NKD.sum(1).to(x_ND.dtype)

    def forward_gathered_gemv(self, x_ND, weight_NK, idx_NK):
        """As forward_gathered, the down projection through kernels/fp8_linear.py's GEMV, each
        pair's expert read in place (Inductor's one-row reductions read gate and up at the copy
        bandwidth but the down projection, fused with the next norm, at about half on an H100:
        benchmarks/results/h100_decode_shapes/v2lite_fused)."""
        from ..kernels.fp8_linear import experts_down_gemv
        gate_MFD, up_MFD, _ = self.expert_weights(idx_NK.flatten())
        h_MF = gathered_hidden(x_ND, gate_MFD, up_MFD)
        return experts_down_gemv(h_MF, idx_NK, weight_NK, self.down_proj).sum(1).to(x_ND.dtype)

    def forward_small_batch(self, x_ND, weight_NK, idx_NK):
        """kernels/moe.py's two expert-major kernels: each chosen expert's weights read once,
        no sort; each (token, slot)'s gated output in float32, summed here."""
        from ..kernels.moe import small_batch_experts
        weights, scales, block = self.small_batch_weights()
        dtype = compute_dtype(x_ND) if scales is not None else self.gate_proj.dtype
        y_NKD = small_batch_experts(x_ND.to(dtype), idx_NK, weight_NK, *weights,
                                    launch=self.path.small_batch_launch, scales=scales, block=block)
        return y_NKD.sum(1).to(x_ND.dtype)

    def forward_dense(self, x_ND, weight_NK, idx_NK):
        """Every expert on every token, weighted by a mostly-zero gate: E/K times the work, no
        host sync. Only for torch.compile where the grouped GEMM cannot run (float32 on CPU,
        whose grouped GEMM has no compile support yet)."""
        gate_EFD, up_EFD, down_EDF = self.expert_weights()
        gates_NE = torch.zeros(x_ND.shape[0], gate_EFD.shape[0], dtype=x_ND.dtype,
                               device=x_ND.device).scatter_add(1, idx_NK, weight_NK.to(x_ND.dtype))
        h_NEF = (F.silu(torch.einsum("nd,efd->nef", x_ND, gate_EFD)) * torch.einsum("nd,efd->nef", x_ND, up_EFD))
        return torch.einsum("ne,nef,edf->nd", gates_NE, h_NEF, down_EDF)

    def forward_loop(self, x_ND, weight_NK, idx_NK):
        """Reference twin: one plain SwiGLU per expert over the tokens that chose it."""
        out = torch.zeros_like(x_ND)
        for e in range(self.gate_proj.shape[0]):
            token, slot = torch.where(idx_NK == e)
            if token.numel() == 0:
                continue
            x = x_ND[token]
            gate_FD, up_FD, down_DF = self.expert_weights(e)
            h = F.silu(x @ gate_FD.T) * (x @ up_FD.T)
            y = (h @ down_DF.T) * weight_NK[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return out


def gathered_hidden(x_ND: torch.Tensor, gate_MFD: torch.Tensor, up_MFD: torch.Tensor) -> torch.Tensor:
    """h [M, F] in the weights' dtype: each of the M = N·K (token, slot) pairs' SwiGLU hidden state
    on its gathered gate and up, written as products and sums, which Inductor turns into one kernel
    per projection that reads the chosen experts' rows in place (no gathered copy, no GEMV)."""
    dtype = gate_MFD.dtype
    x_M1D = x_ND.to(dtype).repeat_interleave(gate_MFD.shape[0] // x_ND.shape[0], dim=0)[:, None, :]
    gate_MF = (gate_MFD * x_M1D).sum(-1, dtype=torch.float32)
    up_MF = (up_MFD * x_M1D).sum(-1, dtype=torch.float32)
    return (F.silu(gate_MF) * up_MF).to(dtype)


def grouped_swiglu(x_MD: torch.Tensor, counts_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                   w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert, `counts_E` [E] of them for each, through their expert's SwiGLU
    as three grouped GEMMs in the compute dtype: [M, D] -> [M, D]."""
    offsets_E = counts_E.cumsum(0, dtype=torch.int32)
    dtype = compute_dtype(x_MD)
    w_gate, w_up, w_down = (w.to(dtype).transpose(-2, -1) for w in (w_gate_EFD, w_up_EFD, w_down_EDF))
    x_MD = x_MD.to(dtype)
    gate_MF = torch._grouped_mm(x_MD, w_gate, offs=offsets_E)
    up_MF = torch._grouped_mm(x_MD, w_up, offs=offsets_E)
    return torch._grouped_mm(F.silu(gate_MF) * up_MF, w_down, offs=offsets_E)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's if it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs on Hopper+ GPUs in bf16 and on CPU in float32."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return torch.cuda.get_device_capability(x.device)[0] >= 9 and compute_dtype(x) == torch.bfloat16
    # CPU float32 runs eagerly, but its grouped GEMM has no compile (meta) support yet
    return compute_dtype(x) == torch.float32 and not torch.compiler.is_compiling()


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts = c.n_routed_experts
        self.aux_loss_alpha, self.seq_aux = c.aux_loss_alpha, c.seq_aux
        self.gate = Router(c)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
                               if c.n_shared_experts else None)

    def forward(self, x_BTD):
        """Returns the output [B, T, D] and the balance loss (a zero scalar when unused)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        weight_NK, idx_NK, scores_NE = self.gate(x_ND)
        y_ND = self.experts(x_ND, weight_NK, idx_NK)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        aux = x_BTD.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_loss_alpha > 0:
            aux = balance_loss(scores_NE.view(B, T, -1), idx_NK.view(B, T, -1), self.n_experts,
                               self.aux_loss_alpha, self.seq_aux)
        return y_ND.view(B, T, D), aux
