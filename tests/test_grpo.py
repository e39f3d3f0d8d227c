"""GRPO maths against hand-worked numbers (nanoseek/rl/grpo.py)."""

import math

import pytest
import torch

from nanoseek import Transformer, preset
from nanoseek.rl.grpo import group_advantages, grpo_loss, kl_k3, sequence_logprobs

# ---------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    r = torch.tensor([1., 0., 0., 1.,  1., 1., 1., 1.,  0., 0., 0., 1.])
    # group 1: mean .5, unbiased std sqrt(4 * .25 / 3) = sqrt(1/3); group 2: all equal -> 0;
    # group 3: mean .25, unbiased var (3 * .0625 + .5625) / 3 = .25 -> std .5
    s1, s3 = math.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    want = [.5 / s1, -.5 / s1, -.5 / s1, .5 / s1, 0, 0, 0, 0,
            -.25 / s3, -.25 / s3, -.25 / s3, .75 / s3]
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor(want))
    want_none = [.5, -.5, -.5, .5, 0, 0, 0, 0, -.25, -.25, -.25, .75]
    torch.testing.assert_close(group_advantages(r, 4, scale="none"), torch.tensor(want_none))
    # TRL's convention: torch.std unbiased, eps added to the std
    torch.testing.assert_close(group_advantages(r[:4], 4, eps=0.0),
                               (r[:4] - r[:4].mean()) / r[:4].std(unbiased=True))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="batch")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)


# ---------------------------------------------------------------- the loss
# B=2, T=3. Ratios ρ = exp(logp - old_logp) chosen directly; ε = 0.2.
# row 0: ρ = [1.0, 1.5, 0.5], A = +1,   mask [1, 1, 1]
#   -min(ρA, clip(ρ)A) = [-1, -min(1.5, 1.2), -min(0.5, 0.8)] = [-1, -1.2, -0.5]   sum -2.7
#   (ρ = 1.5 > 1.2 with A > 0: the clipped term is active: high-clipped)
# row 1: ρ = [1.0, 0.5, 2.0], A = -0.5, mask [1, 1, 0]
#   [-min(-.5, -.5), -min(-.25, -.4), (masked) -min(-1, -.6)] = [.5, .4, (1.0)]    sum 0.9
#   (ρ = 0.5 < 0.8 with A < 0: low-clipped; ρ = 2 with A < 0 is unclipped, and masked)
RATIO = torch.tensor([[1.0, 1.5, 0.5], [1.0, 0.5, 2.0]])
ADV = torch.tensor([1.0, -0.5])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _inputs():
    old_logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]])
    logp = (old_logp + RATIO.log()).requires_grad_()
    return logp, old_logp


@pytest.mark.parametrize("loss_type, want", [
    ("grpo", (-2.7 / 3 + 0.9 / 2) / 2),  # per-sequence means, then the mean: -0.225
    ("dr_grpo", (-2.7 + 0.9) / (2 * 3)),  # masked sum / (B * T): -0.3
    ("dapo", (-2.7 + 0.9) / 5),  # masked sum / completion tokens: -0.36
])
def test_loss_by_hand(loss_type, want):
    logp, old_logp = _inputs()
    loss, stats = grpo_loss(logp, old_logp, None, ADV, MASK, clip_eps=0.2, beta=0.0,
                            loss_type=loss_type)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert stats["clip_fraction_low"].item() == pytest.approx(1 / 5)
    assert stats["clip_fraction_high"].item() == pytest.approx(1 / 5)
    assert stats["ratio_mean"].item() == pytest.approx((1 + 1.5 + .5 + 1 + .5) / 5)
    assert "kl" not in stats and "entropy" not in stats


def test_dr_grpo_constant_is_the_max_completion_length():
    logp, old_logp = _inputs()
    loss, _ = grpo_loss(logp, old_logp, None, ADV, MASK, beta=0.0, loss_type="dr_grpo",
                        max_completion_length=9)
    assert loss.item() == pytest.approx(-1.8 / (2 * 9))


