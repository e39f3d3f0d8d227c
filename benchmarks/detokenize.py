"""Host cost of turning sampled tokens into text: `Sequence.append` per token, by output length.

Each engine step appends one token per running request (1..K+1 with speculation), decoding
text and looking for stop strings; this measures microseconds per appended token at
several output lengths (byte tokenizer, a stop string set). CPU only.

    python benchmarks/detokenize.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402
from nanoseek.infer.sequence import Sequence  # noqa: E402


def main():
    tok = ChatTokenizer(byte_tokenizer(512))
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 数学 " * 100)
    for n in (500, 2000, 4000):
        seq = Sequence("r", [1], SamplingParams(max_tokens=n, ignore_eos=True, stop=["</answer>"]), n, seed=0)
        t0 = time.perf_counter()
        for x in ids[:n]:
            seq.append(x, tok, None)
        print(f"{n:5d} tokens: {(time.perf_counter() - t0) / n * 1e6:6.1f} us per token")


if __name__ == "__main__":
    main()
