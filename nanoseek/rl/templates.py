"""Prompt templates for RL: DeepSeek-R1-Zero's plain-text template, and the chat template.

`R1_ZERO_TEMPLATE` is Table 1 of the DeepSeek-R1 paper (Guo et al. 2025, "Template for
DeepSeek-R1-Zero"), word for word, with its placeholder `prompt` as `{prompt}`. The table
has a full stop after the placeholder ("User: prompt. Assistant:"), kept here, so a
question ending in "?" reads "?.": that is the paper's template, not a typo of ours. It is
meant for a base model trained with RL from scratch (R1-Zero); the completion continues
after "Assistant:" and `rewards.format_reward` checks the structure it asks for.

`chat_prompt` renders a question with the tokenizer's chat template (DeepSeek-R1's
<|User|>...<|Assistant|>, nanoseek.data.tokenizer) for a model that had SFT in that format
(the R1 recipe's cold start); `think=True` opens the reasoning with "<think>\\n", as the
DeepSeek-R1 model card recommends to keep the model from skipping it.
"""

from __future__ import annotations

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero template (R1 paper, Table 1) with the question in place of `prompt`."""
    return R1_ZERO_TEMPLATE.format(prompt=question)


def chat_prompt(tokenizer, question: str, system: str | None = None, think: bool = False) -> str:
    """The question as one user turn in the tokenizer's chat template, ending with the
    generation prompt (and "<think>\\n" when `think`). `tokenizer` is a ChatTokenizer or
    anything with `apply_chat_template(messages, add_generation_prompt=True)` that returns
    text."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return text + "<think>\n" if think else text


def render_prompt(tokenizer, prompt, prompt_format: str = "chat") -> str:
    """A dataset's prompt as the text the model continues. `prompt` is a question string or,
    as in TRL's conversational datasets, a list of {"role", "content"} messages.
    prompt_format: "r1_zero" (bos + the R1-Zero template; string prompts only), "chat" (the
    chat template with the generation prompt) or "chat_think" (that, opening "<think>\\n")."""
    if isinstance(prompt, str):
        if prompt_format == "r1_zero":
            return tokenizer.bos + r1_zero_prompt(prompt)
        return chat_prompt(tokenizer, prompt, think=prompt_format == "chat_think")
    if prompt_format == "r1_zero":
        raise ValueError("the r1_zero template takes a question string, not chat messages; "
                         "use prompt_format=chat")
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
    return text + "<think>\n" if prompt_format == "chat_think" else text
