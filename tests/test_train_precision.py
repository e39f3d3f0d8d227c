"""Training precision and memory options: `--precision` (fp8 emulated on the CPU, clear
errors), activation checkpointing per block, AdamW with BF16 moments."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import nanoseek
from nanoseek.cli import main
from nanoseek.fp8 import Fp8Unsupported, fp8_modules
from nanoseek.loading import latest_checkpoint
from nanoseek.train.metrics import read_metrics
from nanoseek.train.optim import AdamWBF16Moments, build_optimizer
from nanoseek.train.precision import prepare_precision
from nanoseek.train.recompute import checkpoint_blocks
from nanoseek.train.stages import train_config

DATA = "builtin:arithmetic:level=1:n=200"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tiny_model(**overrides):
    torch.manual_seed(0)
    return nanoseek.Transformer(nanoseek.preset("tiny", vocab_size=256, **overrides))


# ---------------------------------------------------------------------- --precision
def test_precision_fp8_on_the_cpu_trains_emulated_and_can_save_an_fp8_checkpoint(tmp_path, capsys):
    rc, out, err = cli(capsys, "train", "--preset", "tiny", "--data", DATA, "--steps", 3, "--out", tmp_path,
                       "--precision", "fp8", "batch_size=2", "seq_len=32", "final_dtype=fp8")
    assert rc == 0, err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in records)
    # the resumable checkpoints keep the float32 master weights; final/ is in V3's FP8 layout
    latest = latest_checkpoint(tmp_path)
    with safe_open(latest / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.float32
    with safe_open(tmp_path / "final" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv" in f.keys()
    final = nanoseek.from_pretrained(tmp_path / "final")  # dequantized, in the BF16 the config records
    assert final.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
    assert not fp8_modules(final)  # FP8 is how it trained, not what it is


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["precision=fp9"], "train field 'precision' = 'fp9': must be one of auto, bf16, fp32, fp8"),
    (["adam_moments=fp16"], "train field 'adam_moments' = 'fp16': must be one of fp32, bf16"),
    (["activation_checkpointing=1"], "train field 'activation_checkpointing' = 1: must be bool"),
    (["final_dtype=fp16"], "train field 'final_dtype' = 'fp16': must be one of auto, bf16, fp8"),
])
def test_bad_precision_options_are_one_line(tmp_path, capsys, argv, message):
    rc, _, err = cli(capsys, "train", "--preset", "tiny", "--data", DATA, "--steps", 1, "--out", tmp_path, *argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("nanoseek: error: ") and message in err, err


def test_grpo_precision_is_checked_too(tmp_path, capsys):
    rc, _, err = cli(capsys, "grpo", "--model", tmp_path, "--task", "arithmetic", "--out", tmp_path / "g",
                     "precision=fp9")
    assert rc == 2 and "grpo field 'precision' = 'fp9': must be one of auto, bf16, fp32, fp8" in err


def test_fp8_on_a_gpu_without_it_stops_before_touching_the_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.version, "hip", None)
    model = tiny_model()
    with pytest.raises(Fp8Unsupported, match=r"needs a Hopper GPU .* RTX 3090 is 8\.6; use --precision bf16"):
        prepare_precision(model, "fp8", torch.device("cuda"))
    assert not fp8_modules(model)
    assert prepare_precision(model, "fp8", torch.device("cpu")) is None  # emulated, float32 around it
    assert fp8_modules(model)


# ---------------------------------------------------------------------- activation checkpointing
def test_checkpointed_blocks_give_the_same_gradients_and_count_each_token_once():
    ids = torch.randint(0, 256, (2, 32))
    runs = []
    for recompute in (False, True):
        model = tiny_model().train()
        if recompute:
            checkpoint_blocks(model)
        out = model(ids, labels=ids)
        out.loss.backward()
        runs.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                     model.expert_loads(), list(model.state_dict())))
    (loss_a, grads_a, loads_a, keys_a), (loss_b, grads_b, loads_b, keys_b) = runs
    assert loss_a.equal(loss_b) and keys_a == keys_b
    assert grads_a.keys() == grads_b.keys() and all(grads_a[n].equal(grads_b[n]) for n in grads_a)
    assert all(loads_a[i].equal(loads_b[i]) for i in loads_a)  # the recompute did not count again
    assert sum(loads_b[1]) == 2 * 32 * 2  # tokens x experts per token


# ---------------------------------------------------------------------- expert weights cast once a step
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_weights_prepared_once_a_step_train_bit_for_bit_like_at_every_use(precision):
    """2 micro-batches a step, 3 steps: with the weights prepared once a step (the default: the
    linear and expert weights cast to BF16 under autocast; in FP8 training, emulated here, the
    experts' quantized and the output head's cast) or at every use, the same losses, the same
    float32 weights and optimizer state, bit for bit: the cast or quantization is the same
    rounding either way, and the gradient reaches the float32 weight as before. Outside a step
    the layers are the model's own again, and the checkpoint keys do not change. (Without MTP:
    its second use of the head is the next test's.)"""
    from nanoseek.model.moe import Experts
    from nanoseek.train.step import train_step
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (6, 2, 32), generator=
                                                                           torch.Generator().manual_seed(1))]
    runs = []
    for once in (True, False):
        model = tiny_model(num_nextn_predict_layers=0).train()
        keys = list(model.state_dict())
        autocast = prepare_precision(model, precision, torch.device("cpu"))
        kinds = [type(m) for m in model.modules()]
        opt = build_optimizer(model, 1e-3, 0.1)
        losses = [train_step(model, batches[i:i + 2], opt, autocast_dtype=autocast, weights_once=once)["loss"]
                  for i in range(0, 6, 2)]
        assert [type(m) for m in model.modules()] == kinds
        experts = [m for m in model.modules() if isinstance(m, Experts)]
        if precision == "bf16":
            assert experts and all(hasattr(m, "gate_cast") == once for m in experts)
            assert hasattr(model.model.layers[0].self_attn.o_proj, "weight_cast") == once
        else:
            assert experts and not any(m.step_weights for m in experts)  # off outside a step
            assert all(hasattr(m, "gate_q") == once for m in experts)
            assert not hasattr(model.model.layers[0].self_attn.o_proj, "weight_cast")  # an FP8 linear
        assert hasattr(model.lm_head, "weight_cast") == (once and autocast is not None)
        assert list(model.state_dict()) == keys
        runs.append((losses, model.state_dict(), [s["exp_avg"] for s in opt.state.values()]))
    (loss_a, state_a, moments_a), (loss_b, state_b, moments_b) = runs
    assert loss_a == loss_b
    assert all(state_a[k].equal(state_b[k]) for k in state_a)
    assert all(a.equal(b) for a, b in zip(moments_a, moments_b))
    assert not state_a["model.layers.1.mlp.experts.gate_proj"].equal(tiny_model().state_dict()[
        "model.layers.1.mlp.experts.gate_proj"])  # the experts did train


