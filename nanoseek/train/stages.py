"""Stage functions the CLI and the speedrun call: pretrain, SFT, and their inputs.

    pretrain(model_cfg, train_cfg, data, out)   tokenizer (trained on the data unless given)
                                                 -> packed documents -> Trainer
    sft(model_dir, train_cfg, data, out)        a checkpoint + its tokenizer -> loss-masked
                                                 chats -> Trainer

A data spec may join several specs with commas (`builtin:arithmetic:level=1,notes.txt`).
A stage writes into `out`: `tokenizer/`, `checkpoints/step_*/` (HF layout + optimizer and
loader state), `metrics.jsonl`, `tb/`, `plots/`, and `final/` — the last model in HF
layout with its tokenizer, what later stages and other tools load.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from ..config import ModelConfig
from ..data.datasets import load_chats, load_documents
from ..data.loader import PackedLoader, SFTLoader, tokenize_chat
from ..data.tokenizer import ChatTokenizer, load_tokenizer, train_bpe
from ..hf import save_pretrained
from ..loading import load_model_dir, resolve_device
from ..model import Transformer
from ..parallel.mesh import is_main_process, main_process_first
from .hf_student import is_transformers_model, load_student
from .trainer import TrainConfig, Trainer, refuse_existing_run


def split_overrides(overrides: list[str]) -> tuple[list[str], dict]:
    """key=value words -> (model config overrides, train config changes)."""
    from ..config import coerce_value
    model, train = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in TrainConfig.field_names():
            train[key] = coerce_value(value)
        else:
            model.append(item)
    return model, train


def read_specs(spec: str, reader) -> list:
    items = []
    for part in (p for p in spec.split(",") if p):
        items += reader(part)
    return items


def publish_final(model: Transformer, tokenizer_dir: Path, out: Path, dtype: str = "auto") -> Path:
    """`out/final`: the model in HF layout with its tokenizer, what later stages load. dtype
    (train field final_dtype): auto keeps the training dtype; fp8 writes V3's FP8 layout (hf.py)."""
    import torch

    final = out / "final"
    save_pretrained(model, final, dtype={"auto": None, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[dtype])
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, final / f.name)
    return final


def load_base(model_dir: str | Path, out: Path) -> tuple[Path, ChatTokenizer, Path, Transformer]:
    """What a fine-tuning stage starts from: the checkpoint (a run's `final/` or latest), its
    tokenizer copied to `out/tokenizer`, and the model with float32 master weights."""
    import torch

    src, model, tok = load_model_dir(model_dir, device="cpu", dtype=torch.float32)
    tok_dir = out / "tokenizer"
    with main_process_first():
        if is_main_process():
            tok.save(tok_dir)
    return src, tok, tok_dir, model


def make_trainer(model: Transformer, loader, cfg: TrainConfig, out: Path, parallel, **kwargs) -> Trainer:
    """The single-process Trainer, or with a ParallelConfig its torchrun twin."""
    if parallel is None:
        return Trainer(model, loader, cfg, out, **kwargs)
    from ..parallel.trainer import ParallelTrainer
    return ParallelTrainer(model, loader, cfg, out, parallel, **kwargs)


def publish_trained(trainer: Trainer, tok_dir: Path, out: Path) -> None:
    """`out/final` from the trainer's model, by the process that publishes it."""
    model = trainer.final_model()
    if model is not None:
        publish_final(model, tok_dir, out, trainer.cfg.final_dtype)


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, data: str, out: str | Path,
             tokenizer: str | Path | None = None, resume: bool = False,
             progress: bool = True, parallel=None) -> tuple[Trainer, ChatTokenizer, list[dict]]:
    """`parallel`: a parallel.mesh.ParallelConfig to train on the processes torchrun started."""
    out = Path(out)
    resolve_device(train_cfg.device)  # a device this machine lacks fails before any work
    if not resume:  # before anything is written: the tokenizer of the run there is its own
        refuse_existing_run(out)
    docs = read_specs(data, load_documents)
    tok_dir = out / "tokenizer"
    with main_process_first():  # of several processes, rank 0 trains the tokenizer, the others read it
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        elif (resume or not is_main_process()) and (tok_dir / "tokenizer.json").is_file():
            tok = load_tokenizer(tok_dir)
        else:
            tok = ChatTokenizer(train_bpe(docs, model_cfg.vocab_size))
        if tok.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{model_cfg.vocab_size}; set vocab_size={tok.vocab_size} or larger")
        if is_main_process():
            tok.save(tok_dir)
    model_cfg = model_cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    token_docs = [[tok.bos_id] + ids for ids in tok.encode_batch(docs)]
    loader = PackedLoader(token_docs, train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed,
                          eos_id=tok.eos_id)
    import torch
    torch.manual_seed(train_cfg.seed)
    model = Transformer(model_cfg)
    trainer = make_trainer(model, loader, train_cfg, out, parallel, tokenizer_dir=tok_dir, stage="pretrain",
                           extra_state={"data": data})
    records = trainer.fit(resume=resume, progress=progress)
    publish_trained(trainer, tok_dir, out)
    return trainer, tok, records


def sft(model_dir: str | Path, train_cfg: TrainConfig, data: str, out: str | Path,
        resume: bool = False, progress: bool = True,
        parallel=None) -> tuple[Trainer, ChatTokenizer, list[dict]]:
    out = Path(out)
    resolve_device(train_cfg.device)
    if not resume:
        refuse_existing_run(out)
    if is_transformers_model(model_dir):  # a dense student with its own tokenizer and chat template
        if parallel is not None:
            raise ValueError("a transformers student trains in one process; run sft without torchrun")
        src, tok, tok_dir, model = load_student(model_dir, out)
        encode = tok.tokenize_chat
    else:
        src, tok, tok_dir, model = load_base(model_dir, out)
        encode = partial(tokenize_chat, tok)
    chats = read_specs(data, load_chats)
    examples = [encode(messages) for messages in chats]
    if not any(any(mask[1:train_cfg.seq_len]) for _, mask in examples):  # else every loss is 0/0
        first = min(mask.index(True) for _, mask in examples)
        raise ValueError(f"seq_len={train_cfg.seq_len} cuts every chat before its assistant reply "
                         f"(the earliest starts at token {first}); raise seq_len")
    loader = SFTLoader(examples, train_cfg.batch_size, train_cfg.seq_len, seed=train_cfg.seed,
                       pad_id=tok.pad_id)
    trainer = make_trainer(model, loader, train_cfg, out, parallel, tokenizer_dir=tok_dir, stage="sft",
                           extra_state={"data": data, "base_model": str(src)})
    records = trainer.fit(resume=resume, progress=progress)
    publish_trained(trainer, tok_dir, out)
    return trainer, tok, records


def train_config(**changes) -> TrainConfig:
    """TrainConfig with `changes`, checked; an unknown field is named with the known ones."""
    return TrainConfig.with_changes(**changes)
