"""The `nanoseek` command: one flat subcommand per stage.

    nanoseek info --preset deepseek-v3                 parameters, KV cache, FLOPs
    nanoseek info --config ckpt/ --json n_routed_experts=64
    nanoseek init --preset tiny --out ckpt/ --seed 0   random model + byte tokenizer

Config overrides are `key=value` words with JSON values (`q_lora_rank=null`). A user error
(unknown preset, bad override, invalid value, missing file) prints one line
`nanoseek: error: ...` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import PRESETS, ConfigError, ModelConfig, apply_overrides, preset


class UsageError(Exception):
    """A command-line mistake; main() prints it as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too, no usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------- shared options
def add_config_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(PRESETS)}")
    src.add_argument("--config", metavar="FILE", help="a config.json or a checkpoint directory")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config field overrides, JSON values (e.g. n_routed_experts=16 q_lora_rank=null)")


def load_config(args: argparse.Namespace) -> ModelConfig:
    path = getattr(args, "config", None)
    try:
        cfg = ModelConfig.from_json(path) if path else preset(args.preset)
        return apply_overrides(cfg, args.overrides)
    except TypeError as e:  # a value of the wrong type reached validation, e.g. hidden_size="x"
        given = " ".join(args.overrides) or "none"
        raise ConfigError(f"invalid config value ({e}); overrides: {given}") from None


# ---------------------------------------------------------------------- info
def add_info_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--context", type=int, default=4096, metavar="T",
                   help="context length for the FLOP counts (default 4096)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def cmd_info(args: argparse.Namespace) -> None:
    from .info import model_info
    if args.context <= 0:
        raise UsageError(f"--context must be positive, got {args.context}")
    info = model_info(load_config(args), context_length=args.context)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(info_table(info, title=args.config or args.preset))


