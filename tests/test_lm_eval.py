"""lm-evaluation-harness end to end against a live server: a multiple_choice task (loglikelihoods
through echo + logprobs) and a generate_until task (stops), from local JSONL files and the
model directory's tokenizer, with nothing downloaded."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
openai = pytest.importorskip("openai")

from test_sampling import full_logprobs, tolerance  # noqa: E402
from test_serve import live, tiny_app  # noqa: E402

from nanoseek.hf import from_pretrained  # noqa: E402
from nanoseek.loading import tokenizer_for  # noqa: E402

MC = [{"question": "2+2=", "choices": ["4", "5", "22"], "answer": 0},
      {"question": "The sky is", "choices": ["blue", "green"], "answer": 1}]
GEN = [{"question": "Q: 1+1=", "answer": "2"}, {"question": "Q: the capital of France?", "answer": "Paris"}]


def write_task(folder, name, rows, body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\ndoc_to_text: \"{{{{question}}}}\"\n" + body)


def test_multiple_choice_and_generate_until_tasks_run_end_to_end(tiny_dir, tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_task(tmp_path, "nanoseek_mc", MC, "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
               "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    write_task(tmp_path, "nanoseek_gen", GEN, "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
               "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n")
    from lm_eval.tasks import TaskManager

    with live(tiny_app(tiny_dir, "tiny", max_tokens=64)) as url:
        results = lm_eval.simple_evaluate(
            model="local-completions", tasks=["nanoseek_mc", "nanoseek_gen"], log_samples=True,
            task_manager=TaskManager(include_path=str(tmp_path)),
            model_args={"base_url": url + "/v1/completions", "model": "tiny", "tokenizer_backend": "huggingface",
                        "tokenizer": str(tiny_dir), "max_retries": 1, "max_length": 128})
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        want_gen = [client.completions.create(model="tiny", prompt=r["question"], max_tokens=8, temperature=0,
                                              stop=["\n"]).choices[0].text for r in GEN]

    # multiple choice: each loglikelihood is the model's, from a full forward of context + choice
    tok, model = tokenizer_for(tiny_dir), from_pretrained(tiny_dir).eval()
    correct = 0
    for sample in results["samples"]["nanoseek_mc"]:
        scores = []
        for (context, continuation), ((loglik, greedy),) in zip(sample["arguments"], sample["resps"]):
            ctx, cont = tok.encode(context), tok.encode(continuation)
            lp32, lp64 = full_logprobs(model, ctx + cont)
            rows = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            want = lp64[rows, torch.tensor(cont)]
            assert abs(loglik - want.sum().item()) <= len(cont) * tolerance(lp32, lp64)
            assert greedy == bool((lp64[rows].argmax(-1) == torch.tensor(cont)).all())
            scores.append(want.sum().item())
        correct += max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"]
    assert results["results"]["nanoseek_mc"]["acc,none"] == correct / len(MC)
    # generation: what the server answers the same request
    got = [s["resps"][0][0] for s in results["samples"]["nanoseek_gen"]]
    assert got == want_gen
