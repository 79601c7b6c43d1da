"""Engine core I: our GPT-NeoX against transformers (the oracle), the paged KV cache, the loader's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import VARIANTS, build_hf_checkpoint, load_hf_model
from safetensors.torch import load_file, save_file

from neox_ray.config import ConfigError, ModelConfig
from neox_ray.kernels import cpu_paged_attention
from neox_ray.layers.attention import AttentionMetadata
from neox_ray.loader import CheckpointError, load_model

LENGTHS = [5, 17, 1, 40, 9]


def random_batch(lengths: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


def packed_logits(model, sequences: list[torch.Tensor]) -> torch.Tensor:
    ids = torch.cat(sequences)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])
    meta = AttentionMetadata.for_plain_forward([len(s) for s in sequences], torch.device("cpu"))
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, meta))


def reference_logits(hf_model, sequences: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([hf_model(s.unsqueeze(0)).logits[0] for s in sequences])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_logits_match_transformers(variant_dirs, variant: str, backend: str) -> None:
    directory = variant_dirs[variant]
    ours = load_model(directory, attention_backend=backend)
    sequences = random_batch(LENGTHS, ours.config.vocab_size)
    diff = (packed_logits(ours, sequences) - reference_logits(load_hf_model(directory), sequences)).abs().max()
    assert diff < 1e-4, f"{variant}/{backend}: max abs diff {diff}"


def test_dynamic_rope_beyond_max_positions_matches_transformers(variant_dirs) -> None:
    directory = variant_dirs["dynamic_scaling"]
    ours = load_model(directory)
    assert ours.config.max_position_embeddings == 32
    sequences = random_batch([70], ours.config.vocab_size)  # far past 32: the stretched base is used
    diff = (packed_logits(ours, sequences) - reference_logits(load_hf_model(directory), sequences)).abs().max()
    assert diff < 1e-4


def test_old_pythia_config_style_parses_the_same(variant_dirs, tmp_path: Path) -> None:
    source = variant_dirs["linear_scaling"]
    new_style = json.loads((source / "config.json").read_text())
    rope = new_style.pop("rope_parameters")
    old_style = dict(new_style, rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"],
                     rope_scaling={"type": rope["rope_type"], "factor": rope["factor"]})
    shutil.copytree(source, tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(old_style))
    assert ModelConfig.from_pretrained(tmp_path / "old") == ModelConfig.from_pretrained(source)
    assert ModelConfig.from_pretrained(source).rope.rope_type == "linear"
    ours = load_model(tmp_path / "old")
    sequences = random_batch([12, 3], ours.config.vocab_size)
    diff = (packed_logits(ours, sequences) - reference_logits(load_hf_model(source), sequences)).abs().max()
    assert diff < 1e-4


def test_config_surface_is_parsed(variant_dirs) -> None:
    cfg = ModelConfig.from_pretrained(variant_dirs["no_bias_tied_theta"])
    assert (cfg.attention_bias, cfg.tie_word_embeddings, cfg.rope.theta) == (False, True, 500.0)
    cfg = ModelConfig.from_pretrained(variant_dirs["head_dim_80_gelu_new"])
    assert (cfg.head_dim, cfg.rotary_dim, cfg.hidden_act, cfg.layer_norm_eps) == (80, 40, "gelu_new", 1e-6)
    assert ModelConfig.from_pretrained(variant_dirs["sequential_full_rotary"]).use_parallel_residual is False


def _cached_step(model, block_size: int, tables: list[list[int]], chunks: list[tuple[list[int], int]],
                 decode_path: str = "auto"):
    """Feeds each sequence's chunk (token ids, start position) through the paged cache; returns logits."""
    ids, positions, slots, starts, context_lens = [], [], [], [0], []
    for table, (tokens, start) in zip(tables, chunks, strict=False):
        ids += tokens
        span = range(start, start + len(tokens))
        positions += span
        slots += [table[p // block_size] * block_size + p % block_size for p in span]
        starts.append(starts[-1] + len(tokens))
        context_lens.append(start + len(tokens))
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    meta = AttentionMetadata(starts, context_lens, torch.tensor(slots), block_tables).to(
        torch.device("cpu"), block_size, decode_path)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), meta)), starts


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("decode_path", ["kernel", "views", "grouped"])
def test_incremental_decoding_through_paged_cache_matches_full_forward(variant_dirs, backend: str,
                                                                       decode_path: str) -> None:
    if decode_path == "kernel" and not cpu_paged_attention.available(torch.float32):
        pytest.skip("the CPU attention kernel did not build here (no C compiler)")
    model = load_model(variant_dirs["pythia"], attention_backend=backend)
    cfg, block_size = model.config, 4
    cache = torch.zeros(cfg.num_hidden_layers, 2, 32, block_size, cfg.num_attention_heads, cfg.head_dim)
    for i, attention in enumerate(model.attention_layers):
        attention.kv_cache = cache[i]
    a, b = random_batch([23, 14], cfg.vocab_size, seed=3)
    # a: scattered blocks (read run by run); b: consecutive blocks (read as one view).
    tables = [[7, 2, 9, 11, 3, 14], [20, 21, 22, 23]]
    full = [packed_logits(model, [a]), packed_logits(model, [b])]
    # Chunked prefill: a in two chunks (the second attends to cached context), b at once.
    logits, starts = _cached_step(model, block_size, tables, [(a[:6].tolist(), 0), (b[:10].tolist(), 0)])
    torch.testing.assert_close(logits[:6], full[0][:6], atol=1e-4, rtol=0)
    logits, starts = _cached_step(model, block_size, tables[:1], [(a[6:18].tolist(), 6)])
    torch.testing.assert_close(logits, full[0][6:18], atol=1e-4, rtol=0)
    # Then one token at a time for both sequences together (the batched decode path).
    for step in range(4):
        pa, pb = 18 + step, 10 + step
        logits, _ = _cached_step(model, block_size, tables, [([int(a[pa])], pa), ([int(b[pb])], pb)], decode_path)
        torch.testing.assert_close(logits[0], full[0][pa], atol=1e-4, rtol=0)
        torch.testing.assert_close(logits[1], full[1][pb], atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_and_matches(tmp_path: Path) -> None:
    directory = build_hf_checkpoint(tmp_path / "sharded", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    ours = load_model(directory)
    sequences = random_batch([11, 4], ours.config.vocab_size)
    diff = (packed_logits(ours, sequences) - reference_logits(load_hf_model(directory), sequences)).abs().max()
    assert diff < 1e-4


def test_bf16_on_cpu_stays_close_to_fp32(variant_dirs) -> None:
    fp32 = load_model(variant_dirs["pythia"], dtype="float32")
    bf16 = load_model(variant_dirs["pythia"], dtype="bfloat16")
    assert bf16.gpt_neox.layers[0].attention.query_key_value.weight.dtype == torch.bfloat16
    sequences = random_batch([16, 7], fp32.config.vocab_size)
    ref, got = packed_logits(fp32, sequences), packed_logits(bf16, sequences)
    relative = (got - ref).norm() / ref.norm()
    assert relative < 3e-2, relative
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_old_checkpoint_buffers_are_skipped(variant_dirs, tmp_path: Path) -> None:
    directory = shutil.copytree(variant_dirs["pythia"], tmp_path / "old_buffers")
    tensors = load_file(directory / "model.safetensors")
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(tensors, directory / "model.safetensors")
    load_model(directory)  # no error


# ---- clear errors ------------------------------------------------------------------------------------

def test_missing_tensor_is_named(variant_dirs, tmp_path: Path) -> None:
    directory = shutil.copytree(variant_dirs["pythia"], tmp_path / "missing")
    tensors = load_file(directory / "model.safetensors")
    del tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.weight is missing"):
        load_model(directory)


def test_shape_mismatch_is_named(variant_dirs, tmp_path: Path) -> None:
    directory = shutil.copytree(variant_dirs["pythia"], tmp_path / "shape")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h\.weight: checkpoint shape \[128, 64\] does not match"):
        load_model(directory)


def test_missing_shard_file_is_named(tmp_path: Path) -> None:
    directory = build_hf_checkpoint(tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(directory.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name + " .*is missing"):
        load_model(directory)


def test_no_weights_and_no_config(tmp_path: Path, variant_dirs) -> None:
    directory = shutil.copytree(variant_dirs["pythia"], tmp_path / "empty")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(directory)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path: Path) -> None:
    source = build_hf_checkpoint(tmp_path / "src")
    directory = tmp_path / "pickle"
    directory.mkdir()
    shutil.copy(source / "config.json", directory)
    shutil.copy(source / "tokenizer.json", directory)
    torch.save(load_file(source / "model.safetensors"), directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_model(directory)
    ours = load_model(directory, allow_pickle=True)
    sequences = random_batch([9], ours.config.vocab_size)
    assert (packed_logits(ours, sequences) - reference_logits(load_hf_model(source), sequences)).abs().max() < 1e-4


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                          "partial_rotary_factor": 0.25}}, "rope type 'yarn' is not supported"),
    ({"hidden_act": "mish"}, "hidden_act 'mish' is not supported"),
    ({"num_attention_heads": 5}, "not divisible by num_attention_heads"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}}, "needs a scaling 'factor'"),
])
def test_unsupported_configs_fail_at_load(variant_dirs, tmp_path: Path, change: dict, message: str) -> None:
    directory = shutil.copytree(variant_dirs["pythia"], tmp_path / "cfg")
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_model(directory)