def approx(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; with a unit: '1.23 MFLOP'."""
    sep = " " if unit else ""
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{sep}{suffix}{unit}"
    return f"{n:g}{sep}{unit}"


def approx_bytes(n: int) -> str:
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


def info_table(i: dict, title: str = "") -> str:
    """The human view of model_info(): aligned rows of exact figure, rounded figure, note."""
    mla = i["attention_type"] == "mla"
    dense_layers = i["num_hidden_layers"] - i["moe_layers"]
    attn = (f"MLA (kv_lora_rank {i['kv_lora_rank']}, q_lora_rank {i['q_lora_rank']}, "
            f"rope {i['qk_rope_head_dim']})" if mla
            else f"{i['attention_type'].upper()} (head_dim {i['head_dim']}, "
                 f"{i['num_key_value_heads']} kv heads)")
    rows: list[tuple[str, str, str, str] | str] = [
        f"nanoseek info: {title}" if title else "nanoseek info",
        ("layers", f"{i['num_hidden_layers']}", "", f"{dense_layers} dense + {i['moe_layers']} MoE"
         + (f", + {i['num_nextn_predict_layers']} MTP" if i["num_nextn_predict_layers"] else "")),
        ("hidden size", f"{i['hidden_size']:,}", "", f"vocab {i['vocab_size']:,}"),
        ("attention", f"{i['num_attention_heads']} heads", "", attn),
    ]
    if i["n_routed_experts"]:
        rows.append(("experts", f"{i['num_experts_per_tok']} of {i['n_routed_experts']}", "",
                     f"+ {i['n_shared_experts']} shared, width {i['moe_intermediate_size']:,}, "
                     f"{i['scoring_func']} router"))
    total = i["total_params"]
    rows += [
        "parameters",
        ("total", f"{total:,}", approx(total), "main model, without MTP"),
        ("activated per token", f"{i['activated_params']:,}", approx(i["activated_params"]),
         f"{100 * i['activated_params'] / total:.1f}% of total, embedding excluded"),
        ("activated + embedding", f"{i['activated_params_with_embedding']:,}",
         approx(i["activated_params_with_embedding"]), "DeepSeekMoE-paper convention"),
        ("MTP modules", f"{i['mtp_params']:,}", approx(i["mtp_params"]),
         "as in an HF checkpoint (own embedding + head copies)"),
        ("HF checkpoint total", f"{i['hf_total_params']:,}", approx(i["hf_total_params"]), "total + MTP"),
        "KV cache per token (BF16)",
        ("as built", f"{i['kv_cache_bytes_per_token']:,} B", approx_bytes(i["kv_cache_bytes_per_token"]),
         i["attention_type"].upper()),
        ("MHA", f"{i['kv_cache_bytes_per_token_mha']:,} B", approx_bytes(i["kv_cache_bytes_per_token_mha"]),
         f"{i['kv_cache_saving_vs_mha']:.1f}x the built cache"),
        (f"GQA, {i['gqa_groups']} groups", f"{i['kv_cache_bytes_per_token_gqa']:,} B",
         approx_bytes(i["kv_cache_bytes_per_token_gqa"]), f"{i['kv_cache_saving_vs_gqa']:.1f}x the built cache"),
        f"FLOPs per token at context {i['context_length']:,}",
        ("training", f"{i['train_flops_per_token']:,}", approx(i["train_flops_per_token"], "FLOP"),
         "6N + attention"),
        ("decode", f"{i['decode_flops_per_token']:,}", approx(i["decode_flops_per_token"], "FLOP"),
         "2N + attention" + (" (absorbed MLA)" if mla else "")),
    ]
    if i["expert_combinations"] is not None:
        rows += ["routing", ("expert combinations", f"{i['expert_combinations']:,}", "",
                             f"C({i['n_routed_experts']}, {i['num_experts_per_tok']}) per MoE layer")]
    cells = [r for r in rows if isinstance(r, tuple)]
    w = [max(len(r[k]) for r in cells) for k in range(3)]
    lines = []
    for r in rows:
        if isinstance(r, str):
            lines.append(r if r.startswith("nanoseek") else f"  {r}")
        else:
            label, exact, rounded, note = r
            lines.append(f"    {label:<{w[0]}}  {exact:>{w[1]}}  {rounded:>{w[2]}}  {note}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------- init
def add_init_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to create")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the initialisation (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def cmd_init(args: argparse.Namespace) -> None:
    import torch

    from .data.tokenizer import BOS, EOS, PAD, byte_tokenizer, save_tokenizer
    from .info import count_parameters
    from .model import Transformer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not an empty directory")
    cfg = load_config(args)
    tok = byte_tokenizer(cfg.vocab_size)  # refuses a vocabulary too small before any work
    # the model's special ids are the tokenizer's, so the pair written together agrees
    cfg = cfg.replace(bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
                      pad_token_id=tok.token_to_id(PAD))
    dtype = getattr(torch, args.dtype)
    n = count_parameters(cfg)
    need = (n["total"] + n["mtp_layers"]) * 4  # built in float32 first
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if mem and need > 0.8 * mem:
        raise UsageError(f"a random {approx(n['total'])}-parameter model needs {approx_bytes(need)} "
                         f"of memory; this machine has {approx_bytes(mem)}")
    torch.manual_seed(args.seed)
    model = Transformer(cfg)  # initialised in float32, stored in `dtype` (routers stay float32)
    model.save_pretrained(out, dtype=dtype)  # replaces `out` as a whole: tokenizer after
    save_tokenizer(tok, out)
    mtp = f" + {approx(n['mtp_layers'])} MTP" if n["mtp_layers"] else ""
    print(f"wrote {out}: {approx(n['total'])}{mtp} parameters ({args.dtype}, seed {args.seed}), "
          f"byte tokenizer with {tok.get_vocab_size():,} tokens")


# ---------------------------------------------------------------------- dispatch
# name: (add_arguments, run, help). Each stage of the pipeline adds its row here.
COMMANDS = {
    "info": (add_info_args, cmd_info, "parameters, activated parameters, KV cache, FLOPs"),
    "init": (add_init_args, cmd_init, "write a randomly initialised model and a byte tokenizer"),
    # ---- later stages (tokenizer, pretrain, sft, rl, serve, speedrun, ...) go here ----
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nanoseek", description="The DeepSeek-V3 / R1 system in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for name, (add_args, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except (UsageError, ConfigError, ValueError, FileNotFoundError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"nanoseek: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
