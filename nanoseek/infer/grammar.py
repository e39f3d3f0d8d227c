"""Grammar-constrained decoding: a request's output must match a grammar (JSON schema, Lark).

The library is llguidance (the Rust core of Microsoft's guidance, also a vLLM and SGLang
backend), chosen over xgrammar and outlines-core because its wheel is one abi3 binary with
no dependencies at all (xgrammar pulls in transformers, triton and apache-tvm-ffi), it
builds its token trie straight from a `tokenizers` tokenizer.json (nanoseek's byte-level BPE
or an official DeepSeek one, special tokens included), it compiles JSON schemas lazily
(no up-front automaton per schema: milliseconds for a request's schema), and its Lark
grammars can embed a JSON schema (`%json{...}`) next to special tokens by id (`<[id]>`),
which is what forcing DeepSeek's tool-call format needs.

How it runs: llguidance computes a request's allowed tokens on the host, one bitmask per
step (bit v % 32 of int32 word v // 32), from the tokens it has consumed; the engine fills
the masks of a step's grammar rows into one host tensor, uploads it with the step's other
inputs and applies it on the device (`sampling.process_logits`), and the sampled tokens are
consumed when they come back. So a grammar row costs one mask computation (tens of
microseconds) per token and its batch steps one token per read-back: the next mask needs
the token just chosen, a host round trip the library's design has in every engine.
"""

from __future__ import annotations

from functools import cached_property

import torch


# JSON as json.dumps writes it, without free whitespace: a model cannot fill its budget with blanks
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict | None) -> str:
    """A grammar for JSON matching `schema` (None: any JSON object, OpenAI's json_object)."""
    import llguidance
    return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                         overrides=JSON_FORMAT)


def lark_grammar(lark: str) -> str:
    import llguidance
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """The engine's llguidance tokenizer (built once: ~a second for a 128k vocabulary) and
    the matchers of its requests."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int | None):
        inner = getattr(tokenizer, "tokenizer", tokenizer)  # a ChatTokenizer's tokenizers.Tokenizer
        if not hasattr(inner, "to_str"):
            raise ValueError("grammar-constrained decoding needs a `tokenizers` tokenizer (tokenizer.json)")
        self._json, self.vocab_size, self.eos_id = inner.to_str(), vocab_size, eos_id

    @cached_property
    def lltokenizer(self):
        import llguidance
        return llguidance.LLTokenizer(self._json, n_vocab=self.vocab_size, eos_token=self.eos_id)

    def check(self, grammar: str) -> None:
        """ValueError naming what is wrong with a grammar (a schema it cannot compile)."""
        import llguidance
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"the grammar does not compile: {error}")

    def matcher(self, grammar: str) -> GrammarMatcher:
        import llguidance
        m = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"the grammar does not compile: {m.get_error()}")
        return GrammarMatcher(m)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self.matcher = matcher

    def fill(self, bitmask_BW: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a host int32 bitmask (what
        llguidance.torch's helper does, without importing its torch.compile'd kernels)."""
        assert bitmask_BW.dtype == torch.int32 and bitmask_BW.is_cpu and bitmask_BW.is_contiguous()
        words = bitmask_BW[row]
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def consume(self, tokens: list[int]) -> None:
        for token in tokens:
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"the grammar rejected token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


def bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask with every token allowed (rows without a grammar stay so)."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)
