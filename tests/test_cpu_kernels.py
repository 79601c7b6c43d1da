"""The CPU fast paths against the plain torch ones they replace: oneDNN-packed linears (with the fused
activation), the C paged decode-attention kernel (and its portable build) and the fused QKV split + rotary
kernel; plus the fallback when the kernels are switched off."""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoints import VARIANTS, load_hf_model
from test_model import LENGTHS, packed_logits, random_batch, reference_logits

from neox_ray.config import ModelConfig, RopeConfig
from neox_ray.engine.cpu_tuning import keep_freed_memory_for_reuse
from neox_ray.kernels import cpu_paged_attention, cpu_rotary
from neox_ray.layers.attention import AttentionMetadata
from neox_ray.layers.cpu_gemm import FUSED_ACTIVATIONS, pack_weight, packed_linear, packing_supported
from neox_ray.layers.rotary import RotaryEmbedding
from neox_ray.loader import load_model

needs_packing = pytest.mark.skipif(not packing_supported(torch.float32), reason="torch was built without oneDNN")
needs_kernel = pytest.mark.skipif(not cpu_paged_attention.available(torch.float32),
                                  reason="the CPU attention kernel did not build here (no C compiler)")


# ---- packed linears --------------------------------------------------------------------------------------
def linear_problem(rows: int, activation: str | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random (96 x 48) linear with bias, ``rows`` inputs, and ``activation(F.linear(...))`` in float32:
    (weight, bias, x, want)."""
    from neox_ray.layers.activation import get_activation

    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 48, generator=generator), torch.randn(96, generator=generator)
    x = torch.randn(rows, 48, generator=generator)
    want = F.linear(x, weight, bias)
    return weight, bias, x, get_activation(activation)(want) if activation else want


@needs_packing
@pytest.mark.parametrize("activation", [None, *FUSED_ACTIVATIONS, "quick_gelu"])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_linear_equals_f_linear(activation: str | None, rows: int) -> None:
    weight, bias, x, want = linear_problem(rows, activation)
    torch.testing.assert_close(packed_linear(x, pack_weight(weight), bias, activation), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed_linear(x, pack_weight(weight), None), F.linear(x, weight), atol=2e-5, rtol=1e-5)


@needs_packing
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_model_matches_transformers(variant_dirs, variant: str) -> None:
    model = load_model(variant_dirs[variant])
    sequences = random_batch(LENGTHS, model.config.vocab_size)
    plain = packed_logits(model, sequences)
    model.pack_weights_for_cpu()
    packed = packed_logits(model, sequences)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    reference = reference_logits(load_hf_model(variant_dirs[variant]), sequences)
    assert (packed - reference).abs().max() < 1e-4
    # Plain weights are released (memory does not double), except a tied LM head's: the embedding reads it.
    layer = model.gpt_neox.layers[0]
    assert layer.attention.query_key_value.weight.numel() == 0 and layer.mlp.dense_4h_to_h.weight.numel() == 0
    assert model.embed_out.weight.numel() == (0 if not model.config.tie_word_embeddings
                                              else model.config.vocab_size * model.config.hidden_size)


# ---- paged decode-attention kernel -------------------------------------------------------------------------
def _random_paged_problem(num_seqs: int, heads: int, head_dim: int, block_size: int, max_len: int,
                          dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (num_seqs,), generator=generator)
    lens[0] = 1  # a context of a single token
    blocks_needed = [-(-int(n) // block_size) for n in lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=generator)  # scattered, not consecutive
    width = max(blocks_needed)
    tables = torch.zeros(num_seqs, width, dtype=torch.long)
    used = 0
    for s, n in enumerate(blocks_needed):
        tables[s, :n] = order[used:used + n]
        used += n
    shape = (num_blocks, block_size, heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    query = torch.randn(num_seqs, heads, head_dim, generator=generator).to(dtype)
    return query, key_cache, value_cache, tables, lens


def _reference(query, key_cache, value_cache, tables, lens, scale) -> torch.Tensor:
    rows = []
    for s in range(query.shape[0]):
        n = int(lens[s])
        blocks = tables[s, : -(-n // key_cache.shape[1])]
        k = key_cache[blocks].flatten(0, 1)[:n].double().transpose(0, 1)    # (heads, n, dim)
        v = value_cache[blocks].flatten(0, 1)[:n].double().transpose(0, 1)
        weights = torch.softmax((query[s].double().unsqueeze(1) @ k.transpose(1, 2)) * scale, dim=-1)
        rows.append((weights @ v)[:, 0])
    return torch.stack(rows)


# (num_seqs, heads, head_dim, block_size, max_len): head sizes with an unrolled AVX-512 copy (16..256) and
# without (24: the portable loop), blocks shorter and longer than the kernel's 16-position tile, contexts of
# many tiles (the online softmax rescales its running sums whenever a later tile holds a larger score).
ATTENTION_PROBLEMS = [(1, 4, 16, 4, 70), (3, 2, 80, 16, 70), (37, 12, 64, 16, 70), (5, 3, 32, 1, 70),
                      (4, 3, 24, 16, 70), (3, 2, 64, 48, 300), (2, 2, 256, 16, 100), (6, 4, 128, 32, 200)]


@needs_kernel
@pytest.mark.parametrize("num_seqs,heads,head_dim,block_size,max_len", ATTENTION_PROBLEMS)
def test_kernel_equals_softmax_attention(num_seqs: int, heads: int, head_dim: int, block_size: int,
                                         max_len: int) -> None:
    problem = _random_paged_problem(num_seqs, heads, head_dim, block_size, max_len=max_len, dtype=torch.float32)
    scale = 1 / math.sqrt(head_dim)
    got = cpu_paged_attention.decode_attention(*problem, scale)
    torch.testing.assert_close(got.double(), _reference(*problem, scale), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_with_peaked_scores_late_in_the_context() -> None:
    """Scores rising along the context (each tile's maximum beats the last) and one dominant key: the
    running max and sum are rescaled many times and must still give softmax's weights."""
    query, key_cache, value_cache, tables, lens = _random_paged_problem(3, 2, 64, 16, 200, torch.float32, seed=3)
    ramp = torch.linspace(0, 6, key_cache.shape[0] * key_cache.shape[1]).view(key_cache.shape[0], -1, 1, 1)
    key_cache = (key_cache * ramp).contiguous()
    got = cpu_paged_attention.decode_attention(query, key_cache, value_cache, tables, lens, 1.0)
    torch.testing.assert_close(got.double(), _reference(query, key_cache, value_cache, tables, lens, 1.0),
                               atol=2e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_kernel_build_gives_the_same_results(dtype: torch.dtype, monkeypatch) -> None:
    """The loop every CPU runs when the AVX-512 copies are not compiled in (built here without AVX-512)."""
    from neox_ray.kernels.build import load_library
    portable = load_library(cpu_paged_attention.SOURCE, "portable attention kernel", "nothing",
                            {name: (cpu_paged_attention._ARGTYPES, ctypes.c_int)
                             for name in cpu_paged_attention._FUNCTIONS.values()}, extra_flags=("-mno-avx512f",))
    if portable is None:
        pytest.skip("the compiler cannot build without AVX-512 here")
    problem = _random_paged_problem(6, 3, 64, 16, 120, dtype, seed=4)
    fast = cpu_paged_attention.decode_attention(*problem, 0.125)
    monkeypatch.setattr(cpu_paged_attention, "_library", lambda: portable)
    slow = cpu_paged_attention.decode_attention(*problem, 0.125)
    tolerance = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(slow.double(), fast.double(), **tolerance)
    torch.testing.assert_close(slow.double(), _reference(*problem, 0.125), **(tolerance if dtype == torch.float32
                                                                               else {"atol": 2e-2, "rtol": 1e-2}))


@needs_kernel
def test_kernel_in_bfloat16_is_within_bfloat16_rounding() -> None:
    problem = _random_paged_problem(9, 4, 32, 8, max_len=50, dtype=torch.bfloat16, seed=1)
    got = cpu_paged_attention.decode_attention(*problem, 0.2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _reference(*problem, 0.2), atol=2e-2, rtol=1e-2)


@needs_kernel
def test_kernel_rejects_inconsistent_inputs() -> None:
    query, key_cache, value_cache, tables, lens = _random_paged_problem(4, 2, 16, 4, 20, torch.float32)
    with pytest.raises(ValueError, match="cache shape"):
        cpu_paged_attention.decode_attention(query[:, :1], key_cache, value_cache, tables, lens, 1.0)
    bad_tables = tables.clone()
    bad_tables[0, 0] = key_cache.shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_paged_attention.decode_attention(query, key_cache, value_cache, bad_tables, lens, 1.0)
    with pytest.raises(ValueError, match="longer than its block table"):
        cpu_paged_attention.decode_attention(query, key_cache, value_cache, tables, lens + 100, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_paged_attention.decode_attention(query, key_cache.transpose(0, 1), value_cache.transpose(0, 1),
                                             tables, lens, 1.0)


@needs_kernel
def test_attention_metadata_checks_the_tables_once_for_every_layer() -> None:
    """The runner's metadata checks the decode tables against the cache once per step and every layer's
    kernel call then skips the check; without the cache size the kernel call still checks."""
    _, key_cache, _, tables, lens = _random_paged_problem(4, 2, 16, 4, 20, torch.float32)
    starts = list(range(len(lens) + 1))
    def metadata(block_tables: torch.Tensor, num_cache_blocks: int | None) -> AttentionMetadata:
        return AttentionMetadata(query_start_loc=starts, context_lens=lens.tolist(),
                                 slot_mapping=torch.zeros(len(lens), dtype=torch.long),
                                 block_tables=block_tables).to(torch.device("cpu"), 4, "kernel", num_cache_blocks)
    assert metadata(tables, key_cache.shape[0]).decode_tables_checked
    assert not metadata(tables, None).decode_tables_checked
    bad_tables = tables.clone()
    bad_tables[1, 0] = key_cache.shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        metadata(bad_tables, key_cache.shape[0])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_what_index_copy_writes(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    key_cache, value_cache = (torch.randn(6, 4, 3, 8, generator=generator).to(dtype) for _ in range(2))
    key, value = (torch.randn(5, 3, 8, generator=generator).to(dtype) for _ in range(2))
    slots = torch.tensor([0, 7, 23, 12, 13])
    want_keys, want_values = key_cache.clone(), value_cache.clone()
    want_keys.view(-1, 3, 8).index_copy_(0, slots, key)
    want_values.view(-1, 3, 8).index_copy_(0, slots, value)
    assert cpu_paged_attention.store_kv(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, want_keys) and torch.equal(value_cache, want_values)
    # What it does not handle it leaves to index_copy_ (returns False, writes nothing).
    before = key_cache.clone()
    assert not cpu_paged_attention.store_kv(key.transpose(0, 1).contiguous().transpose(0, 1), value, key_cache,
                                            value_cache, slots)
    assert not cpu_paged_attention.store_kv(key.float() if dtype != torch.float32 else key.double(), value,
                                            key_cache, value_cache, slots)
    assert torch.equal(key_cache, before)
    cpu_paged_attention.check_slots(slots, 24)
    with pytest.raises(ValueError, match="outside the cache"):
        cpu_paged_attention.check_slots(slots, 23)


# ---- fused QKV split + rotary ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,head_dim,rotary_dim", [(5, 4, 64, 16), (300, 3, 80, 20), (1, 2, 32, 32),
                                                              (7, 2, 16, 2)])
def test_rotary_kernel_equals_the_torch_rotation_bit_for_bit(dtype: torch.dtype, tokens: int, heads: int,
                                                             head_dim: int, rotary_dim: int) -> None:
    if cpu_rotary._library() is None:
        pytest.skip("the CPU rotary kernel did not build here (no C compiler)")
    generator = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, 3 * heads * head_dim + 5, generator=generator).to(dtype)[:, 5:]  # a strided view
    qkv = qkv.view(tokens, heads, 3, head_dim)
    angles = torch.randn(tokens, rotary_dim // 2, generator=generator) * 50
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    cos_sin = (angles.cos(), angles.sin())
    rotary = RotaryEmbedding(ModelConfig(vocab_size=8, hidden_size=heads * head_dim, num_hidden_layers=1,
                                         num_attention_heads=heads, intermediate_size=8,
                                         rope=RopeConfig(partial_rotary_factor=rotary_dim / head_dim)))
    assert rotary.rotary_dim == rotary_dim
    got = cpu_rotary.rotate_split(qkv, *cos_sin, rotary_dim)
    assert got is not None
    query, key, value = qkv.unbind(dim=2)
    want = (*rotary.rotate_query_key(query, key, cos_sin), value)
    for got_part, want_part in zip(got, want, strict=True):
        assert got_part.is_contiguous() and got_part.dtype == dtype
        assert torch.equal(got_part, want_part)
    assert cpu_rotary.rotate_split(qkv.half(), *cos_sin, rotary_dim) is None  # float16: the torch path runs


@pytest.mark.slow
@needs_kernel
@needs_packing
def test_engine_uses_the_fast_paths_and_the_fallback_gives_the_same_tokens(tiny_checkpoint: Path) -> None:
    """The default CPU engine packs weights and decodes through the kernel; with the kernel switched off
    (NEOX_RAY_CPU_KERNELS=0, as on a machine without a compiler) it falls back to SDPA views and greedy
    outputs are identical."""
    from neox_ray import LLM, SamplingParams

    llm = LLM(str(tiny_checkpoint), max_num_seqs=8)
    runner = llm.engine.executor.runner
    assert runner.decode_path == "kernel" and runner.model.embed_out.packed_weight is not None
    prompts = [[5 + i] * (3 + 7 * i) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    script = (
        "import json, sys\n"
        "from neox_ray import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_checkpoint)!r}, max_num_seqs=8)\n"
        "assert llm.engine.executor.runner.decode_path == 'views'\n"
        f"outs = llm.generate({prompts!r}, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))\n"
        "print(json.dumps([o.outputs[0].token_ids for o in outs]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NEOX_RAY_CPU_KERNELS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ours


def test_allocator_thresholds_apply_on_glibc() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert keep_freed_memory_for_reuse() is True


def test_a_kernel_that_fails_to_build_means_fallback_not_failure(tmp_path: Path, monkeypatch, caplog) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_paged_attention, "SOURCE", broken)
    monkeypatch.setenv("NEOX_RAY_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_paged_attention._library.cache_clear()
    try:
        if cpu_paged_attention._compiler() is None:
            pytest.skip("no C compiler here: the build is never attempted")
        with caplog.at_level("WARNING"):
            assert cpu_paged_attention.available(torch.float32) is False
        assert "CPU attention kernel unavailable" in caplog.text and "failed to build" in caplog.text
        assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to be loaded later
        with pytest.raises(RuntimeError, match="not available"):
            cpu_paged_attention.decode_attention(*_random_paged_problem(2, 2, 16, 4, 8, torch.float32), 1.0)
    finally:
        monkeypatch.undo()
        cpu_paged_attention._library.cache_clear()


@needs_kernel
def test_bfloat16_engine_on_cpu_uses_the_fast_paths_and_stays_close_to_float32(tiny_checkpoint: Path) -> None:
    from neox_ray import LLM, SamplingParams

    if not packing_supported(torch.bfloat16):
        pytest.skip("oneDNN cannot pack bfloat16 weights in this torch build")
    prompts = [[5 + i] * (4 + 9 * i) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    results = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(tiny_checkpoint), dtype=dtype, max_num_seqs=8)
        runner = llm.engine.executor.runner
        assert runner.decode_path == "kernel" and runner.model.embed_out.packed_weight is not None
        results[dtype] = llm.generate(prompts, params)
    for prompt, full, half in zip(prompts, results["float32"], results["bfloat16"], strict=False):
        want = torch.tensor([entry[t] for entry, t in zip(full.prompt_logprobs[1:], prompt[1:], strict=False)])
        got = torch.tensor([entry[t] for entry, t in zip(half.prompt_logprobs[1:], prompt[1:], strict=False)])
        assert (got - want).abs().max() < 0.1  # bf16 keeps ~3 significant digits through two layers
        # Decode steps go through the bf16 kernel: the logprob of each token fp32 chose stays close.
        chosen = full.outputs[0].token_ids
        full_decode = [entry[t] for entry, t in zip(full.outputs[0].logprobs, chosen, strict=False)]
        half_decode = [entry[t] for entry, t in zip(half.outputs[0].logprobs, chosen, strict=False)]
        assert half.outputs[0].token_ids == chosen  # margins between top tokens here exceed bf16's error
        assert max(abs(a - b) for a, b in zip(full_decode, half_decode, strict=False)) < 0.1


@pytest.mark.parametrize("setting", [{"NEOX_RAY_CPU_KERNELS": "off"}, {"NEOX_RAY_CPU_KERNELS": "0"},
                                     {"NEOX_RAY_KERNEL_CACHE": "/dev/null/not-a-directory"}])
def test_kernel_switched_off_or_unwritable_cache_falls_back(setting: dict[str, str], monkeypatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.setenv("NEOX_RAY_KERNEL_CACHE", str(tmp_path / "fresh"))  # never reuse an existing build
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    cpu_paged_attention._library.cache_clear()
    try:
        if "NEOX_RAY_KERNEL_CACHE" in setting and cpu_paged_attention._compiler() is None:
            pytest.skip("no C compiler here: the cache directory is never touched")
        assert cpu_paged_attention.available(torch.float32) is False
    finally:
        monkeypatch.undo()
        cpu_paged_attention._library.cache_clear()
