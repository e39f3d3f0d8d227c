"""hf.py: HF-layout safetensors in and out, against transformers' own DeepSeek-V2/V3 models."""

import copy
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.hf import (CheckpointError, dequantize_fp8_blockwise, from_pretrained,
                         quantize_fp8_blockwise, save_pretrained)
from nanoseek.model import Transformer

# ---------------------------------------------------------------- tiny configs
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=128)
V3 = dict(TINY, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
          routed_scaling_factor=2.5, n_group=2, topk_group=1, num_nextn_predict_layers=1)
V2 = dict(TINY, scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=2.0,
          num_nextn_predict_layers=0)


def yarn(mscale, mscale_all_dim):
    return {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


CASES = {
    "v3": dict(V3),
    "v3-no-q-lora-one-group-no-dense": dict(V3, q_lora_rank=None, n_group=1, topk_group=1,
                                            first_k_dense_replace=0),
    "v3-yarn-two-dense": dict(V3, first_k_dense_replace=2, rope_scaling=yarn(1.0, 0.707)),
    "v2-greedy-no-q-lora-yarn": dict(V2, topk_method="greedy", q_lora_rank=None,
                                     rope_scaling=yarn(0.707, 0.707)),
    "v2-group-limited": dict(V2, topk_method="group_limited_greedy", n_group=4, topk_group=2),
}
SEQ = 40  # longer than YaRN's original 32 positions, so the scaling matters


def randomize_(named_tensors):
    """Non-trivial values everywhere: norms around 1, router biases that change the routing."""
    with torch.no_grad():
        for name, t in named_tensors:
            if "inv_freq" in name:
                continue
            if "norm" in name:
                t.normal_(1.0, 0.2)
            else:  # e_score_correction_bias included: sigmoid scores differ by about as much
                t.normal_(0.0, 0.1)


def nanoseek_model(**kw) -> Transformer:
    model = Transformer(ModelConfig(**kw))
    randomize_(model.state_dict(keep_vars=True).items())
    return model.eval()


def hf_config(cfg: ModelConfig):
    """The same model as transformers' own config class describes it (not via our to_dict)."""
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"},
                "rope_type": "yarn", "rope_theta": cfg.rope_theta}
    names = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
             "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
             "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
             "routed_scaling_factor", "first_k_dense_replace", "norm_topk_prob",
             "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"]
    kw = {n: getattr(cfg, n) for n in names}
    kw["num_key_value_heads"] = cfg.num_attention_heads
    if cfg.scoring_func == "sigmoid":
        return transformers.DeepseekV3Config(**kw, rope_parameters=rope)
    return transformers.DeepseekV2Config(**kw, rope_parameters=rope, topk_method=cfg.topk_method)


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


# ---------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_what_nanoseek_saves(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = nanoseek_model(**CASES[case])
    save_pretrained(model, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ck", dtype=torch.float32, attn_implementation="eager").eval()
    expected = "DeepseekV3ForCausalLM" if case.startswith("v3") else "DeepseekV2ForCausalLM"
    assert type(hf).__name__ == expected
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ))
    ours, theirs = logits(model, ids), logits(hf, ids)
    assert ours.abs().max() > 0.5  # logits of a size where an error would show
    assert max_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_loads_what_transformers_saves(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**CASES[case])
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="eager")
    randomize_([*hf.named_parameters(), *hf.named_buffers()])
    hf.eval().save_pretrained(tmp_path / "hf")
    if case.startswith("v3"):  # transformers writes no MTP layer, though num_mtp_layers=1
        with pytest.warns(UserWarning, match="MTP"):
            model = nanoseek.from_pretrained(tmp_path / "hf")
    else:
        model = nanoseek.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ))
    ours, theirs = logits(model, ids), logits(hf, ids)
    assert ours.abs().max() > 0.5
    assert max_err(ours, theirs) <= 1e-4
    if case.startswith("v3"):  # the correction bias arrived and decides the routing
        for router in model.routers().values():
            assert router.e_score_correction_bias.abs().min() > 0
            router.e_score_correction_bias.zero_()
        assert max_err(logits(model, ids), theirs) > 1e-3


