"""Group Relative Policy Optimization: advantages, the clipped surrogate loss, log-probs.

GRPO (DeepSeekMath, Shao et al. 2024, eq. 3; DeepSeek-R1, Guo et al. 2025, eq. 1-3) drops
PPO's value network: for each question q it samples a group of G outputs o_1..o_G from the
old policy, scores them with rewards r_1..r_G, and uses the group as the baseline.

Advantage (R1 eq. 3; DeepSeekMath §4.1.2 "outcome supervision"), the same for every token
of output i:

    A_i = (r_i − mean(r_1..r_G)) / std(r_1..r_G)

Objective (DeepSeekMath eq. 3; R1 eq. 1 writes the same with a per-output, not per-token,
ratio), maximised:

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t { min( ρ_{i,t} A_i, clip(ρ_{i,t}, 1−ε, 1+ε) A_i )
                                      − β D_KL[π_θ || π_ref] } ]
    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_θold(o_{i,t} | q, o_{i,<t})

KL estimator (DeepSeekMath eq. 4, R1 eq. 2; Schulman, "Approximating KL divergence", 2020,
the "k3" estimator), per token, unbiased and always >= 0:

    D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1

`grpo_loss` returns the negated objective, so it is minimised. The options and where they
come from:

    loss_type="grpo"     DeepSeekMath eq. 3 as written: mean over each output's tokens, then
                         mean over the outputs. Long outputs weigh less per token.
    loss_type="dr_grpo"  Dr. GRPO ("Understanding R1-Zero-Like Training: A Critical
                         Perspective", Liu et al. 2025): the masked token sum divided by a
                         constant B × T (T the maximum completion length), which removes the
                         length bias of the 1/|o_i| term; pair it with scale="none".
    loss_type="dapo"     DAPO (Yu et al. 2025, eq. 8 "token-level policy gradient loss"):
                         the masked token sum divided by the number of completion tokens in
                         the batch, so every token weighs the same.
    scale="none"         Dr. GRPO: A_i = r_i − mean, no division by the group std (which
                         up-weights questions that are too easy or too hard).
    clip_eps_high        DAPO "clip-higher": an upper bound 1 + ε_high above 1 + ε, which
                         leaves low-probability tokens room to grow (against entropy
                         collapse); None means ε_high = ε (symmetric, as PPO and GRPO).
    beta                 the KL weight β; 0 (as DAPO and Dr. GRPO) needs no reference model.

Std convention: torch.std with Bessel's correction (unbiased, divide by G − 1), plus
eps = 1e-4 in the denominator, as TRL's GRPOTrainer does, so advantages match TRL's for
the same rewards. A group whose rewards are all equal gets advantages 0.

Clip statistics follow TRL: a token is "low-clipped" when ρ < 1 − ε and A < 0, and
"high-clipped" when ρ > 1 + ε_high and A > 0; exactly there the clipped term is the smaller
one inside the min, so the token carries no gradient.

Shapes: B sequences (the N·G completions of N prompts), T token positions; token tensors
are [B, T], `mask` [B, T] is 1 on completion tokens, advantages are [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALES = ("group", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """rewards [N·G], the G completions of each prompt contiguous -> advantages [N·G].

    scale="group": (r − group mean) / (group std + eps), std unbiased as TRL;
    scale="none":  r − group mean (Dr. GRPO)."""
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N*G], got shape {tuple(rewards.shape)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), not {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}: "
                         f"expected N*G rewards with the G completions of each prompt contiguous")
    r_NG = rewards.view(-1, group_size)
    adv_NG = r_NG - r_NG.mean(dim=1, keepdim=True)
    if scale == "group":
        adv_NG = adv_NG / (r_NG.std(dim=1, keepdim=True) + eps)
    return adv_NG.reshape(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token π_ref/π − log(π_ref/π) − 1 (Schulman's k3; DeepSeekMath eq. 4), >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 0.001, loss_type: str = "grpo",
              entropy: torch.Tensor | None = None, max_completion_length: int | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The negated GRPO objective and detached statistics (tensors, no host sync).

    logp, old_logp, ref_logp [B, T]: log-probs of the sampled tokens under the policy (with
    grad), the sampling policy and the reference (ref_logp may be None when beta == 0);
    advantages [B]; mask [B, T] 1 on completion tokens; entropy [B, T] optional, only
    reported. `max_completion_length` is dr_grpo's T (default mask.shape[1]).

    stats: kl (mean over completion tokens, when ref_logp is given), clip_fraction,
    clip_fraction_low, clip_fraction_high, ratio_mean, entropy (when given)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    if beta != 0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0")
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [B, T]")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    B, T = logp.shape
    mask_BT = mask.to(logp.dtype)
    A_B1 = advantages.to(logp.dtype).unsqueeze(1)

    ratio_BT = torch.exp(logp - old_logp)
    unclipped_BT = ratio_BT * A_B1
    clipped_BT = torch.clamp(ratio_BT, 1 - eps_low, 1 + eps_high) * A_B1
    per_token_BT = -torch.min(unclipped_BT, clipped_BT)
    kl_BT = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if beta != 0:
        per_token_BT = per_token_BT + beta * kl_BT

    masked_BT = per_token_BT * mask_BT
    if loss_type == "grpo":
        loss = (masked_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp_min(1)).mean()
    elif loss_type == "dr_grpo":
        loss = masked_BT.sum() / (B * (max_completion_length or T))
    else:
        loss = masked_BT.sum() / mask_BT.sum().clamp_min(1)

    with torch.no_grad():
        n_tokens = mask_BT.sum().clamp_min(1)

        def token_mean(x_BT):
            return (x_BT.to(mask_BT.dtype) * mask_BT).sum() / n_tokens

        low_BT = (ratio_BT < 1 - eps_low) & (A_B1 < 0)
        high_BT = (ratio_BT > 1 + eps_high) & (A_B1 > 0)
        stats = {"clip_fraction": token_mean(low_BT | high_BT),
                 "clip_fraction_low": token_mean(low_BT),
                 "clip_fraction_high": token_mean(high_BT),
                 "ratio_mean": token_mean(ratio_BT.detach())}
        if kl_BT is not None:
            stats["kl"] = token_mean(kl_BT.detach())
        if entropy is not None:
            stats["entropy"] = token_mean(entropy.detach())
    return loss, stats


def sequence_logprobs(model, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                      temperature: float = 1.0, return_entropy: bool = False):
    """Per-token log-probs of `input_ids` under a nanoseek Transformer, at completion positions.

    input_ids [B, L]: each row is its prompt, then its completion, then right padding (the
    model has no attention mask, so padding must come after the tokens that matter).
    completion_mask [B, L]: 1 on the completion tokens of input_ids.
    Returns logp [B, L] with logp[b, t] = log π(input_ids[b, t] | input_ids[b, :t]) where
    completion_mask is 1 and 0 elsewhere (position 0 has no prediction and must not be a
    completion token); with return_entropy, also the entropy [B, L] of the same
    distributions (without grad: it is for the statistics). Logits are divided by `temperature` (the sampling temperature, so that
    ratios are taken against the distribution the rollouts came from)."""
    if input_ids.shape != completion_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must have the same shape [B, L]")
    logits_BLV = model(input_ids).logits[:, :-1].float()  # position t predicts token t+1
    if temperature != 1.0:
        logits_BLV = logits_BLV / temperature
    logz_BL = torch.logsumexp(logits_BLV, dim=-1)
    target_BL = input_ids[:, 1:]
    logp_BL = logits_BLV.gather(-1, target_BL.unsqueeze(-1)).squeeze(-1) - logz_BL
    mask_BL = completion_mask.to(logp_BL.dtype)
    logp_BL = F.pad(logp_BL, (1, 0)) * mask_BL  # re-align: index t is token t
    if not return_entropy:
        return logp_BL
    with torch.no_grad():
        p_BLV = torch.softmax(logits_BLV, dim=-1)
        entropy_BL = logz_BL - (p_BLV * logits_BLV).sum(-1)
    return logp_BL, F.pad(entropy_BL, (1, 0)) * mask_BL