def test_a_weight_used_twice_sums_its_gradients_in_float32():
    """With MTP the output head serves the main and the MTP logits. Autocast's cast cache gives
    both uses one BF16 cast, so their gradients add in BF16; cast once a step, each use's
    gradient enters float32 on its own and they add there. Every other gradient is equal bit
    for bit; the head's differ by the BF16 rounding of that sum at most (2^-9 of it, 2^-8 here
    for the rounding of the float32 sum too)."""
    from nanoseek.train.precision import weights_once_a_step
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    grads = []
    for once in (True, False):
        model = tiny_model().train()
        assert model.config.num_nextn_predict_layers > 0
        with weights_once_a_step(model, torch.bfloat16) if once else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids, labels=ids)
            out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    once, per_use = grads
    assert once.keys() == per_use.keys()
    assert all(once[n].equal(per_use[n]) for n in once if n != "lm_head.weight")
    head_once, head_per_use = once["lm_head.weight"], per_use["lm_head.weight"]
    assert ((head_once - head_per_use).abs() <= 2 ** -8 * head_once.abs()).all()
    assert not head_once.equal(head_per_use)  # the sums did differ: the test sees the case it names


def test_fused_accumulation_adds_the_same_gradients_in_one_pass():
    """Three BF16 micro-batches, cast once a step: adding each one's gradient straight into the
    float32 .grad (fuse_accumulation) gives autograd's sums bit for bit: float32 additions of the
    same BF16 values in the same order. Only the head, shared with MTP, differs: its two uses now
    sum in BF16 before entering float32, each micro-batch's sum rounded by 2^-9 of it at most
    (2^-8 with the float32 roundings). The step's copies leave the context without gradients,
    hooks or requires_grad."""
    from nanoseek.train.precision import weights_once_a_step
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(3)]
    grads, head_sums = [], 0
    for fuse in (False, True):
        model = tiny_model().train()
        with weights_once_a_step(model, torch.bfloat16, fuse_accumulation=fuse):
            for ids in batches:
                before = 0 if model.lm_head.weight.grad is None else model.lm_head.weight.grad.clone()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(ids, labels=ids)
                (out.loss / 3).backward()
                if not fuse:  # Σ over micro-batches of |this one's head gradient|
                    head_sums = head_sums + (model.lm_head.weight.grad - before).abs()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        casts = [b for n, b in model.named_buffers() if n.endswith("_cast")]
        assert casts and all(b.grad is None and not b.requires_grad for b in casts)
        assert not any(b._post_accumulate_grad_hooks for b in casts)
    autograd, fused = grads
    assert autograd.keys() == fused.keys()
    assert all(fused[n].equal(autograd[n]) for n in fused if n != "lm_head.weight")
    head, head_fused = autograd["lm_head.weight"], fused["lm_head.weight"]
    assert ((head_fused - head).abs() <= 2 ** -8 * head_sums).all() and not head_fused.equal(head)


