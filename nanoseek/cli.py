"""The `nanoseek` command: one flat subcommand per stage.

    nanoseek info --preset deepseek-v3                 parameters, KV cache, FLOPs
    nanoseek info --config ckpt/ --json n_routed_experts=64
    nanoseek init --preset tiny --out ckpt/ --seed 0   random model + byte tokenizer
    nanoseek generate --model ckpt/ --prompt "2+2=" --max-tokens 16
    nanoseek chat --model runs/speedrun               streams, reasoning apart from the answer
    nanoseek grpo --model runs/sft --task arithmetic --out runs/grpo group_size=8 beta=0
    nanoseek grpo --model runs/sft --data problems.jsonl --out runs/grpo   (math-verify reward)
    nanoseek rejection-sample --model runs/grpo --task arithmetic --n 8 --out rs.jsonl
    nanoseek distill --teacher http://host:8000/v1 --data problems.jsonl --out traces.jsonl

Config overrides are `key=value` words with JSON values (`q_lora_rank=null`);
`nanoseek train --list-fields` (sft, grpo, distill) lists them with their defaults. Bare
`nanoseek` prints the command list and exits 0; `COMMAND --help` shows each option's default.

Exit status: 0 done; 2 a user error (unknown preset, bad override, invalid value, missing file,
a device this machine lacks), printed as one line `nanoseek: error: ...` on stderr; 130 after
Ctrl-C and 143 after SIGTERM (train, sft, grpo and r1 first finish the step in flight and save
it, and the line says how to resume); 141 when the reader of the output went away
(`nanoseek info --json | head`), quietly, as a tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .config import PRESETS, CheckedConfig, ConfigError, ModelConfig, apply_overrides, preset
from .loading import resolve_device
from .rl.trainer import GRPOConfig
from .train.trainer import TrainConfig, TrainingError, TrainingInterrupted


class UsageError(Exception):
    """A command-line mistake; main() prints it as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too, no usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless its help states it already or there is none
    worth showing (unset, an off flag, empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, "", argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum (a wrong one is a one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            bound = "positive" if minimum == 1 else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def add_list_fields(p: argparse.ArgumentParser, config: type[CheckedConfig], note: str = "") -> None:
    """`--list-fields`: print the key=value fields a command takes, with their defaults and
    meanings, and stop (as --help does, before required arguments are asked for)."""
    class ListFields(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{config.kind} fields (key=value, JSON values):\n{config.field_table()}" + note)
            parser.exit(0)
    p.add_argument("--list-fields", action=ListFields, nargs=0, default=argparse.SUPPRESS,
                   help="list the key=value fields with their defaults, and exit")


# ---------------------------------------------------------------------- shared options
def add_config_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(PRESETS)}")
    src.add_argument("--config", metavar="FILE", help="a config.json or a checkpoint directory")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config field overrides, JSON values (e.g. n_routed_experts=16 q_lora_rank=null)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    from .train.precision import PRECISIONS
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto (default: BF16 autocast on a GPU, float32 on the CPU), bf16, fp32, or fp8: "
                        "DeepSeek-V3's FP8 training (a Hopper GPU; on the CPU the FP8 GEMMs are emulated, "
                        "to check the maths, not for speed)")


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
    p.add_argument("--context", type=positive_int, default=4096, metavar="T",
                   help="context length for the FLOP counts")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def cmd_info(args: argparse.Namespace) -> None:
    from .info import model_info
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
    p.add_argument("--seed", type=int, default=0, help="torch seed of the initialisation")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype")


def cmd_init(args: argparse.Namespace) -> None:
    import torch

    from .data.tokenizer import BOS, EOS, PAD, byte_tokenizer, save_tokenizer
    from .hf import save_pretrained
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
    save_pretrained(model, out, dtype=dtype)  # replaces `out` as a whole: tokenizer after
    save_tokenizer(tok, out)
    mtp = f" + {approx(n['mtp_layers'])} MTP" if n["mtp_layers"] else ""
    print(f"wrote {out}: {approx(n['total'])}{mtp} parameters ({args.dtype}, seed {args.seed}), "
          f"byte tokenizer with {tok.get_vocab_size():,} tokens")


# ---------------------------------------------------------------------- train / sft / eval
MODEL_FIELDS_NOTE = ("\nand any model config field, by transformers' DeepseekV3Config names (hidden_size=256, "
                     "...);\n`nanoseek info --preset NAME --json` lists a preset's values")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="file(s) (.txt .jsonl .json .parquet, a datasets folder) or builtin:TASK[:level=N], "
                        "comma-joined")
    add_run_args(p)
    p.add_argument("--tokenizer", metavar="DIR", help="an existing tokenizer.json (default: train BPE on the data)")
    add_parallel_args(p)
    add_list_fields(p, TrainConfig, MODEL_FIELDS_NOTE)
    p.epilog = "key=value words set model config fields or train fields (lr, batch_size, seq_len, ...)"


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options of a training run (train, sft)."""
    p.add_argument("--steps", type=positive_int, required=True, metavar="K", help="optimizer steps")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--save-every", type=non_negative_int, default=None, metavar="K",
                   help="checkpoint every K steps (default: every tenth of the run; 0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_precision_arg(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel training (launch with torchrun --nproc-per-node N -m nanoseek ...)")
    g.add_argument("--dp", type=int, metavar="N", help="data-parallel ranks, FSDP2-sharded (default: the "
                                                       "processes torchrun started, divided by --pp)")
    g.add_argument("--ep", type=int, default=1, metavar="N", help="expert-parallel group size; divides --dp")
    g.add_argument("--pp", type=int, default=1, metavar="N", help="pipeline-parallel ranks")
    g.add_argument("--pp-schedule", choices=("1f1b", "dualpipev"), default="1f1b",
                   help="pipeline schedule (dualpipev: two stages per rank, V-shaped)")
    g.add_argument("--microbatches", type=int, default=0, metavar="N",
                   help="pipeline micro-batches per step (default: 2 per stage)")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="dualpipev with --ep: overlap each forward/backward pair's all-to-alls with the other's "
                        "compute (default: on GPUs; --no-overlap runs the pair in turn)")
    g.add_argument("--replicate", action="store_true", help="replicate non-expert weights over dp "
                                                            "instead of sharding them")
    g.add_argument("--fsdp-bf16", action="store_true", help="FSDP computes with bf16 copies of the weights")
    g.add_argument("--cpu-offload", action="store_true", help="FSDP keeps weights and optimizer state in CPU memory")


def parallel_config(args: argparse.Namespace):
    """The ParallelConfig of a run started by torchrun or with parallel flags; None for today's
    one-process path. A resumed run whose checkpoints are distributed continues in one process."""
    launched = "WORLD_SIZE" in os.environ
    flags = args.dp is not None or args.ep > 1 or args.pp > 1
    if not (launched or flags or (args.resume and distributed_run(args.out))):
        return None
    from .parallel.mesh import ParallelConfig, init_distributed
    rank, world = init_distributed()
    if rank != 0:  # one copy of what a run prints: rank 0's
        sys.stdout = open(os.devnull, "w")
    if args.pp < 1 or world % args.pp:
        raise UsageError(f"--pp {args.pp} must be a positive divisor of the {world} processes started")
    cfg = ParallelConfig(dp=args.dp if args.dp is not None else world // args.pp, ep=args.ep, pp=args.pp,
                         schedule=args.pp_schedule, microbatches=args.microbatches, fsdp=not args.replicate,
                         param_dtype="bf16" if args.fsdp_bf16 else None, cpu_offload=args.cpu_offload,
                         overlap=args.overlap)
    cfg.check_world(world)
    return cfg


def distributed_run(run_dir: str) -> bool:
    """Whether the latest checkpoint of a run directory was written by a parallel run."""
    from .loading import latest_checkpoint
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return False
    from .parallel.checkpoint import is_distributed_checkpoint
    return is_distributed_checkpoint(ckpt)


def _train_cfg(args, extra: dict):
    from .train.stages import train_config
    if args.precision:
        extra = {**extra, "precision": args.precision}
    return train_config(steps=args.steps, save_every=args.save_every, **extra)


def cmd_train(args: argparse.Namespace) -> None:
    from .train.stages import pretrain, split_overrides
    model_over, train_over = split_overrides(args.overrides)
    args.overrides = model_over
    trainer, _, records = pretrain(load_config(args), _train_cfg(args, train_over), args.data, args.out,
                                   tokenizer=args.tokenizer, resume=args.resume, parallel=parallel_config(args))
    last = records[-1] if records else {}
    print(f"trained to step {trainer.step}; last loss {last.get('loss', float('nan')):.4f}; "
          f"model in {Path(args.out) / 'final'}")


def add_sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a checkpoint or a run directory, or a transformers causal LM directory (Qwen2, Llama ...)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="chats: .jsonl/.json/.parquet with messages, or builtin:TASK")
    add_run_args(p)
    add_parallel_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train fields (lr, batch_size, seq_len, ...)")
    add_list_fields(p, TrainConfig)


def cmd_sft(args: argparse.Namespace) -> None:
    from .train.stages import sft, split_overrides
    model_over, train_over = split_overrides(args.overrides)
    if model_over:
        raise UsageError(f"sft takes train fields only, not {', '.join(model_over)}")
    trainer, _, records = sft(args.model, _train_cfg(args, train_over), args.data, args.out, resume=args.resume,
                              parallel=parallel_config(args))
    last = records[-1] if records else {}
    print(f"SFT to step {trainer.step}; last loss {last.get('loss', float('nan')):.4f}; "
          f"model in {Path(args.out) / 'final'}")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--task", default="arithmetic", help="built-in task (arithmetic, countdown)")
    p.add_argument("--level", type=int, default=1, help="task difficulty")
    p.add_argument("--n", type=positive_int, default=100, help="held-out problems")
    p.add_argument("--k", type=non_negative_int, default=0, help="also pass@k with k samples per problem")
    p.add_argument("--samples", type=non_negative_int, default=0,
                   help="also sampled pass@1: the mean accuracy of this many samples per problem (DeepSeek-R1's "
                        "metric, with --temperature 0.6)")
    p.add_argument("--temperature", type=float, default=0.8, help="of the pass@k and pass@1 samples")
    p.add_argument("--format", choices=("chat", "plain"), default="chat",
                   help="chat template (after SFT) or the plain pretraining format")
    add_device_arg(p)


def cmd_eval(args: argparse.Namespace) -> None:
    from .train.evaluate import evaluate_task
    from .loading import load_model_dir
    _, model, tokenizer = load_model_dir(args.model, args.device)
    result = evaluate_task(model, tokenizer, args.task, args.level, n=args.n, k=args.k,
                           temperature=args.temperature, fmt=args.format, samples=args.samples)
    print(json.dumps(result, indent=2))


def add_speedrun_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/speedrun", metavar="DIR", help="where the stages and report.md go")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget for pretraining + SFT (default: 20 on a GPU; on a CPU a fixed "
                        "number of steps, so that the results do not depend on the machine's load)")
    p.add_argument("--grpo-minutes", type=float, default=None, metavar="M",
                   help="budget of the GRPO stage (default: 6 on a GPU, fixed steps on a CPU; 0 skips it)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data, the initialization, the data order and the rollouts")
    add_precision_arg(p)


def cmd_speedrun(args: argparse.Namespace) -> None:
    from .speedrun import speedrun
    for flag, value in (("--minutes", args.minutes), ("--grpo-minutes", args.grpo_minutes)):
        if value is not None and (value < 0 or (flag == "--minutes" and value == 0)):
            raise UsageError(f"{flag} must be positive{' or 0' if flag != '--minutes' else ''}, got {value:g}")
    report = speedrun(args.out, minutes=args.minutes, grpo_minutes=args.grpo_minutes, seed=args.seed,
                      precision=args.precision or "auto")
    print(f"report: {report}")


# ---------------------------------------------------------------------- grpo
def add_grpo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint or a run directory (after SFT)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", metavar="NAME", help="built-in task (arithmetic, countdown)")
    src.add_argument("--data", metavar="FILE",
                     help="your prompts: .jsonl/.json/.parquet rows with a 'prompt' (text or chat "
                          "messages); other columns (answer, solution, tests, ...) reach the reward "
                          "functions as keyword arguments. Default reward: math (math-verify) for "
                          "rows with answer/solution, code for rows with tests")
    p.add_argument("--eval-data", metavar="FILE",
                   help="held-out rows like --data's, answered greedily and scored by the same rewards "
                        "every eval_every steps and at the end (eval_reward in metrics.jsonl; eval_n "
                        "rows, default all); --task runs use the task's test split instead")
    p.add_argument("--level", type=int, default=None, metavar="N", help="task difficulty (default 1; --task only)")
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--steps", type=positive_int, default=None, metavar="K", help="GRPO steps (default 100)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_precision_arg(p)
    add_parallel_args(p)
    add_list_fields(p, GRPOConfig)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="GRPOConfig fields, JSON values (group_size=8 beta=0 loss_type=dapo "
                        "rewards='{\"accuracy\": 1, \"format\": 0.2}')")


def cmd_grpo(args: argparse.Namespace) -> None:
    from .config import coerce_value
    from .rl.trainer import grpo, grpo_config
    parallel = parallel_config(args)  # first: the other ranks print nothing from here on
    changes = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"override {item!r} must look like key=value")
        changes[key] = coerce_value(value)
    if args.data and args.level is not None:
        raise UsageError("--level sets a built-in task's difficulty; it does not apply to --data")
    for name, value in (("steps", args.steps), ("level", args.level), ("precision", args.precision)):
        if value is not None:
            changes[name] = value
    if args.eval_data and not args.data:
        raise UsageError("--eval-data goes with --data; a --task run evaluates on the task's test split "
                         "(set eval_n=N)")
    source, eval_rows = args.task, None
    if args.eval_data:
        from .rl.distill import load_prompt_rows
        eval_rows = load_prompt_rows(args.eval_data)
        changes.setdefault("eval_n", len(eval_rows))
    if args.data:
        from .rl.distill import correctness_reward, load_prompt_rows
        source = load_prompt_rows(args.data)
        if "rewards" not in changes:
            changes["rewards"] = {correctness_reward(source): 1.0}
            print(f"rewards: {json.dumps(changes['rewards'])} (set rewards='{{...}}' to choose)")
    cfg = grpo_config(**changes)
    trainer, records = grpo(args.model, source, cfg, args.out, resume=args.resume, data=args.data,
                            eval_rows=eval_rows, parallel=parallel)
    last = records[-1] if records else {}
    print(f"GRPO to step {trainer.step}; last reward {last.get('reward', float('nan')):.4f}; "
          f"model in {Path(args.out) / 'final'}")


# ---------------------------------------------------------------------- rejection sampling / distillation
def add_prompt_source_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", metavar="NAME", help="built-in task (arithmetic, countdown): its train split")
    src.add_argument("--data", metavar="FILE", help=".jsonl/.json/.parquet rows with a 'prompt' and the "
                     "columns that check it (answer or solution: math-verify; tests: code)")
    p.add_argument("--level", type=int, default=None, metavar="L", help="task difficulty (default 1; --task only)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="M",
                   help="prompts to use (default: 100 task problems, or every row of --data)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="SFT chats for `nanoseek sft --data`; "
                   "figures and per-prompt pass rates go beside it in FILE.stats.json")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="of the samples")
    add_device_arg(p)


def add_rejection_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint or a run directory (after RL)")
    add_prompt_source_args(p)
    p.add_argument("--n", type=positive_int, default=4, metavar="N", help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="sampling temperature")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="K", help="per sample")


def print_recipe_stats(stats: dict, n: int, out: str, judged: bool = True) -> None:
    from .rl.distill import report_lines
    for line in report_lines(stats, n, judged):
        print(line)
    print(f"wrote {stats['kept']} chats to {out}")
    if not stats["kept"]:
        print("nanoseek: nothing was kept; raise --n or --temperature, or use a stronger model", file=sys.stderr)


def cmd_rejection_sample(args: argparse.Namespace) -> None:
    from .rl.distill import prompt_rows, rejection_sample
    rows = prompt_rows(args.task, args.data, args.level, args.num_prompts, args.seed)
    stats = rejection_sample(args.model, rows, args.out, n=args.n, temperature=args.temperature,
                             max_tokens=args.max_tokens, seed=args.seed, device=args.device)
    print_recipe_stats(stats, args.n, args.out)


def add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="DIR|URL",
                   help="a checkpoint/run directory, or an OpenAI-compatible base URL (http://host:8000/v1); "
                        "its key from $NANOSEEK_TEACHER_API_KEY or --api-key-file")
    add_prompt_source_args(p)
    p.add_argument("--n", type=positive_int, default=1, metavar="N", help="traces per prompt")
    p.add_argument("--temperature", type=float, default=0.6, metavar="T", help="sampling temperature (R1's advice)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling")
    p.add_argument("--max-tokens", type=positive_int, default=1024, metavar="K", help="per trace")
    p.add_argument("--only-correct", action="store_true", help="keep only traces whose answer checks out")
    p.add_argument("--teacher-model", metavar="NAME", help="the endpoint's model (default: the first it lists)")
    p.add_argument("--api-key-file", metavar="FILE", help="the endpoint's key, first line")
    p.add_argument("--concurrency", type=positive_int, default=8, metavar="C", help="requests in flight")
    p.add_argument("--student", metavar="DIR",
                   help="then fine-tune this checkpoint (or a transformers causal LM directory) on the traces ...")
    p.add_argument("--sft-out", metavar="DIR", help="... into this run directory")
    p.add_argument("--sft-steps", type=positive_int, default=100, metavar="K", help="SFT steps")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="SFT train fields (lr, batch_size, seq_len, ...)")
    add_list_fields(p, TrainConfig)


def cmd_distill(args: argparse.Namespace) -> None:
    from .rl.distill import distill, is_url, prompt_rows, teacher_key
    from .loading import resolve_model_dir
    from .train.stages import sft, split_overrides, train_config
    if bool(args.student) != bool(args.sft_out):
        raise UsageError("--student and --sft-out go together: the student to fine-tune and where to")
    train_over = {}
    if args.student:
        resolve_model_dir(args.student)  # a wrong student path fails before the teacher works
        model_over, train_over = split_overrides(args.overrides)
        if model_over:
            raise UsageError(f"distill takes SFT train fields only, not {', '.join(model_over)}")
        train_config(steps=args.sft_steps, **train_over)  # an unknown field fails now too
    elif args.overrides:
        raise UsageError(f"key=value words set the student's SFT; without --student: {' '.join(args.overrides)}")
    url = is_url(args.teacher)
    if not url and (args.api_key_file or args.teacher_model):
        raise UsageError("--api-key-file and --teacher-model are for a URL teacher")
    rows = prompt_rows(args.task, args.data, args.level, args.num_prompts, args.seed)
    stats = distill(args.teacher, rows, args.out, n=args.n, temperature=args.temperature, top_p=args.top_p,
                    max_tokens=args.max_tokens, only_correct=args.only_correct,
                    teacher_model=args.teacher_model, api_key=teacher_key(args.api_key_file) if url else None,
                    concurrency=args.concurrency, seed=args.seed, device=args.device)
    print_recipe_stats(stats, args.n, args.out, judged=stats["correctness_checked"])
    if args.student and stats["kept"]:
        trainer, _, records = sft(args.student, train_config(steps=args.sft_steps, **train_over),
                                  args.out, args.sft_out)
        last = records[-1] if records else {}
        print(f"student SFT to step {trainer.step}; last loss {last.get('loss', float('nan')):.4f}; "
              f"model in {Path(args.sft_out) / 'final'}")


# ---------------------------------------------------------------------- generate / chat
def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float, max_tokens: int) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="a checkpoint or a run directory")
    p.add_argument("--max-tokens", type=positive_int, default=max_tokens, metavar="N",
                   help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=temperature, metavar="T", help="0 is greedy")
    p.add_argument("--top-p", type=float, default=top_p, metavar="P", help="nucleus sampling")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K", help="0: off")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="of the sampling")
    add_device_arg(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="weights: auto keeps an FP8 checkpoint in FP8 (others as stored); bf16, fp32 dequantize")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    add_sampling_args(p, temperature=0.0, top_p=1.0, max_tokens=256)
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--speculative", type=non_negative_int, default=0, metavar="K",
                   help="draft K tokens per step with the MTP module(s); 0: off")


def load_model(args: argparse.Namespace):
    """(model, tokenizer) of --model on --device, its weights as --dtype says."""
    from .infer.fp8_weights import DTYPE_CHOICES
    from .loading import load_model_dir
    _, model, tokenizer = load_model_dir(args.model, args.device, **DTYPE_CHOICES[args.dtype])
    return model, tokenizer


def sampling_params(args: argparse.Namespace, max_tokens: int):
    from .infer.sampling import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> None:
    from .infer.engine import Engine
    model, tokenizer = load_model(args)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    # one slot just long enough; a request beyond the model's context is refused by add_request
    max_len = min(len(tokenizer.encode(prompt)) + args.max_tokens, model.config.max_position_embeddings)
    engine = Engine(model, tokenizer, max_batch=1, max_len=max_len, speculative_k=args.speculative)
    for event in engine.generate(prompt, sampling_params(args, args.max_tokens), stream=True):
        print(event.new_text, end="", flush=True)
    print()
    if args.speculative:
        s = engine.speculative_stats()
        print(f"speculative k={s['k']}: {s['accepted']}/{s['proposed']} drafts accepted "
              f"({s['acceptance_rate']:.0%}), {s['mean_accepted_length']:.2f} tokens per forward",
              file=sys.stderr)


def add_chat_args(p: argparse.ArgumentParser) -> None:
    add_sampling_args(p, temperature=0.6, top_p=0.95, max_tokens=1024)  # R1's recommended sampling
    p.add_argument("--system", default="", metavar="TEXT", help="a system prompt")
    p.add_argument("--context", type=positive_int, default=4096, metavar="T",
                   help="tokens the whole conversation may hold, at most the model's")


class ReplyPrinter:
    """Reasoning dimmed on a terminal, after `thinking:` / before `answer:` labels in plain text."""

    def __init__(self, out, tty: bool):
        self.out, self.tty, self.part = out, tty, None

    def __call__(self, part: str, text: str) -> None:
        if part != self.part:
            if self.tty:
                self.out.write("\x1b[2m" if part == "reasoning" else "\x1b[0m")
            elif part == "reasoning":
                self.out.write(("\n" if self.part else "") + "thinking: ")
            elif self.part is not None:  # an answer after shown reasoning
                self.out.write("\nanswer: ")
            self.part = part
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write(("\x1b[0m" if self.tty else "") + "\n")
        self.out.flush()


def cmd_chat(args: argparse.Namespace) -> None:
    from .infer.engine import Engine
    from .infer.reasoning import ReasoningSplitter
    model, tokenizer = load_model(args)
    engine = Engine(model, tokenizer, max_batch=1,
                    max_len=min(args.context, model.config.max_position_embeddings))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    tty = sys.stdout.isatty()
    print(f"nanoseek chat: {args.model} (context {engine.max_len} tokens); /reset forgets, /exit or Ctrl-D ends")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        prompt = tokenizer.apply_chat_template(messages + [{"role": "user", "content": line}],
                                               add_generation_prompt=True)
        room = engine.max_len - len(tokenizer.encode(prompt))
        if room < 1:
            print(f"nanoseek: the conversation fills the context of {engine.max_len} tokens; /reset to start "
                  "again", file=sys.stderr)
            continue
        splitter, show = ReasoningSplitter(), ReplyPrinter(sys.stdout, tty)
        sys.stdout.write("assistant> ")
        params = sampling_params(args, min(args.max_tokens, room))
        try:
            for event in engine.generate(prompt, params, stream=True):
                for part, text in splitter.feed(event.new_text):
                    show(part, text)
        except KeyboardInterrupt:  # the stream's close aborted the request; keep what came
            pass
        for part, text in splitter.flush():
            show(part, text)
        show.end()
        messages += [{"role": "user", "content": line},
                     {"role": "assistant", "content": splitter.answer.strip()}]  # R1: history without reasoning


# ---------------------------------------------------------------------- experiment
def add_experiment_args(p: argparse.ArgumentParser) -> None:
    from .experiments.command import add_arguments  # the light registry; an experiment loads when it runs
    add_arguments(p)


def cmd_experiment(args: argparse.Namespace) -> None:
    from .experiments.command import run
    run(args)


# ---------------------------------------------------------------------- dispatch
from .serve.launch import add_serve_args, cmd_serve  # noqa: E402  (FastAPI loads only when serving)
from .rl.r1 import add_r1_args, cmd_r1  # noqa: E402
from .serve.feedback_export import add_feedback_args, cmd_feedback  # noqa: E402

# name: (add_arguments, run, help). Each stage of the pipeline adds its row here.
COMMANDS = {
    "info": (add_info_args, cmd_info, "parameters, activated parameters, KV cache, FLOPs"),
    "init": (add_init_args, cmd_init, "write a randomly initialised model and a byte tokenizer"),
    "train": (add_train_args, cmd_train, "pretrain a model on documents (tokenizer trained on the data)"),
    "sft": (add_sft_args, cmd_sft, "supervised fine-tuning on chats, loss on assistant tokens only"),
    "grpo": (add_grpo_args, cmd_grpo, "reinforcement learning with GRPO and rule-based rewards on a task"),
    "rejection-sample": (add_rejection_sample_args, cmd_rejection_sample,
                         "N samples per prompt; the correct, well-formed ones become SFT data"),
    "distill": (add_distill_args, cmd_distill,
                "a teacher's (checkpoint or OpenAI-compatible URL) reasoning traces as SFT data for a student"),
    "eval": (add_eval_args, cmd_eval, "held-out accuracy on a built-in task (greedy, pass@k, sampled pass@1)"),
    "speedrun": (add_speedrun_args, cmd_speedrun, "the whole pipeline on built-in data, ending in report.md"),
    "r1": (add_r1_args, cmd_r1, "the R1 recipe as one resumable run: R1-Zero, or cold start -> RL -> "
                                "rejection sampling + SFT -> RL, with report.md"),
    "generate": (add_generate_args, cmd_generate, "complete a prompt (streams the text)"),
    "chat": (add_chat_args, cmd_chat, "an interactive chat; shows the reasoning apart from the answer"),
    "serve": (add_serve_args, cmd_serve, "an OpenAI-compatible HTTP server (local, behind a proxy, or hybrid)"),
    "feedback": (add_feedback_args, cmd_feedback, "export: the server's rated answers as SFT chats and DPO pairs"),
    "experiment": (add_experiment_args, cmd_experiment, "a claim of the papers as a small training experiment"),
    # ---- later stages (rl, serve, ...) go here ----
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nanoseek", description="The DeepSeek-V3 / R1 system in PyTorch.",
                    epilog="`nanoseek COMMAND --help` shows a command's options and their defaults.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for name, (add_args, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args, status = build_parser(), None, 0
    try:
        if not argv:
            parser.print_help()  # the command list
        else:
            try:
                args = parser.parse_args(argv)
            except SystemExit as e:  # --help, --list-fields: printed, nothing more to do
                status = e.code or 0
        if args is not None:
            if getattr(args, "device", None) is not None:
                resolve_device(args.device)  # a device this machine lacks: before any work
            args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
    except (UsageError, ConfigError, ValueError, FileNotFoundError, TrainingError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"nanoseek: error: {message}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        how = ""
        if hasattr(args, "resume"):  # train, sft, grpo: the same command goes on from the checkpoint
            how = "; continue with: nanoseek " + shlex.join(argv + ([] if "--resume" in argv else ["--resume"]))
        elif getattr(args, "rerun_resumes", False):  # r1: the same command, as it was
            how = "; continue with: nanoseek " + shlex.join(argv)
        print(f"nanoseek: interrupted: {e}{how}", file=sys.stderr)
        return 128 + e.signum  # as a shell reports a command the signal ended
    except KeyboardInterrupt:
        print("nanoseek: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): no traceback, and nothing left for the exit's flush
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (captured in a test)
            pass
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
