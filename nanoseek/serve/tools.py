"""Tool calls in DeepSeek-V3's chat format: tools into the prompt, forced calls, calls out of the text.

DeepSeek-V3's (and R1's) chat template writes an assistant's calls and the tools' answers as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>              (then "\n<｜tool▁call▁begin｜>…" per further call)
    <｜tool▁calls▁end｜>
    <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>…<｜tool▁outputs▁end｜>

(lines broken here only). Its template renders no tool definitions; they go at the end of
the system prompt as DeepSeek-V3.1's template puts them ("## Tools", then per tool its name,
description and parameter schema). The markers are template text (special tokens where the
tokenizer has them); names, arguments, results and schemas are encoded as plain text
(prompt.Markup), so a message cannot forge a call. With nanoseek's template a tool's answer
is a turn of its own rendered as is (a system turn: the template writes its content at its
place), where DeepSeek's template appends it without a role.

A forced call (`tool_choice` "required" or a named function) is a grammar (llguidance's
Lark with each function's parameters as an embedded JSON schema): the output is one call (or
several, with parallel_tool_calls) and then EOS. Under "auto" the model may call or answer;
either way the calls found in the output come back as `tool_calls`, the text before them as
content.
"""

from __future__ import annotations

import json
import re
import uuid

from .prompt import Markup

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
CALL = re.compile(re.escape(CALL_BEGIN) + r"(?P<type>[^\n]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*)\n```json\n"
                  r"(?P<arguments>.*?)\n```" + re.escape(CALL_END), re.S)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


# ------------------------------------------------------------ the prompt
def call_pieces(calls) -> list:
    """An assistant's earlier calls (protocol.ToolCall) in the template's format."""
    out = [Markup(CALLS_BEGIN)]
    for i, call in enumerate(calls):
        out += [Markup(("\n" if i else "") + CALL_BEGIN + call.type + SEP), call.function.name,
                Markup("\n```json\n"), call.function.arguments, Markup("\n```" + CALL_END)]
    return out + [Markup(CALLS_END)]


def tools_pieces(tools) -> list:
    """The tool definitions for the system prompt (DeepSeek-V3.1's wording)."""
    out = [Markup("\n\n## Tools\nYou have access to the following tools:\n")]
    for tool in tools:
        f = tool.function
        out += [Markup("\n### "), f.name, Markup("\nDescription: "), f.description or "",
                Markup("\n\nParameters: "), json.dumps(f.parameters or NO_PARAMETERS, ensure_ascii=False),
                Markup("\n")]
    return out


def template_turns(messages, tools=None) -> list[dict]:
    """Chat messages (protocol.ChatMessage) as turns of the tokenizer's template (prompt.py):
    tool calls and tool answers in DeepSeek's format, the tools after the leading system turns."""
    turns: list[dict] = []
    for m in messages:
        if m.role == "tool":
            if turns and turns[-1].get("tool_outputs"):  # answers to one round of calls go together
                turns[-1]["content"][-1:] = [Markup("\n" + OUTPUT_BEGIN), m.text, Markup(OUTPUT_END + OUTPUTS_END)]
            else:
                turns.append({"role": "system", "tool_outputs": True,
                              "content": [Markup(OUTPUTS_BEGIN + OUTPUT_BEGIN), m.text,
                                          Markup(OUTPUT_END + OUTPUTS_END)]})
        elif m.role == "assistant" and m.tool_calls:
            turns.append({"role": "assistant", "content": [m.text, *call_pieces(m.tool_calls)]})
        else:
            turns.append(m.as_template_turn())
    for t in turns:
        t.pop("tool_outputs", None)
    if tools:
        first = next((i for i, t in enumerate(turns) if t["role"] != "system"), len(turns))
        turns.insert(first, {"role": "system", "content": tools_pieces(tools)})
    return turns


# ------------------------------------------------------------ forcing a call
def _marker(text: str, tokenizer) -> str:
    """A marker in llguidance's Lark: the special token by id where the tokenizer has it as
    one token, else its text."""
    inner = getattr(tokenizer, "tokenizer", None)
    token_id = inner.token_to_id(text) if inner is not None else None
    return f"<[{token_id}]>" if token_id is not None else json.dumps(text, ensure_ascii=False)


def forced_call_grammar(tools, name: str | None, parallel: bool, tokenizer) -> str:
    """A grammar for one call of `name` (None: of any tool; several with `parallel`), in
    DeepSeek's format, each function's arguments following its parameter schema."""
    from ..infer.grammar import JSON_FORMAT, lark_grammar
    m = {t: _marker(t, tokenizer) for t in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)}
    chosen = [t.function for t in tools if name is None or t.function.name == name]
    rules = []
    for i, f in enumerate(chosen):
        schema = {**(f.parameters or NO_PARAMETERS), "x-guidance": JSON_FORMAT}
        rules.append(f"fn{i}: {json.dumps(f.name)} \"\\n```json\\n\" args{i} \"\\n```\" {m[CALL_END]}\n"
                     f"args{i}: %json {json.dumps(schema)}")
    calls = "call (\"\\n\" call)*" if parallel and name is None else "call"
    lark = (f"start: {m[CALLS_BEGIN]} {calls} {m[CALLS_END]}\n"
            f"call: {m[CALL_BEGIN]} \"function\" {m[SEP]} ({' | '.join(f'fn{i}' for i in range(len(chosen)))})\n"
            + "\n".join(rules) + "\n")
    return lark_grammar(lark)


# ------------------------------------------------------------ reading calls
def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, OpenAI tool_calls) of an answer: the text before the calls, and each call."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return text, []
    calls = [tool_call(m["name"].strip(), m["arguments"].strip(), i)
             for i, m in enumerate(CALL.finditer(text, start))]
    if not calls:  # an unfinished or malformed section stays text
        return text, []
    return text[:start], calls


def tool_call(name: str, arguments: str, index: int) -> dict:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ToolCallStreamer:
    """An answer's stream split into content and tool calls: text that could begin the calls'
    section is held back; each call goes out once its end marker has arrived."""

    def __init__(self):
        self.pending, self.in_calls, self.calls = "", False, 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        if not self.in_calls:
            start = self.pending.find(CALLS_BEGIN)
            if start < 0:
                keep = next((k for k in range(min(len(CALLS_BEGIN) - 1, len(self.pending)), 0, -1)
                             if self.pending.endswith(CALLS_BEGIN[:k])), 0)
                content, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                return content, []
            content, self.pending, self.in_calls = self.pending[:start], self.pending[start:], True
        else:
            content = ""
        calls, end = [], 0
        for m in CALL.finditer(self.pending):
            calls.append(tool_call(m["name"].strip(), m["arguments"].strip(), self.calls))
            self.calls, end = self.calls + 1, m.end()
        self.pending = self.pending[end:]
        return content, calls

    def flush(self) -> str:
        """What is left: text that never became a call (shown as content)."""
        rest = "" if self.in_calls and self.pending.strip() in ("", CALLS_END) else self.pending
        self.pending = ""
        return rest
