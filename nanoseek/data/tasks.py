"""Built-in verifiable reasoning tasks: generated problems, worked solutions, exact checkers.

Two tasks, each with difficulty levels 1..5 (see the `LEVELS` notes on each class):

    arithmetic   "What is 47 + 85?"  solved column by column (carries, borrows) or with
                 partial products; level 5 is a multi-operation expression.
    countdown    "Using the numbers 3, 25, 4, make 97."  Every instance is built from a
                 random expression over the numbers, so it is always solvable.

Splits. Each problem has a canonical key (the expression; the sorted numbers and the
target). A stable hash of the key puts one problem in ten in "test", the rest in "train";
`generate` draws problems and keeps those of the requested split. So no test problem can
appear in training data, whatever the seeds, levels or counts asked for. Within one call
problems are drawn independently (a small level may repeat one) unless `unique=True`.

Answer extraction, the rule every checker uses (`extract_answer`):
    1. the content of the last <answer>...</answer> in the completion;
    2. else the content of the last \\boxed{...};
    3. else the task's fallback: the last integer (arithmetic), or the expression on the
       last line that holds one (countdown).
Arithmetic then compares integers exactly ("1,234" and "−5" are read as 1234 and -5).
Countdown accepts one expression ("25 × 4 − 3", optionally "= 97") or a list of steps
("25 × 4 = 100" / "100 − 3 = 97"), parsed with `ast` against a whitelist of nodes; the
numbers used must come from the given ones (each at most once; a step's result may be
used by later steps), division must be exact, claimed step results must be right, and the
final value must equal the target.

Text uses the symbols + − × ÷ for operators and ASCII "-" for negative numbers; the
checkers also accept * x / - for the operators.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field

SPLITS = ("train", "test")
TEST_EVERY = 10  # one problem in TEST_EVERY (by hash of its key) belongs to the test split

ADD, SUB, MUL, DIV = "+", "−", "×", "÷"
PRECEDENCE = {ADD: 1, SUB: 1, MUL: 2, DIV: 2}
PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]


@dataclass
class Example:
    prompt: str  # the question
    solution: str  # worked reasoning, short lines ending with the answer
    answer: str  # canonical answer string
    meta: dict = field(default_factory=dict)  # task, level and what the checker needs


def split_of(key: str) -> str:
    """'test' for one key in TEST_EVERY, else 'train'; stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if h % TEST_EVERY == 0 else "train"


# ------------------------------------------------------------------ answer extraction
def extract_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer>, else of the last \\boxed{...}, else None."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if tagged:
        return tagged[-1].strip()
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    return None


def _normalize_ops(s: str) -> str:
    return (s.replace("×", "*").replace("÷", "/").replace("−", "-").replace("–", "-")
            .replace("\u2009", "").replace("\u00a0", " "))


def _as_int(s: str) -> int | None:
    s = _normalize_ops(s).replace(",", "").replace(" ", "").rstrip(".")
    if "=" in s:  # "47 + 85 = 132": the value after the last '='
        s = s.rsplit("=", 1)[1]
    return int(s) if re.fullmatch(r"[-+]?\d+", s) else None


# ------------------------------------------------------------------ expression trees
# A node is an int (a leaf) or a tuple (op, left, right).

def _apply(op: str, x: int, y: int) -> int:
    if op == ADD:
        return x + y
    if op == SUB:
        return x - y
    return x * y if op == MUL else x // y


def evaluate(node) -> int:
    return node if isinstance(node, int) else _apply(node[0], evaluate(node[1]), evaluate(node[2]))


def render(node) -> str:
    """Infix text that parses back (left-associative, × ÷ before + −) to the same tree:
    '(a + b) × c', 'a − (b − c)', 'a + (b + c)'; so the text shows the solved order."""
    if isinstance(node, int):
        return str(node)
    op, a, b = node
    left, right = render(a), render(b)
    if not isinstance(a, int) and PRECEDENCE[a[0]] < PRECEDENCE[op]:
        left = f"({left})"
    if not isinstance(b, int) and PRECEDENCE[b[0]] <= PRECEDENCE[op]:
        right = f"({right})"
    return f"{left} {op} {right}"