def fp8_steps_grads(fuse: bool, compile_backend=None, **overrides) -> tuple[list[dict], set[str], nn.Module]:
    """Two optimizer steps of two FP8-emulated micro-batches each (compiled with torch.compile's
    `compile_backend`, if given): every gradient the optimizer is handed (after clipping) at each
    step, the names of the parameters whose gradient hooks fired, and the model."""
    from nanoseek.fp8 import convert_to_fp8
    from nanoseek.train.step import train_step
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(4)]
    model = tiny_model(**overrides).train()
    convert_to_fp8(model, device="cpu")
    compiled = None if compile_backend is None else torch.compile(model, fullgraph=True, backend=compile_backend)
    opt = build_optimizer(model, 1e-3)
    seen, fired = [], set()
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: fired.add(name))
    opt.register_step_pre_hook(lambda *_: seen.append({n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}))
    for step in range(2):
        micro = [{"input_ids": ids, "labels": ids} for ids in batches[2 * step:2 * step + 2]]
        train_step(model, micro, opt, compiled=compiled, base_model=model, fuse_accumulation=fuse)
    return seen, fired, model


def test_fp8_experts_fused_accumulation_adds_in_the_wgrad_as_autograd_does():
    """FP8 training's fused accumulation: the routed experts' wgrad adds each micro-batch's
    gradient into a float32 buffer, which becomes the weight's .grad at the step's end. Every
    gradient equals autograd's sum bit for bit (float32 additions of the same values in the
    same order: 0 + dw1 is dw1), at the first step and at the second, after zero_grad dropped
    the buffers from .grad; so do the weights the optimizer then makes. Autograd never sees
    those gradients (their hooks do not fire), and the buffers stay out of the checkpoint."""
    from nanoseek.fp8 import Fp8TrainExperts
    (autograd, fired_plain, plain), (fused, fired, model) = fp8_steps_grads(False), fp8_steps_grads(True)
    experts = [m for m in model.modules() if isinstance(m, Fp8TrainExperts)]
    expert_weights = {n for n, _ in model.named_parameters() if ".experts." in n}
    assert len(expert_weights) == 9 and fired_plain - fired == expert_weights and fired <= fired_plain
    assert len(experts) == 3 and not any(hasattr(m, "gate_grad") for m in plain.modules())  # 2 MoE layers, MTP's
    for m in experts:  # the last step's .grad were these buffers, each with every expert's gradient
        assert not m.grad_into and m.gate_proj.grad is None  # (zero_grad dropped it)
        assert all((getattr(m, name).flatten(1).abs().sum(1) > 0).all() for name in m.GRADS)
    assert len(autograd) == len(fused) == 2
    for a, f in zip(autograd, fused):
        assert a.keys() == f.keys() and all(f[n].equal(a[n]) for n in a)
    assert all(p.equal(q) for p, q in zip(plain.parameters(), model.parameters()))
    assert list(model.state_dict()) == list(plain.state_dict())


