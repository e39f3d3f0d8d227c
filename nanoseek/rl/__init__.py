"""Reinforcement learning: GRPO (grpo.py), rule-based rewards (rewards.py) with a sandbox
for code (sandbox.py), and prompt templates (templates.py)."""

from .grpo import group_advantages, grpo_loss, kl_k3, sequence_logprobs
from .rewards import (accuracy_reward, code_reward, combine_rewards, format_reward, get_reward,
                      language_consistency_reward, math_reward)
from .templates import R1_ZERO_TEMPLATE, chat_prompt, r1_zero_prompt

__all__ = ["group_advantages", "grpo_loss", "kl_k3", "sequence_logprobs", "accuracy_reward",
           "code_reward", "combine_rewards", "format_reward", "get_reward",
           "language_consistency_reward", "math_reward", "R1_ZERO_TEMPLATE", "chat_prompt",
           "r1_zero_prompt"]
