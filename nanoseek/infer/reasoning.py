"""Split R1-style output into its reasoning (`<think>…</think>`) and its answer, as it streams.

A tag may arrive cut over two chunks, so a tail that could be the start of the tag being
looked for is held back until the next chunk (or `flush()`) decides it. A prompt that
already opened the reasoning (DeepSeek-R1's generation prompt ends with "<think>\n") starts
the splitter `thinking`. The newlines R1 writes right after a tag ("</think>\n\n") belong
to neither part.
"""

from __future__ import annotations


class ReasoningSplitter:
    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>", thinking: bool = False):
        self.open_tag, self.close_tag = open_tag, close_tag
        self.thinking = thinking
        self.pending = ""
        self.reasoning, self.answer = "", ""
        self.after_tag = thinking  # newlines here are the tag's, not the text's

    def feed(self, text: str) -> list[tuple[str, str]]:
        """("reasoning" | "answer", text) pieces that are now certain, in order."""
        self.pending += text
        pieces = []
        while True:
            tag = self.close_tag if self.thinking else self.open_tag
            i = self.pending.find(tag)
            if i < 0:
                keep = next((k for k in range(min(len(tag) - 1, len(self.pending)), 0, -1)
                             if self.pending.endswith(tag[:k])), 0)
                self._emit(pieces, self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                return pieces
            self._emit(pieces, self.pending[:i])
            self.pending = self.pending[i + len(tag):]
            self.thinking, self.after_tag = not self.thinking, True

    def flush(self) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        self._emit(pieces, self.pending)
        self.pending = ""
        return pieces

    def _emit(self, pieces: list, text: str) -> None:
        if self.after_tag:
            text = text.lstrip("\n")
            self.after_tag = not text
        if not text:
            return
        part = "reasoning" if self.thinking else "answer"
        if part == "reasoning":
            self.reasoning += text
        else:
            self.answer += text
        pieces.append((part, text))
