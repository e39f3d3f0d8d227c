"""Chat prompts as token ids, where only the template makes special tokens.

The model's chat template (the tokenizer's `apply_chat_template`) is rendered with a
placeholder for each message's content; the template's own text is encoded as usual
(`<|User|>`, `<|Assistant|>` … become their special ids) and each content as plain text,
so a message that spells `<|Assistant|>` or `<think>` cannot forge a turn or a tag. Byte-
level BPE never merges across a special token, so the ids are those of encoding the whole
rendered text whenever the content holds no special-token spelling.
"""

from __future__ import annotations

MARK = "\ue000{}\ue001"  # private-use characters: no template or tokenizer gives them meaning
THINK_OPEN = "<think>"


class Markup(str):
    """Template text inside a turn's content (tools.py's tool-call markers): encoded as the
    template's own text, so its special-token spellings become special ids."""


def find_in_order(text: str, marks: list[str]) -> list[int] | None:
    """Where each mark starts, each searched after the last (one pass over the text, where a
    search from the start for each would be quadratic in the number of messages), or None."""
    positions, pos = [], 0
    for mark in marks:
        at = text.find(mark, pos)
        if at < 0:
            return None
        positions.append(at)
        pos = at + len(mark)
    return positions


class ChatEncoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.plain = None
        inner = getattr(tokenizer, "tokenizer", None)  # a ChatTokenizer's tokenizers.Tokenizer
        if inner is not None and hasattr(inner, "to_str"):
            from tokenizers import Tokenizer
            self.plain = Tokenizer.from_str(inner.to_str())
            self.plain.encode_special_tokens = True  # a copy: the shared tokenizer is untouched

    def encode_plain(self, text: str) -> list[int]:
        if self.plain is None:
            return self.tokenizer.encode(text)
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_chat(self, turns: list[dict]) -> list[int]:
        """turns: {"role", "content"}, the content a string or a list of strings and Markup."""
        pieces = [t["content"] if isinstance(t["content"], list) else [t["content"]] for t in turns]
        plain = [p for turn in pieces for p in turn if not isinstance(p, Markup)]
        marks = [MARK.format(i) for i in range(len(plain))]
        unused = iter(marks)
        placeholders = ["".join(p if isinstance(p, Markup) else next(unused) for p in turn) for turn in pieces]
        text = self.tokenizer.apply_chat_template([{**t, "content": c} for t, c in zip(turns, placeholders)],
                                                  add_generation_prompt=True)
        positions = find_in_order(text, marks)
        if positions is None:  # a template that rewrites or reorders content
            whole = [{**t, "content": "".join(p)} for t, p in zip(turns, pieces)]
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(whole, add_generation_prompt=True))
        ids, pos = [], 0
        for content, mark, at in zip(plain, marks, positions):
            ids += self.tokenizer.encode(text[pos:at]) if at > pos else []
            ids += self.encode_plain(content)
            pos = at + len(mark)
        ids += self.tokenizer.encode(text[pos:]) if pos < len(text) else []
        return ids

    def opens_thinking(self, ids: list[int]) -> bool:
        """Whether the prompt ends inside an open <think> (DeepSeek-R1's templates end their
        generation prompt with "<think>\n"): the output then starts with reasoning."""
        return self.tokenizer.decode(ids[-8:]).rstrip().endswith(THINK_OPEN)