def test_transformers_loads_a_dense_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = nanoseek_model(**dict(V3, n_routed_experts=0, first_k_dense_replace=0))
    save_pretrained(model, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ck", dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ))
    assert max_err(logits(model, ids), logits(hf, ids)) <= 1e-4


def test_transformers_fused_expert_layout_loads(tmp_path):
    """transformers 5's in-memory layout (gate_up_proj [E, 2F, D]) written as it is."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**dict(V3, num_nextn_predict_layers=0))
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(cfg), attn_implementation="eager")
    randomize_([*hf.named_parameters(), *hf.named_buffers()])
    hf.eval()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    (tmp_path / "ck").mkdir()
    save_file(state, tmp_path / "ck" / "model.safetensors")
    (tmp_path / "ck" / "config.json").write_text(hf.config.to_json_string())
    with pytest.warns(UserWarning, match="MTP"):  # transformers' default num_mtp_layers=1
        model = from_pretrained(tmp_path / "ck")
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ))
    assert max_err(logits(model, ids), logits(hf, ids)) <= 1e-4


def test_transformers_reads_sharded_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = nanoseek_model(**V3)
    save_pretrained(model, tmp_path / "ck", max_shard_bytes=20_000)
    assert (tmp_path / "ck" / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ck", dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ))
    assert max_err(logits(model, ids), logits(hf, ids)) <= 1e-4


# ---------------------------------------------------------------- layout
def test_checkpoint_layout_and_round_trip(tmp_path):
    model = nanoseek_model(**V3)
    save_pretrained(model, tmp_path / "ck")
    keys = load_file(tmp_path / "ck" / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert keys["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (32, 16)
    assert keys["model.layers.1.mlp.experts.3.gate_proj.weight"].equal(
        model.model.layers[1].mlp.experts.gate_proj[3])
    assert keys["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not any(".mlp.experts.gate_proj" in k or "inv_freq" in k or k.endswith(".load") for k in keys)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["dtype"] == "float32"

    loaded = from_pretrained(tmp_path / "ck")
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and a.equal(b), name
    assert loaded.model.rotary.inv_freq.equal(model.model.rotary.inv_freq)
    assert all(r.load.eq(0).all() for r in loaded.routers().values())


@pytest.mark.parametrize("kw", [
    dict(V3, n_routed_experts=0, first_k_dense_replace=0),  # dense MLA, with a dense MTP layer
    dict(V3, attention_type="mha", num_nextn_predict_layers=0),  # nanoseek-only baselines
    dict(V2, attention_type="gqa", num_key_value_heads=1, topk_method="greedy"),
], ids=["dense", "mha", "gqa"])
def test_dense_and_baseline_models_round_trip(tmp_path, kw):
    model = nanoseek_model(**kw)
    save_pretrained(model, tmp_path / "ck")
    loaded = from_pretrained(tmp_path / "ck")
    assert loaded.config.is_moe == model.config.is_moe
    assert loaded.config.attention_type == model.config.attention_type
    ids = torch.randint(0, 96, (2, 16))
    assert logits(loaded, ids).equal(logits(model, ids))


def test_mtp_layers_hold_copies_of_the_shared_embedding_and_head(tmp_path):
    L = V3["num_hidden_layers"]
    model = nanoseek_model(**dict(V3, num_nextn_predict_layers=2))
    save_pretrained(model, tmp_path / "ck")
    keys = load_file(tmp_path / "ck" / "model.safetensors")
    for k in (L, L + 1):
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "self_attn.kv_b_proj.weight", "mlp.experts.0.up_proj.weight"):
            assert f"model.layers.{k}.{suffix}" in keys
        assert keys[f"model.layers.{k}.embed_tokens.weight"].equal(model.model.embed_tokens.weight)
        assert keys[f"model.layers.{k}.shared_head.head.weight"].equal(model.lm_head.weight)
    assert f"model.layers.{L + 2}.enorm.weight" not in keys

    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model(ids, return_mtp=True).mtp_logits
    copies = {f"model.layers.{k}.{s}" for k in (L, L + 1)
              for s in ("embed_tokens.weight", "shared_head.head.weight")}
    for drop_copies in (False, True):
        if drop_copies:  # checkpoints without the copies load too
            save_file({k: v for k, v in keys.items() if k not in copies},
                      tmp_path / "ck" / "model.safetensors")
        loaded = from_pretrained(tmp_path / "ck")
        assert len(loaded.mtp_layers) == 2
        with torch.no_grad():
            out = loaded(ids, return_mtp=True).mtp_logits
        assert all(a.equal(b) for a, b in zip(ref, out)) and len(out) == 2


def test_tied_embeddings_store_no_head(tmp_path):
    model = nanoseek_model(**dict(V3, tie_word_embeddings=True))
    save_pretrained(model, tmp_path / "ck")
    keys = load_file(tmp_path / "ck" / "model.safetensors")
    assert "lm_head.weight" not in keys
    assert keys["model.layers.3.shared_head.head.weight"].equal(model.model.embed_tokens.weight)
    loaded = from_pretrained(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 8))
    assert logits(loaded, ids).equal(logits(model, ids))


def test_sharded_save_round_trips_through_the_index(tmp_path):
    model = nanoseek_model(**V3)
    save_pretrained(model, tmp_path / "ck", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors" not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    total, seen = 0, set()
    for shard in shards:
        with safe_open(tmp_path / "ck" / shard, "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
                seen.add(k)
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == seen
    loaded = from_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 96, (2, 16))
    assert logits(loaded, ids).equal(logits(model, ids))
    (tmp_path / "ck" / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]):
        from_pretrained(tmp_path / "ck")


# ---------------------------------------------------------------- atomic save
def test_save_replaces_an_existing_checkpoint_completely(tmp_path):
    model = nanoseek_model(**V3)
    save_pretrained(model, tmp_path / "ck", max_shard_bytes=20_000)
    save_pretrained(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directories left


def test_a_crash_while_saving_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    import nanoseek.hf as hf
    old = nanoseek_model(**V3)
    save_pretrained(old, tmp_path / "ck", max_shard_bytes=20_000)
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(nanoseek_model(**V3), tmp_path / "ck", max_shard_bytes=20_000)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    ids = torch.randint(0, 96, (1, 8))
    assert logits(from_pretrained(tmp_path / "ck"), ids).equal(logits(old, ids))


# ---------------------------------------------------------------- dtypes
def test_to_dtype_casts_as_from_pretrained_loads(tmp_path):
    """hf.to_dtype on a model in memory gives what saving and loading in that dtype gives."""
    from nanoseek.hf import to_dtype
    model = nanoseek_model(**V3)
    save_pretrained(model, tmp_path / "ck", dtype=torch.bfloat16)
    loaded = from_pretrained(tmp_path / "ck")
    cast = to_dtype(copy.deepcopy(model), torch.bfloat16)
    want = {**loaded.state_dict(), "model.rotary.inv_freq": loaded.model.rotary.inv_freq}
    got = {**cast.state_dict(), "model.rotary.inv_freq": cast.model.rotary.inv_freq}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert cast.model.rotary.inv_freq.dtype == torch.float32 and cast.routers()[1].weight.dtype == torch.float32


def test_bf16_keeps_the_router_in_float32(tmp_path):
    model = nanoseek_model(**V3)
    save_pretrained(model, tmp_path / "ck", dtype=torch.bfloat16)
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["dtype"] == "bfloat16"

    for loaded in (from_pretrained(tmp_path / "ck"),  # dtype from config.json
                   nanoseek.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)):
        assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
        assert loaded.model.layers[1].mlp.experts.up_proj.dtype == torch.bfloat16
        for router in loaded.routers().values():
            assert router.weight.dtype == torch.float32
            assert router.e_score_correction_bias.dtype == torch.float32
        assert loaded.model.rotary.inv_freq.dtype == torch.float32
        ids = torch.randint(0, 96, (2, 16))
        out, ref = logits(loaded, ids).float(), logits(model, ids)
        assert out.isfinite().all()
        assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()

    f32 = from_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert f32.model.embed_tokens.weight.dtype == torch.float32


# ---------------------------------------------------------------- FP8
def test_fp8_block_quantization_matches_a_per_block_reference():
    w = torch.randn(300, 200) * torch.linspace(0.1, 3, 200)
    q, scale_inv = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 2)
    ref = torch.empty_like(w)
    for i in range(3):
        for j in range(2):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = block.abs().max() / 448
            assert scale_inv[i, j] == s
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s).to(torch.float8_e4m3fn).float() * s
    dq = dequantize_fp8_blockwise(q, scale_inv)
    assert dq.equal(ref)
    assert ((dq - w).abs() <= 0.07 * w.abs() + 2e-3 * scale_inv.max()).all()  # 3 mantissa bits


def test_official_fp8_checkpoint_is_dequantised_on_load(tmp_path):
    # intermediate 160, vocab 200: weights of several 128x128 blocks with partial edges
    model = nanoseek_model(**dict(V3, intermediate_size=160, vocab_size=200))
    save_pretrained(model, tmp_path / "ck")
    keys = load_file(tmp_path / "ck" / "model.safetensors")
    fp8, dequantised = {}, {}
    for k, v in keys.items():
        quantize = (v.dim() == 2 and k.endswith(".weight") and ".mlp.gate." not in k
                    and "embed_tokens" not in k and "head" not in k)
        if quantize:  # what the official V3/R1 checkpoints quantise
            q, s = quantize_fp8_blockwise(v)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            dequantised[k] = dequantize_fp8_blockwise(q, s)
        else:
            fp8[k] = dequantised[k] = v
    assert fp8["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    assert fp8["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    assert fp8["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == torch.float8_e4m3fn

    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config.update(torch_dtype="bfloat16", quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [128, 128]})
    config.pop("dtype")
    for name, tensors in (("fp8", fp8), ("reference", dequantised)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps(config))

    loaded = from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    reference = from_pretrained(tmp_path / "reference", dtype=torch.float32)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert a.equal(b), name
    ids = torch.randint(0, 200, (2, 16))
    out = logits(loaded, ids)
    assert out.equal(logits(reference, ids))
    ref = logits(model, ids)
    # FP8 weights (3 mantissa bits, a few routing flips): close to the original, not equal
    assert torch.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.95

    assert "quantization_config" not in loaded.config.extra  # the loaded model is not FP8
    assert from_pretrained(tmp_path / "fp8").model.embed_tokens.weight.dtype == torch.bfloat16
    save_pretrained(loaded, tmp_path / "resaved")
    assert "quantization_config" not in json.loads((tmp_path / "resaved" / "config.json").read_text())

    del fp8["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(fp8, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv"):
        from_pretrained(tmp_path / "fp8")


# ---------------------------------------------------------------- errors
@pytest.fixture
def checkpoint(tmp_path):
    """A saved V3 model and its tensors, to be edited and written back."""
    save_pretrained(nanoseek_model(**V3), tmp_path / "ck")
    return tmp_path / "ck", load_file(tmp_path / "ck" / "model.safetensors")


def rewrite(ck, tensors):
    save_file(tensors, ck / "model.safetensors")


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.kv_b_proj.weight",
                                 "model.layers.2.mlp.experts.3.up_proj.weight",
                                 "model.layers.1.mlp.gate.e_score_correction_bias",
                                 "lm_head.weight"])
def test_missing_key_is_named(checkpoint, key):
    ck, tensors = checkpoint
    del tensors[key]
    rewrite(ck, tensors)
    with pytest.raises(CheckpointError, match=f"missing key.*{key.replace('.', '[.]')}"):
        from_pretrained(ck)
    loaded = from_pretrained(ck, strict=False)  # keeps a fresh init for it
    assert loaded.state_dict()["model.embed_tokens.weight"].equal(tensors["model.embed_tokens.weight"])


def test_wrong_shape_names_the_key_and_both_shapes(checkpoint):
    ck, tensors = checkpoint
    tensors["model.layers.2.self_attn.q_a_proj.weight"] = torch.zeros(24, 33)
    rewrite(ck, tensors)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(ck, strict=False)
    msg = str(e.value)
    assert "model.layers.2.self_attn.q_a_proj.weight" in msg
    assert "[24, 33]" in msg and "[24, 32]" in msg


def test_expert_shapes_follow_the_config(checkpoint):
    ck, _ = checkpoint
    config = json.loads((ck / "config.json").read_text())
    config["moe_intermediate_size"] = 24
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"experts\.0\.down_proj\.weight.*\[32, 16\].*\[32, 24\]"):
        from_pretrained(ck)


def test_unexpected_key_is_named(checkpoint):
    ck, tensors = checkpoint
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(4, 4)
    tensors["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(16, 32)  # E = 8
    tensors["model.rotary_emb.inv_freq"] = torch.zeros(4)  # derived: ignored, not unexpected
    rewrite(ck, tensors)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(ck)
    assert "unexpected key(s) model.layers.0.self_attn.k_proj.weight" in str(e.value)
    assert "model.layers.1.mlp.experts.8.up_proj.weight" in str(e.value)
    from_pretrained(ck, strict=False)


@pytest.mark.parametrize("content", [b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_a_file_that_is_not_safetensors_gives_a_clear_error(checkpoint, content):
    ck, _ = checkpoint
    (ck / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        from_pretrained(ck)


def test_pickles_are_never_loaded(checkpoint, tmp_path, monkeypatch):
    ck, _ = checkpoint
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ck / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("pickle used"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    from_pretrained(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        from_pretrained(ck)
    assert not marker.exists()


def test_save_over_existing_dir_keeps_tokenizer_and_drops_old_shards(tmp_path):
    import nanoseek
    from nanoseek.config import preset
    from nanoseek.model import Transformer
    out = tmp_path / "ckpt"
    save_pretrained(Transformer(preset("tiny")), out, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    (out / "tokenizer.json").write_text("{}")
    model = Transformer(preset("tiny"))
    save_pretrained(model, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"], names
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)
    back = nanoseek.from_pretrained(out)
    ids = torch.randint(0, 1024, (1, 8))
    torch.testing.assert_close(back(ids).logits, model.eval()(ids).logits)


# ---------------------------------------------------------------- FP8 out
def test_save_pretrained_fp8_writes_the_official_layout_and_loads_back(tmp_path):
    from nanoseek.hf import stored_in_fp8, to_hf_state_dict
    # intermediate 160, vocab 200: weights of several 128x128 blocks with partial edges
    model = nanoseek_model(**dict(V3, intermediate_size=160, vocab_size=200))
    save_pretrained(model, tmp_path / "ck", dtype=torch.float8_e4m3fn)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    original = {k: v.detach() for k, v in to_hf_state_dict(model).items()}
    loaded = from_pretrained(tmp_path / "ck", dtype=torch.float32)
    ours = {k: v for k, v in to_hf_state_dict(loaded).items()}
    assert stored["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    for key, v in original.items():
        if stored_in_fp8(key, v):
            q, s = quantize_fp8_blockwise(v)
            assert stored[key].equal(q) and stored[key + "_scale_inv"].equal(s), key
            assert ours[key].equal(dequantize_fp8_blockwise(q, s)), key
        elif ".mlp.gate." in key:  # the router, float32 as always
            assert stored[key].dtype == torch.float32 and ours[key].equal(v), key
        else:
            assert stored[key].dtype == torch.bfloat16 and ours[key].equal(v.bfloat16().float()), key
    assert sum(k.endswith("_scale_inv") for k in stored) == sum(stored_in_fp8(k, v) for k, v in original.items())


def test_transformers_loads_an_fp8_checkpoint_nanoseek_saves(tmp_path):
    """transformers 5 dequantizes FP8 checkpoints on the CPU (with accelerate installed). Its
    load-time dequantization takes a block as rows // scale rows, which is right for a
    dimension of one block or of whole blocks but not for a ragged one (160 rows in blocks
    of 128 and 32 it reads as two of 80): so every quantized dimension here is <= 128."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = nanoseek_model(**V3)
    save_pretrained(model, tmp_path / "ck", dtype=torch.float8_e4m3fn)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ck", dtype=torch.float32, attn_implementation="eager").eval()
    ours = from_pretrained(tmp_path / "ck", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ))
    expected, theirs = logits(ours, ids), logits(hf, ids)
    assert expected.abs().max() > 0.5
    assert max_err(expected, theirs) <= 1e-4
    assert max_err(expected, logits(model, ids)) > 1e-3  # it did load the FP8-rounded weights