def test_fp8_experts_fused_accumulation_adds_to_a_gradient_already_there():
    """A step entered with gradients already in .grad (no zero_grad since) adds to them, fused
    or not, bit for bit alike."""
    from nanoseek.fp8 import convert_to_fp8
    from nanoseek.train.precision import weights_once_a_step
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    grads = []
    for fuse in (False, True):
        model = tiny_model().train()
        convert_to_fp8(model, device="cpu")
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        with weights_once_a_step(model, None, fuse_accumulation=fuse):
            model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, fused = grads
    assert all(fused[n].equal(plain[n]) for n in plain)


@pytest.mark.slow
def test_fp8_experts_fused_accumulation_traces_whole_and_compiles_once():
    """The same two steps compiled (fullgraph, through AOTAutograd: Inductor's CPU code
    generation fails on the FP8 model with or without fused accumulation), the fused run's
    backward graph writing the experts' gradient buffers: each model compiles once for both steps
    (the same buffers and flags each step) and the fused run's gradients equal the plain run's
    bit for bit."""
    from torch._dynamo.testing import CompileCounterWithBackend
    runs = []
    for fuse in (False, True):
        counter = CompileCounterWithBackend("aot_eager")
        grads, _, _ = fp8_steps_grads(fuse, counter, num_hidden_layers=2)
        assert counter.frame_count == 1 and len(grads) == 2
        runs.append(grads)
    autograd, fused = runs
    for a, f in zip(autograd, fused):
        assert a.keys() == f.keys() and all(f[n].equal(a[n]) for n in a)


def test_weights_cast_once_only_where_autocast_lowers_float32():
    """No autocast, or weights already in the compute dtype: nothing to cast. In FP8 training,
    the MLPs' linears (read by the FP8 GEMMs) are left alone."""
    from nanoseek.fp8 import convert_to_fp8
    from nanoseek.model.moe import Experts
    from nanoseek.train.precision import step_cast_layers
    assert step_cast_layers(tiny_model(), None) == []
    assert step_cast_layers(tiny_model().to(torch.bfloat16), torch.bfloat16) == []
    model = tiny_model()
    assert step_cast_layers(model, torch.float32) == []
    layers = step_cast_layers(model, torch.bfloat16)
    assert sum(isinstance(m, Experts) for m in layers) == sum(isinstance(m, Experts) for m in model.modules()) > 0
    assert sum(isinstance(m, torch.nn.Linear) for m in layers) == sum(
        isinstance(m, torch.nn.Linear) for m in model.modules())
    convert_to_fp8(model)
    assert [type(m).__name__ for m in step_cast_layers(model, torch.bfloat16)] == ["Linear"]  # the head


def test_one_eager_micro_batch_casts_at_every_use():
    """One micro-batch, not compiled: autocast's own cast serves the forward and its backward,
    so casting once a step would save nothing; the step leaves the layers alone."""
    from nanoseek.train.step import train_step
    model = tiny_model().train()
    ids = torch.randint(0, 256, (2, 32))
    train_step(model, [{"input_ids": ids, "labels": ids}], build_optimizer(model, 1e-3), autocast_dtype=torch.bfloat16)
    assert not any(hasattr(m, "weight_cast") or hasattr(m, "gate_cast") for m in model.modules())
    train_step(model, [{"input_ids": ids, "labels": ids}] * 2, build_optimizer(model, 1e-3),
               autocast_dtype=torch.bfloat16)
    assert hasattr(model.lm_head, "weight_cast")