def test_clipping_gradients_both_sides():
    """Clipped tokens (ρ > 1+ε with A > 0, ρ < 1-ε with A < 0) get no gradient; the others
    get d(-ρA)/dlogp = -ρA, divided by the 5 tokens (dapo); masked tokens get none."""
    logp, old_logp = _inputs()
    loss, _ = grpo_loss(logp, old_logp, None, ADV, MASK, clip_eps=0.2, beta=0.0, loss_type="dapo")
    loss.backward()
    want = torch.tensor([[-1.0 * 1, 0.0, -0.5 * 1], [-1.0 * -0.5, 0.0, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, want)


def test_clip_higher():
    """ε_high = 0.6: ρ = 1.5 with A > 0 is inside [0.8, 1.6], no longer clipped (DAPO)."""
    logp, old_logp = _inputs()
    loss, stats = grpo_loss(logp, old_logp, None, ADV, MASK, clip_eps=0.2, clip_eps_high=0.6,
                            beta=0.0, loss_type="dapo")
    assert loss.item() == pytest.approx((-1 - 1.5 - 0.5 + 0.9) / 5)
    assert stats["clip_fraction_high"].item() == 0.0
    assert stats["clip_fraction_low"].item() == pytest.approx(1 / 5)  # the low side stays at ε
    loss.backward()
    assert logp.grad[0, 1].item() == pytest.approx(-1.5 / 5)


def test_kl_estimator_values():
    logp = torch.zeros(3)
    ref = torch.log(torch.tensor([2.0, 0.5, 1.0]))  # π_ref/π = 2, 0.5, 1
    want = torch.tensor([2 - math.log(2) - 1, 0.5 + math.log(2) - 1, 0.0])
    torch.testing.assert_close(kl_k3(logp, ref), want)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_loss_with_kl_term():
    logp, old_logp = _inputs()
    # π_ref/π = 2 at (0, 1) and 0.5 at (1, 0): k3 = (1 - ln 2) + (ln 2 - 0.5) = 0.5 in all;
    # the masked (1, 2) has ratio 3 and must not count
    ref_logp = logp.detach() + torch.log(torch.tensor([[1.0, 2.0, 1.0], [0.5, 1.0, 3.0]]))
    loss, stats = grpo_loss(logp, old_logp, ref_logp, ADV, MASK, beta=0.1, loss_type="dapo")
    assert loss.item() == pytest.approx((-1.8 + 0.1 * 0.5) / 5, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.5 / 5, abs=1e-6)
    loss, _ = grpo_loss(logp, old_logp, ref_logp, ADV, MASK, beta=0.1, loss_type="grpo")
    row0 = (-2.7 + 0.1 * (1 - math.log(2))) / 3
    row1 = (0.9 + 0.1 * (math.log(2) - 0.5)) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old_logp, None, ADV, MASK, beta=0.1)


def test_on_policy_gradient_is_the_policy_gradient():
    """μ = 1 (old = current): the loss value is -mean(A) and the gradient is -A/N per token."""
    logp = torch.randn(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, logp.detach(), None, ADV, MASK, beta=0.0, loss_type="dapo")
    assert stats["clip_fraction"].item() == 0.0 and stats["ratio_mean"].item() == 1.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -ADV[:, None] * MASK / 5)


def test_entropy_stat_and_shape_errors():
    logp, old_logp = _inputs()
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    _, stats = grpo_loss(logp, old_logp, None, ADV, MASK, beta=0.0, entropy=entropy)
    assert stats["entropy"].item() == pytest.approx(15 / 5)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old_logp, None, ADV, MASK, beta=0.0, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old_logp, None, ADV[:1], MASK, beta=0.0)


# ---------------------------------------------------------------- log-probs from the model
def test_sequence_logprobs_matches_manual_gather():
    model = Transformer(preset("tiny")).eval()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, 4:] = 1  # prompt of 4, completion of 6
    mask[1, 3:8] = 1  # prompt of 3, completion of 5, then 2 padding tokens
    logp, entropy = sequence_logprobs(model, ids, mask, return_entropy=True)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
    for b in range(2):
        for t in range(10):
            want = logprobs[b, t - 1, ids[b, t]].item() if mask[b, t] else 0.0
            assert logp[b, t].item() == pytest.approx(want, abs=1e-5)
            want_h = -(logprobs[b, t - 1].exp() * logprobs[b, t - 1]).sum().item() if mask[b, t] else 0.0
            assert entropy[b, t].item() == pytest.approx(want_h, abs=1e-4)
    logp.sum().backward()  # differentiable for the policy update
    assert model.lm_head.weight.grad is not None
    cold = sequence_logprobs(model, ids, mask, temperature=0.5)
    with torch.no_grad():
        want = torch.log_softmax(model(ids).logits.float() / 0.5, dim=-1)[0, 3, ids[0, 4]]
    assert cold[0, 4].item() == pytest.approx(want.item(), abs=1e-5)
