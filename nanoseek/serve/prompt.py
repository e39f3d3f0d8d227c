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
        marks = [MARK.format(i) for i in range(len(turns))]
        text = self.tokenizer.apply_chat_template([{**t, "content": m} for t, m in zip(turns, marks)],
                                                  add_generation_prompt=True)
        positions = find_in_order(text, marks)
        if positions is None:  # a template that rewrites or reorders content
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(turns, add_generation_prompt=True))
        ids, pos = [], 0
        for turn, mark, at in zip(turns, marks, positions):
            ids += self.tokenizer.encode(text[pos:at]) if at > pos else []
            ids += self.encode_plain(turn["content"])
            pos = at + len(mark)
        ids += self.tokenizer.encode(text[pos:]) if pos < len(text) else []
        return ids
