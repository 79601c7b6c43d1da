"""The CPU fast paths against the plain torch ones they replace: oneDNN-packed linears (with the fused
activation) and the C paged decode-attention kernel; plus the fallback when the kernel is switched off."""

from __future__ import annotations

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

from neox_ray.engine.cpu_tuning import keep_freed_memory_for_reuse
from neox_ray.kernels import cpu_paged_attention
from neox_ray.layers.cpu_gemm import FUSED_ACTIVATIONS, pack_weight, packed_linear, packing_supported
from neox_ray.loader import load_model

needs_packing = pytest.mark.skipif(not packing_supported(torch.float32), reason="torch was built without oneDNN")
needs_kernel = pytest.mark.skipif(not cpu_paged_attention.available(torch.float32),
                                  reason="the CPU attention kernel did not build here (no C compiler)")


# ---- packed linears --------------------------------------------------------------------------------------
@needs_packing
@pytest.mark.parametrize("activation", [None, *FUSED_ACTIVATIONS, "quick_gelu"])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_linear_equals_f_linear(activation: str | None, rows: int) -> None:
    from neox_ray.layers.activation import get_activation

    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 48, generator=generator), torch.randn(96, generator=generator)
    x = torch.randn(rows, 48, generator=generator)
    want = F.linear(x, weight, bias)
    want = get_activation(activation)(want) if activation else want
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


@needs_kernel
@pytest.mark.parametrize("num_seqs,heads,head_dim,block_size", [(1, 4, 16, 4), (3, 2, 80, 16), (37, 12, 64, 16),
                                                                 (5, 3, 32, 1)])
def test_kernel_equals_softmax_attention(num_seqs: int, heads: int, head_dim: int, block_size: int) -> None:
    problem = _random_paged_problem(num_seqs, heads, head_dim, block_size, max_len=70, dtype=torch.float32)
    scale = 1 / math.sqrt(head_dim)
    got = cpu_paged_attention.decode_attention(*problem, scale)
    torch.testing.assert_close(got.double(), _reference(*problem, scale), atol=2e-6, rtol=1e-5)


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