# ------------------------------------------------------------------ task interface
class Task:
    """A family of generated problems with worked solutions and an exact checker."""

    name: str = ""
    levels: tuple[int, ...] = ()

    def sample(self, rng: random.Random, level: int):
        """One random problem at `level` (task-specific form)."""
        raise NotImplementedError

    def key(self, problem) -> str:
        """Canonical string of a problem; its hash decides the split."""
        raise NotImplementedError

    def example(self, problem, level: int) -> Example:
        raise NotImplementedError

    def check(self, example_or_meta: Example | dict, completion: str) -> bool:
        raise NotImplementedError

    def generate(self, n: int, level: int = 1, split: str = "train", seed: int = 0,
                 unique: bool = False) -> list[Example]:
        """n examples of `split` at `level`; the same arguments give the same examples."""
        if level not in self.levels:
            raise ValueError(f"task '{self.name}' has levels {self.levels[0]}..{self.levels[-1]}, "
                             f"not {level!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        rng = random.Random(f"{self.name}:{split}:{level}:{seed}")  # str seeds are stable
        out, seen, misses = [], set(), 0
        while len(out) < n:
            problem = self.sample(rng, level)
            k = self.key(problem)
            if split_of(k) != split or (unique and k in seen):
                misses += 1  # in a row: a long run means the split's problems are used up
                if misses > 20000:
                    raise ValueError(f"task '{self.name}' level {level} has too few distinct "
                                     f"{split} problems for n={n}")
                continue
            seen.add(k)
            misses = 0
            out.append(self.example(problem, level))
        return out


def _meta(example_or_meta: Example | dict) -> dict:
    return example_or_meta.meta if isinstance(example_or_meta, Example) else example_or_meta


# ------------------------------------------------------------------ arithmetic
def _place(i: int) -> str:
    return PLACES[i] if i < len(PLACES) else f"10^{i}"


def _digits(x: int) -> list[int]:
    """Least significant first."""
    return [int(c) for c in reversed(str(x))]


def _add_lines(a: int, b: int) -> list[str]:
    """Column addition with carries, a, b >= 0."""
    lines, carry = [], 0
    da, db = _digits(a), _digits(b)
    if a >= 10 or b >= 10:
        for i in range(max(len(da), len(db))):
            x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
            s = x + y + carry
            lines.append(f"{_place(i)}: {x} + {y}{' + 1' if carry else ''} = {s}, write {s % 10}"
                         + (", carry 1" if s >= 10 else ""))
            carry = s // 10
        if carry:
            lines.append(f"{_place(max(len(da), len(db)))}: carry 1, write 1")
    return lines + [f"{a} {ADD} {b} = {a + b}"]


def _sub_lines(a: int, b: int) -> list[str]:
    """Column subtraction with borrows; a < b is done as -(b - a)."""
    if a < b:
        return ([f"{a} {SUB} {b} is negative: compute {b} {SUB} {a} and change the sign"]
                + _sub_lines(b, a) + [f"{a} {SUB} {b} = {a - b}"])
    lines, borrow = [], 0
    da, db = _digits(a), _digits(b)
    if a >= 10:
        for i in range(len(da)):
            x, y = da[i], (db[i] if i < len(db) else 0)
            borrow_in = borrow
            borrow = int(x - borrow_in < y)
            top = x - borrow_in + 10 * borrow
            lines.append(f"{_place(i)}: {x}{f' {SUB} 1' if borrow_in else ''}"
                         f"{' + 10' if borrow else ''} {SUB} {y} = {top - y}"
                         + (", borrow 1" if borrow else ""))
    return lines + [f"{a} {SUB} {b} = {a - b}"]


def _mul_lines(a: int, b: int) -> list[str]:
    """Partial products over the digits of the shorter factor, then their sum."""
    long_, short = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
    partials = [(d * 10 ** i) for i, d in enumerate(_digits(short)) if d]
    lines = []
    if len(partials) > 1:
        lines = [f"{long_} {MUL} {p} = {long_ * p}" for p in partials]
        lines.append(" + ".join(str(long_ * p) for p in partials) + f" = {a * b}")
    return lines + [f"{a} {MUL} {b} = {a * b}"]


class Arithmetic(Task):
    """Integer arithmetic with worked column methods.

    LEVELS  1: a ± b, 0..99        2: a ± b, 10..999         3: a × b, 10..99
            4: a ± b with 100..9999 (results may be negative), or 100..9999 × 10..999
            5: an expression of 3-4 numbers 1..99 with + − × and parentheses; every
               intermediate result >= 0; solved one operation at a time
    """

    name = "arithmetic"
    levels = (1, 2, 3, 4, 5)

    def sample(self, rng: random.Random, level: int):
        if level in (1, 2):
            lo, hi = (0, 99) if level == 1 else (10, 999)
            a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice([ADD, SUB])
            return (op, max(a, b), min(a, b)) if op == SUB else (op, a, b)
        if level == 3:
            return (MUL, rng.randint(10, 99), rng.randint(10, 99))
        if level == 4:
            op = rng.choice([ADD, SUB, MUL])
            if op == MUL:
                return (op, rng.randint(100, 9999), rng.randint(10, 999))
            return (op, rng.randint(100, 9999), rng.randint(100, 9999))
        items = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
        while len(items) > 1:  # join neighbours so that the leaf order stays as drawn
            i = rng.randrange(len(items) - 1)
            a, b, op = items[i], items[i + 1], rng.choice([ADD, SUB, MUL])
            if op == SUB and evaluate(a) < evaluate(b):
                op = ADD
            items[i:i + 2] = [(op, a, b)]
        return items[0]

    def key(self, problem) -> str:
        return "arithmetic:" + _normalize_ops(render(problem)).replace(" ", "")

    def example(self, problem, level: int) -> Example:
        lines: list[str] = []
        self._solve(problem, lines)
        value = evaluate(problem)
        if not isinstance(problem[1], int) or not isinstance(problem[2], int):
            lines.append(f"{render(problem)} = {value}")
        expression = render(problem)
        return Example(prompt=f"What is {expression}?", solution="\n".join(lines),
                       answer=str(value),
                       meta={"task": self.name, "level": level, "expression": expression,
                             "value": value})

    def _solve(self, node, lines: list[str]) -> int:
        if isinstance(node, int):
            return node
        op, a, b = node
        x, y = self._solve(a, lines), self._solve(b, lines)
        lines += {ADD: _add_lines, SUB: _sub_lines, MUL: _mul_lines}[op](x, y)
        return _apply(op, x, y)

    def check(self, example_or_meta: Example | dict, completion: str) -> bool:
        answer = extract_answer(completion)
        if answer is None:  # fallback: the last integer in the text
            found = re.findall(r"[-−]?\d+(?:,\d{3})*", completion)
            answer = found[-1] if found else None
        value = _as_int(answer) if answer is not None else None
        return value is not None and value == _meta(example_or_meta)["value"]


# ------------------------------------------------------------------ countdown
_ALLOWED_OPS = {ast.Add: ADD, ast.Sub: SUB, ast.Mult: MUL, ast.Div: DIV}


class _Invalid(Exception):
    pass


def _eval_step(node: ast.AST, pool: Counter) -> int:
    """Exact value of a whitelisted expression; each literal is taken out of `pool`."""
    if isinstance(node, ast.Expression):
        return _eval_step(node.body, pool)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if pool[node.value] <= 0:
            raise _Invalid(f"{node.value} is not available")
        pool[node.value] -= 1
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_OPS:
        x, y = _eval_step(node.left, pool), _eval_step(node.right, pool)
        if isinstance(node.op, ast.Div) and (y == 0 or x % y):
            raise _Invalid("inexact division")
        return _apply(_ALLOWED_OPS[type(node.op)], x, y)
    raise _Invalid(f"{type(node).__name__} is not allowed")


def verify_countdown(candidate: str, numbers: list[int], target: int) -> bool:
    """True if `candidate` (an expression, or steps 'a op b = c' one per line) reaches
    `target` using each of `numbers` at most once, with exact division only."""
    s = _normalize_ops(candidate).strip()
    if len(s) > 1000 or not re.fullmatch(r"[0-9+\-*/()=\s]+", s):
        return False
    pool, value = Counter(numbers), None
    try:
        for line in filter(None, (ln.strip() for ln in s.splitlines())):
            lhs, *rhs = line.split("=")
            if len(rhs) > 1:
                return False
            value = _eval_step(ast.parse(lhs.strip(), mode="eval"), pool)
            if rhs and _as_int(rhs[0]) != value:
                return False  # a claimed step result that is wrong
            pool[value] += 1  # later steps may use it
    except (SyntaxError, ValueError, RecursionError, _Invalid):
        return False
    return value is not None and value == target


def _last_expression(text: str) -> str | None:
    """The run of expression characters on the last line that has a digit."""
    for line in reversed(_normalize_ops(text).splitlines()):
        runs = [r for r in re.findall(r"[0-9+\-*/()= \t]+", line) if re.search(r"\d", r)]
        if runs:
            return runs[-1].strip()
    return None


class Countdown(Task):
    """Reach a target from given numbers with + − × ÷, each number at most once.

    LEVELS  1: 3 numbers 1..20, all used, target 2..200
            2: 4 numbers 1..15, 3-4 used, target 10..200
            3: 4 numbers 1..25, all used, target 10..500
            4: 5 numbers (4 of 1..10, 1 of 25 50 75 100), 4-5 used, target 100..999
            5: 6 numbers (4 of 1..10, 2 of 25 50 75 100), 4-6 used, target 100..999
    Every intermediate value of the built solution is a positive integer.
    """

    name = "countdown"
    levels = (1, 2, 3, 4, 5)
    LARGE = (25, 50, 75, 100)

    def _numbers(self, rng: random.Random, level: int) -> tuple[list[int], int, int, int]:
        """(numbers, fewest used, lowest target, highest target)"""
        if level == 1:
            return [rng.randint(1, 20) for _ in range(3)], 3, 2, 200
        if level == 2:
            return [rng.randint(1, 15) for _ in range(4)], 3, 10, 200
        if level == 3:
            return [rng.randint(1, 25) for _ in range(4)], 4, 10, 500
        n_large = 1 if level == 4 else 2
        nums = [rng.randint(1, 10) for _ in range(4)] + [rng.choice(self.LARGE) for _ in range(n_large)]
        rng.shuffle(nums)
        return nums, 4, 100, 999

    def sample(self, rng: random.Random, level: int):
        while True:
            numbers, fewest, lo, hi = self._numbers(rng, level)
            items = rng.sample(numbers, rng.randint(fewest, len(numbers)))
            steps = []
            while len(items) > 1:
                a, b = (items.pop(rng.randrange(len(items))) for _ in range(2))
                x, y = max(evaluate(a), evaluate(b)), min(evaluate(a), evaluate(b))
                big, small = (a, b) if evaluate(a) >= evaluate(b) else (b, a)
                ops = [ADD] + [SUB] * (x != y) + [MUL] * (y > 1) + [DIV] * (y > 1 and x % y == 0)
                op = rng.choice(ops)
                node = (op, big, small) if op in (SUB, DIV) else (op, a, b)
                steps.append(f"{x if op in (SUB, DIV) else evaluate(a)} {op} "
                             f"{y if op in (SUB, DIV) else evaluate(b)} = {evaluate(node)}")
                items.append(node)
            target = evaluate(items[0])
            if lo <= target <= hi and target not in numbers:
                return numbers, target, items[0], steps

    def key(self, problem) -> str:
        numbers, target = problem[0], problem[1]
        return f"countdown:{','.join(map(str, sorted(numbers)))}->{target}"

    def example(self, problem, level: int) -> Example:
        numbers, target, tree, steps = problem
        expression = render(tree)
        prompt = (f"Using the numbers {', '.join(map(str, numbers))}, make {target}. "
                  f"You may use {ADD}, {SUB}, {MUL} and {DIV} (division only when exact); "
                  f"each number at most once.")
        return Example(prompt=prompt, solution="\n".join(steps + [f"{expression} = {target}"]),
                       answer=expression,
                       meta={"task": self.name, "level": level, "numbers": list(numbers),
                             "target": target})

    def check(self, example_or_meta: Example | dict, completion: str) -> bool:
        meta = _meta(example_or_meta)
        answer = extract_answer(completion)
        if answer is None:
            answer = _last_expression(completion)
        return answer is not None and verify_countdown(answer, meta["numbers"], meta["target"])


# ------------------------------------------------------------------ registry, formats
TASKS: dict[str, Task] = {"arithmetic": Arithmetic(), "countdown": Countdown()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]


def check(example_or_meta: Example | dict, completion: str) -> bool:
    """Check with the task named in the example's meta (usable as an RL reward)."""
    return get_task(_meta(example_or_meta)["task"]).check(example_or_meta, completion)


def format_pretrain(example: Example) -> str:
    """A plain-text document: question, worked solution, answer."""
    return f"Question: {example.prompt}\nSolution:\n{example.solution}\nAnswer: {example.answer}"


def format_chat(example: Example) -> list[dict]:
    """The R1 cold-start format: reasoning inside <think>, the answer inside <answer>."""
    return [{"role": "user", "content": example.prompt},
            {"role": "assistant",
             "content": f"<think>\n{example.solution}\n</think>\n<answer>{example.answer}</answer>"}]