# ---------------------------------------------------------------------- BF16 moments
def test_adamw_with_bf16_moments_tracks_float32_adamw():
    """The same 10 steps from the same gradients. Bound: each step stores m and v rounded to
    BF16 (relative 2^-9); through the moving averages the stored moments drift from float32's
    by at most 2^-9/(1 - β) relative (2^-9·10 for m, 2^-9·20 for v), so each update m̂/√v̂
    differs by at most 2^-9·(10 + 20/2) = 4% of its size, and Adam's update is at most
    (1-β1)/√(1-β2)/(1 - β1/√β2) ≈ 5.8 times lr: |Δp| <= steps · 4% · lr · 6."""
    g = torch.Generator().manual_seed(0)
    p32, p16 = (torch.nn.Parameter(torch.randn(64, 64, generator=g)) for _ in range(2))
    p16.data.copy_(p32.data)
    lr, steps = 1e-2, 10
    ref = torch.optim.AdamW([p32], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    opt = AdamWBF16Moments([p16], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps):
        grad = torch.randn(64, 64, generator=g)
        p32.grad, p16.grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
    state = opt.state[p16]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and float(state["step"]) == steps
    moved = (p32.detach() - p16.detach()).abs().max().item()
    assert moved <= steps * 0.04 * lr * 6
    assert (p32.detach() - p16.detach()).abs().max() > 0  # it is not float32 AdamW under another name


def test_train_fields_for_memory_train_and_resume(tmp_path):
    from nanoseek.data.loader import PackedLoader
    from nanoseek.train.trainer import Trainer
    docs = [torch.randint(3, 256, (40,)).tolist() for _ in range(40)]

    def trainer(steps):
        cfg = train_config(steps=steps, batch_size=2, seq_len=32, warmup=1, activation_checkpointing=True,
                           adam_moments="bf16")
        return Trainer(tiny_model(), PackedLoader(docs, batch_size=2, seq_len=32), cfg, tmp_path)
    first = trainer(2)
    records = first.fit(progress=False)
    assert isinstance(first.optimizer, AdamWBF16Moments)
    assert all(math.isfinite(r["loss"]) for r in records)
    resumed = trainer(3)
    resumed.fit(resume=True, progress=False)
    assert resumed.step == 3
    exp_avg = [s["exp_avg"] for s in resumed.optimizer.state.values()]
    assert exp_avg and all(t.dtype == torch.bfloat16 for t in exp_avg)
    assert build_optimizer(tiny_model(), 1e-3).__class__ is torch.optim.AdamW  # the default


def test_bf16_with_weights_cast_once_resumes_bit_for_bit(tmp_path):
    """BF16 autocast, 2 micro-batches a step (the weights cast once a step): 4 steps at once, or
    2 steps then a resume to 4, end with the same weights. The step's casts are buffers that are
    not saved, and each step makes them anew from the float32 weights."""
    from nanoseek.data.loader import PackedLoader
    from nanoseek.train.trainer import Trainer
    docs = [torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(40)]

    def trainer(steps, out):
        cfg = train_config(steps=steps, batch_size=2, seq_len=32, warmup=1, grad_accum=2, precision="bf16",
                           save_every=2)
        return Trainer(tiny_model(), PackedLoader(docs, batch_size=2, seq_len=32), cfg, out)
    whole = trainer(4, tmp_path / "whole")
    whole.fit(progress=False)
    trainer(2, tmp_path / "split").fit(progress=False)
    resumed = trainer(4, tmp_path / "split")
    resumed.fit(resume=True, progress=False)
    assert hasattr(whole.model.lm_head, "weight_cast") and resumed.step == 4
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_grpo_in_fp8_updates_the_policy_through_the_fp8_layers(tmp_path):
    from nanoseek.data.tokenizer import ChatTokenizer, byte_tokenizer
    from nanoseek.rl.trainer import GRPOTrainer, grpo_config
    cfg = grpo_config(group_size=2, prompts_per_step=2, max_new_tokens=6, lr=1e-3, steps=1, beta=0.0,
                      precision="fp8", rewards={"length": 1.0})

    def length(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.preset("tiny"))
    trainer = GRPOTrainer(model, ChatTokenizer(byte_tokenizer(1024)), "arithmetic", cfg, tmp_path,
                          reward_funcs={"length": length})
    assert trainer.autocast is None and fp8_modules(trainer.model)  # the CPU: emulated, float32 around it
    before = trainer.model.model.layers[0].self_attn.kv_b_proj.weight.detach().clone()
    stats = trainer.train_step()  # rollouts in eval mode (BF16 layers), the update in train mode (FP8)
    assert math.isfinite(stats["loss"]) and not stats["skipped"]
    assert not trainer.model.model.layers[0].self_attn.kv_b_proj.weight.equal(before)


@pytest.mark.parametrize("field, shown", [({"precision": "fp8"}, "precision=fp8"),
                                          ({"activation_checkpointing": True}, "activation_checkpointing=true")])
def test_parallel_runs_refuse_fp8_and_recompute_for_now(tmp_path, field, shown):
    from nanoseek.parallel.mesh import ParallelConfig, ParallelError
    from nanoseek.parallel.trainer import ParallelTrainer
    cfg = train_config(steps=1, batch_size=2, seq_len=32, **field)
    with pytest.raises(ParallelError, match=f"^{shown} is not supported with --dp/--ep/--pp yet; drop it$"):
        ParallelTrainer(tiny_model(), None, cfg, tmp_path, ParallelConfig(dp=1))


def rounding_flips_only(got, want, w: torch.Tensor) -> str | None:
    """None when two 128x128 block quantizations of w have the same scales and the same E4M3
    bytes except where the exact quotient w / scale sits within 4 float32 ulps of the midpoint
    between two neighbouring E4M3 values, and the bytes there are those two neighbours: a
    division that is not correctly rounded (Triton's float32 `/`, within 2 ulps) can land on
    either side there and nowhere else. Otherwise, what differs."""
    from nanoseek.fp8.quant import dequantize, spread_scales
    if not torch.equal(got.scale, want.scale):
        return "the scales differ"
    a, b = got.data.view(torch.uint8), want.data.view(torch.uint8)
    where = (a != b).nonzero(as_tuple=True)
    if not where[0].numel():
        return None
    codes_apart = (a[where].int() - b[where].int()).abs()
    if (codes_apart != 1).any():
        return f"{int((codes_apart != 1).sum())} bytes differ by more than one E4M3 step"
    scale = spread_scales(want.scale, want.block, w.shape)
    quotient = w.double()[where] / scale.double()[where]
    midpoint = (dequantize(got).double()[where] + dequantize(want).double()[where]) / 2 / scale.double()[where]
    off = ((quotient - midpoint).abs() / midpoint.abs()).max().item()
    if off > 4 * 2.0 ** -24:
        return f"a differing byte's quotient lies {off:.1e} (relative) from the rounding boundary"
    return None


def test_rounding_flips_only_accepts_division_flips_and_nothing_else():
    """The GPU test's yardstick, on the CPU: a division off by one float32 ulp (a random
    direction per element) passes against quantize, planted rounding ties included; a byte
    moved one step from where E4M3 holds its quotient exactly, or a changed scale, does not."""
    from nanoseek.fp8.quant import FP8_DTYPE, FP8_MAX, WEIGHT_BLOCK, Quantized, quantize, spread_scales
    torch.manual_seed(0)
    w = torch.randn(4, 512, 1000) * torch.rand(4, 1, 1) * 3
    scale = spread_scales(quantize(w, WEIGHT_BLOCK).scale, WEIGHT_BLOCK, w.shape)
    # plant quotients at midpoints between neighbouring E4M3 values, all below 0.5 (the scales are
    # taken again after, should a plant replace a block's largest value)
    grid = torch.arange(0x08, 0x30, dtype=torch.uint8).view(FP8_DTYPE).float()
    ties = torch.randint(0, w.numel(), (200,))
    midpoints = ((grid[:-1] + grid[1:]) / 2)[torch.randint(0, grid.numel() - 1, (200,))]
    w.view(-1)[ties] = midpoints * scale.reshape(-1)[ties]
    want = quantize(w, WEIGHT_BLOCK)
    scale = spread_scales(want.scale, WEIGHT_BLOCK, w.shape)
    quotient = w / scale
    sloppy = torch.nextafter(quotient, torch.where(torch.rand_like(w) < 0.5, -torch.inf, torch.inf))
    data = sloppy.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    got = Quantized(data, want.scale, want.block)
    assert rounding_flips_only(got, want, w) is None
    assert rounding_flips_only(Quantized(want.data, want.scale * 2, want.block), want, w) == "the scales differ"
    flips = int((data.view(torch.uint8) != want.data.view(torch.uint8)).sum())
    assert flips > 0  # the yardstick was exercised, not only passed
    # the byte whose quotient E4M3 holds most exactly: a neighbour of it is half a step off
    off_B = (w.double() / scale.double() - want.data.double()).abs() + (want.data.float().abs() > 200) * 1e9
    i = [int(j) for j in torch.unravel_index(off_B.argmin(), off_B.shape)]
    moved = want.data.clone()
    moved.view(torch.uint8)[tuple(i)] += 1
    assert "from the rounding boundary" in rounding_flips_only(Quantized(moved, want.scale, want.block), want, w)
    moved.view(torch.uint8)[tuple(i)] += 1
    assert "more than one E4M3 step" in rounding_flips_only(Quantized(moved, want.scale, want.block), want, w)


@pytest.mark.gpu
def test_gpu_compiled_once_a_step_quantization_matches_eager():
    """A compiled step quantizes its expert weights compiled too (precision.quantize_into):
    the same scales as the eager quantize, ragged edges and a zero block included, and the same
    FP8 bytes but where Triton's division rounds a quotient at an E4M3 boundary the other way
    (4 of 23M bytes on an H100)."""
    from nanoseek.fp8.quant import WEIGHT_BLOCK, Quantized, block_scale_shape, quantize
    from nanoseek.train.precision import quantize_into
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    for shape in ((4, 200, 300), (8, 1408, 2048)):
        w = torch.randn(shape, device="cuda") * torch.rand(shape[0], 1, 1, device="cuda") * 3
        w[0, :128, :128] = 0
        data = torch.empty_like(w, dtype=torch.float8_e4m3fn)
        scale = torch.empty(block_scale_shape(w.shape, WEIGHT_BLOCK), device="cuda")
        quantize_into(w, data, scale, compiled=True)
        assert scale[0, 0, 0] == 1
        assert rounding_flips_only(Quantized(data, scale, WEIGHT_BLOCK), quantize(w, WEIGHT_BLOCK), w) is None


def test_once_a_step_quantization_that_fails_to_compile_goes_on_eagerly(monkeypatch):
    """precision.quantize_into: a compiler failure warns once and quantizes eagerly (the same
    bytes), and later calls do not try to compile again."""
    from nanoseek.fp8.quant import WEIGHT_BLOCK, block_scale_shape, quantize
    from nanoseek.train import precision
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("Inductor could not generate code")

    monkeypatch.setattr(precision, "_compiled_quantize_into", broken)
    w = torch.randn(2, 200, 300)
    data, scale = torch.empty_like(w, dtype=torch.float8_e4m3fn), torch.empty(block_scale_shape(w.shape, WEIGHT_BLOCK))
    with pytest.warns(UserWarning, match="quantizing eagerly"):
        precision.quantize_into(w, data, scale, compiled=True)
    q = quantize(w, WEIGHT_BLOCK)
    assert torch.equal(scale, q.scale) and torch.equal(data.view(torch.uint8), q.data.view(torch.uint8))
    precision.quantize_into(w * 2, data, scale, compiled=True)
    assert len(calls) == 1 and precision._compiled_quantize_into is False
    assert torch.equal(scale, quantize(w * 2, WEIGHT_BLOCK).scale)
