"""``kv_cache_dtype="int8"`` on CPU: the quantizer (C store and torch fallback write the same bytes), the decode
kernel over an int8 cache against softmax attention over the dequantized cache, the engine with an int8 cache
against one in the model's dtype (decode kernel, the torch fallback paths, a prefix-cache hit), the cache's size
in bytes, and every combination refused.

Tolerances: each (token, head) row is stored to 1/254 of its largest value, so one attention output moves by
about that much; through the tiny checkpoint's two layers the logprobs move by ~1e-3 nats. The engine bound is
0.05 nats: well above that, and far below what a wrong scale or a row read from the wrong slot gives (O(1)).
"""

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
from test_cpu_kernels import _random_paged_problem, _reference, needs_kernel

from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.schema import SettingsError
from neox_ray.kernels import cpu_paged_attention
from neox_ray.layers.attention import dequantize_kv, quantize_kv_rows


def int8_problem(num_seqs: int, heads: int, head_dim: int, block_size: int, max_len: int, dtype: torch.dtype,
                 seed: int = 0) -> tuple[tuple, tuple]:
    """A paged problem with its float caches quantized: ((query, k8, v8, tables, lens), (k_scales, v_scales)),
    plus the dequantized float caches the reference attends over (returned in place of k8/v8 by dequantized())."""
    query, key_cache, value_cache, tables, lens = _random_paged_problem(num_seqs, heads, head_dim, block_size,
                                                                        max_len, dtype, seed=seed)
    k8, k_scales = quantize_kv_rows(key_cache)
    v8, v_scales = quantize_kv_rows(value_cache)
    return (query, k8, v8, tables, lens), (k_scales, v_scales)


def dequantized(problem: tuple, scales: tuple) -> tuple:
    query, k8, v8, tables, lens = problem
    return (query, dequantize_kv(k8, scales[0].unsqueeze(-1), torch.float64),
            dequantize_kv(v8, scales[1].unsqueeze(-1), torch.float64), tables, lens)


# ---- the quantizer -------------------------------------------------------------------------------------------
def test_quantized_rows_are_within_half_a_step_and_zero_rows_stay_zero() -> None:
    rows = torch.randn(50, 4, 64, generator=torch.Generator().manual_seed(1)) * torch.rand(50, 4, 1) * 10
    rows[3, 2] = 0.0
    values, scales = quantize_kv_rows(rows)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (50, 4)
    assert int(values.abs().max()) == 127  # every non-zero row uses the full range
    error = (dequantize_kv(values, scales.unsqueeze(-1), torch.float32) - rows).abs()
    assert bool((error <= scales.unsqueeze(-1) * 0.5 + 1e-6).all())
    assert scales[3, 2] == 0 and not values[3, 2].any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 64])  # the scalar loop; 16 values at a time with AVX-512
def test_c_store_writes_what_the_torch_quantizer_writes(dtype: torch.dtype, head_dim: int) -> None:
    generator = torch.Generator().manual_seed(5)
    blocks, block_size, heads = 24, 4, 3
    key_cache, value_cache = (torch.zeros(blocks, block_size, heads, head_dim, dtype=torch.int8) for _ in range(2))
    key_scales, value_scales = (torch.zeros(blocks, block_size, heads) for _ in range(2))
    key, value = (torch.randn(60, heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    value[1, 2] = 0.0
    slots = torch.randperm(blocks * block_size, generator=generator)[:60]
    assert cpu_paged_attention.store_kv_int8(key, value, key_cache, value_cache, key_scales, value_scales, slots)
    for rows, cache, scales in ((key, key_cache, key_scales), (value, value_cache, value_scales)):
        want_values, want_scales = quantize_kv_rows(rows)
        assert torch.equal(cache.view(-1, heads, head_dim)[slots], want_values)
        assert torch.equal(scales.view(-1, heads)[slots], want_scales)
        untouched = torch.ones(blocks * block_size, dtype=torch.bool)
        untouched[slots] = False
        assert not cache.view(-1, heads, head_dim)[untouched].any() and not scales.view(-1, heads)[untouched].any()
    # What it does not handle it leaves to the torch path (returns False, writes nothing).
    before = key_cache.clone()
    assert not cpu_paged_attention.store_kv_int8(key, value, key_cache, value_cache, key_scales[:, :2],
                                                 value_scales, slots)
    assert not cpu_paged_attention.store_kv_int8(key.double(), value.double(), key_cache, value_cache, key_scales,
                                                 value_scales, slots)
    assert torch.equal(key_cache, before)


# ---- the decode kernel ---------------------------------------------------------------------------------------
# Head sizes with an AVX-512 copy and without (24), blocks shorter and longer than the kernel's 16-position tile.
PROBLEMS = [(1, 4, 16, 4, 70), (37, 12, 64, 16, 70), (4, 3, 24, 16, 70), (3, 2, 64, 48, 300), (6, 4, 128, 32, 200)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_seqs,heads,head_dim,block_size,max_len", PROBLEMS)
def test_kernel_over_an_int8_cache_equals_attention_over_the_dequantized_cache(
        dtype: torch.dtype, num_seqs: int, heads: int, head_dim: int, block_size: int, max_len: int) -> None:
    problem, scales = int8_problem(num_seqs, heads, head_dim, block_size, max_len, dtype)
    scale = 1 / math.sqrt(head_dim)
    got = cpu_paged_attention.decode_attention(*problem, scale, key_scales=scales[0], value_scales=scales[1])
    assert got.dtype == dtype
    want = _reference(*dequantized(problem, scales), scale)
    tolerance = {"atol": 2e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), want, **tolerance)


@needs_kernel
def test_portable_build_over_an_int8_cache_gives_the_same_results(monkeypatch) -> None:
    from neox_ray.kernels.build import load_library
    portable = load_library(cpu_paged_attention.SOURCE, "portable attention kernel", "nothing",
                            {name: (cpu_paged_attention._ARGTYPES, ctypes.c_int)
                             for name in cpu_paged_attention._FUNCTIONS.values()}, extra_flags=("-mno-avx512f",))
    if portable is None:
        pytest.skip("the compiler cannot build without AVX-512 here")
    problem, scales = int8_problem(6, 3, 64, 16, 120, torch.float32, seed=4)
    fast = cpu_paged_attention.decode_attention(*problem, 0.125, key_scales=scales[0], value_scales=scales[1])
    monkeypatch.setattr(cpu_paged_attention, "_library", lambda: portable)
    slow = cpu_paged_attention.decode_attention(*problem, 0.125, key_scales=scales[0], value_scales=scales[1])
    torch.testing.assert_close(slow, fast, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(slow.double(), _reference(*dequantized(problem, scales), 0.125), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_refuses_an_int8_cache_without_its_scales() -> None:
    problem, scales = int8_problem(4, 2, 16, 4, 20, torch.float32)
    with pytest.raises(ValueError, match="needs its key and value scales"):
        cpu_paged_attention.decode_attention(*problem, 1.0)
    with pytest.raises(ValueError, match="scales must be contiguous float32"):
        cpu_paged_attention.decode_attention(*problem, 1.0, key_scales=scales[0][:, :2], value_scales=scales[1])
    with pytest.raises(RuntimeError, match="not available for torch.float64 queries"):
        cpu_paged_attention.decode_attention(problem[0].double(), *problem[1:], 1.0, key_scales=scales[0],
                                             value_scales=scales[1])


# ---- the engine ------------------------------------------------------------------------------------------------
PROMPTS = [[5 + i] * (3 + 7 * i) for i in range(6)]


def _prompt_logprobs(outputs: list, prompts: list[list[int]]) -> list[float]:
    return [entry[t] for output, tokens in zip(outputs, prompts, strict=True)
            for entry, t in zip(output.prompt_logprobs[1:], tokens[1:], strict=True)]


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_an_int8_cache_stays_close_to_the_plain_cache(tiny_checkpoint: Path, dtype: str) -> None:
    from neox_ray import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=0, logprobs=2)
    results = {}
    for kv_cache_dtype in ("auto", "int8"):
        llm = LLM(str(tiny_checkpoint), dtype=dtype, max_num_seqs=8, kv_cache_dtype=kv_cache_dtype)
        runner = llm.engine.executor.runner
        assert runner.decode_path == "kernel"
        if kv_cache_dtype == "int8":
            assert runner.kv_cache.dtype == torch.int8 and runner.kv_scales is not None
            assert runner.model.attention_layers[0].kv_scales is not None
        results[kv_cache_dtype] = llm.generate(PROMPTS, params)
    plain, int8 = results["auto"], results["int8"]
    # Prefill attends to the step's own (unquantized) keys: the prompt logprobs match the plain cache's exactly.
    assert _prompt_logprobs(int8, PROMPTS) == _prompt_logprobs(plain, PROMPTS)
    # Decode reads the int8 cache: each continuation follows the plain cache's until a near-tie (a top-1 lead
    # under 0.05 nats) flips, with logprobs close but not equal (a cache that was not int8 at all would be).
    differences = []
    for ours, theirs in zip(int8, plain, strict=True):
        for mine, want, step_mine, step_want in zip(ours.outputs[0].token_ids, theirs.outputs[0].token_ids,
                                                    ours.outputs[0].logprobs, theirs.outputs[0].logprobs,
                                                    strict=True):
            if mine != want:
                assert mine in step_want and step_want[want] - step_want[mine] < 0.05
                break
            differences.append(abs(step_mine[mine] - step_want[want]))
    assert len(differences) > len(PROMPTS) * 12  # most of the 24 tokens compared
    assert max(differences) < 0.05 and max(differences) > 0


@needs_kernel
def test_torch_fallback_over_an_int8_cache_gives_the_kernels_tokens(tiny_checkpoint: Path) -> None:
    """With the C kernels switched off the torch paths quantize (same bytes) and dequantize what they read."""
    from neox_ray import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    ours = LLM(str(tiny_checkpoint), max_num_seqs=8, kv_cache_dtype="int8").generate(PROMPTS, params)
    script = (
        "import json\n"
        "from neox_ray import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_checkpoint)!r}, max_num_seqs=8, kv_cache_dtype='int8')\n"
        "assert llm.engine.executor.runner.decode_path == 'views'\n"
        "outs = llm.generate(" + repr(PROMPTS) + ", SamplingParams(temperature=0.0, max_tokens=24, "
        "ignore_eos=True, logprobs=0))\n"
        "print(json.dumps([[o.outputs[0].token_ids, [e[t] for e, t in zip(o.outputs[0].logprobs, "
        "o.outputs[0].token_ids)]] for o in outs]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NEOX_RAY_CPU_KERNELS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert [tokens for tokens, _ in theirs] == [o.outputs[0].token_ids for o in ours]
    for (_, logprobs), output in zip(theirs, ours, strict=True):
        want = [entry[t] for entry, t in zip(output.outputs[0].logprobs, output.outputs[0].token_ids, strict=True)]
        assert max(abs(a - b) for a, b in zip(logprobs, want, strict=True)) < 1e-4


@needs_kernel
def test_prefix_cache_hit_reads_the_int8_context(tiny_checkpoint: Path) -> None:
    """A prompt whose first blocks are cached attends to them dequantized (the gather path of prefill)."""
    from neox_ray import LLM, SamplingParams

    prompt = [(7 * i) % 90 + 3 for i in range(40)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)
    llm = LLM(str(tiny_checkpoint), max_num_seqs=8, block_size=8, kv_cache_dtype="int8")
    llm.generate([prompt[:32]], SamplingParams(max_tokens=1))  # fills 4 blocks of the prefix cache
    hits_before = llm.engine.block_manager.prefix_cache_hits
    hit = llm.generate([prompt], params)[0].outputs[0]
    assert llm.engine.block_manager.prefix_cache_hits - hits_before == 4
    miss = LLM(str(tiny_checkpoint), max_num_seqs=8, block_size=8, enable_prefix_caching=False).generate(
        [prompt], params)[0].outputs[0]
    assert hit.token_ids == miss.token_ids
    differences = [abs(a[t] - b[t]) for a, b, t in zip(hit.logprobs, miss.logprobs, hit.token_ids, strict=True)]
    assert max(differences) < 0.05 and differences[0] > 0  # the first token's prefill read the int8 prefix


def test_an_int8_cache_block_takes_head_dim_plus_a_scale_bytes_per_row(tiny_checkpoint: Path) -> None:
    from neox_ray import LLM

    plain = LLM(str(tiny_checkpoint), dtype="float32", kv_cache_memory=2**20).engine.executor.runner
    int8 = LLM(str(tiny_checkpoint), dtype="float32", kv_cache_memory=2**20,
               kv_cache_dtype="int8").engine.executor.runner
    head_dim = plain.model_config.head_dim
    assert int8.kv_bytes_per_block * 4 * head_dim == plain.kv_bytes_per_block * (head_dim + 4)
    assert int8.num_kv_blocks == 2**20 // int8.kv_bytes_per_block > 2 * plain.num_kv_blocks
    assert int8.kv_cache.dtype == torch.int8 and int8.kv_scales.shape == int8.kv_cache.shape[:-1]


# ---- settings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cuda"}, "kv_cache_dtype int8 runs on CPU only for now (device is 'cuda'); use device=cpu"),
    ({"attention_backend": "flash_attn"}, "kv_cache_dtype int8 is read by the CPU attention paths; "
                                          "attention_backend flash_attn needs a cache in the model's dtype"),
])
def test_invalid_combinations_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        EngineConfig.from_kwargs("/m", kv_cache_dtype="int8", **kwargs)
    assert str(excinfo.value) == message
    EngineConfig.from_kwargs("/m", **kwargs)  # fine with the default cache


def test_unknown_kv_cache_dtype_names_the_field_and_auto_means_cpu_for_int8() -> None:
    with pytest.raises(SettingsError, match=r"^kv_cache_dtype must be one of 'auto' or 'int8', got 'fp8'$"):
        EngineConfig.from_kwargs("/m", kv_cache_dtype="fp8")
    assert EngineConfig.from_kwargs("/m", kv_cache_dtype="int8").device == "cpu"
    assert EngineConfig.from_kwargs("/m").device == "auto"


def test_every_surface_takes_the_setting(tmp_path: Path) -> None:
    import argparse

    from neox_ray.batch.config import validate_job_config
    from neox_ray.serve.cli import add_parser, resolve_config
    from neox_ray.serve.deployment import ServeArgs

    job = validate_job_config("generate", {"model": "/m", "input": "/in", "output": "/out",
                                           "engine": {"kv_cache_dtype": "int8"}})
    assert job.engine_config.kv_cache_dtype == "int8"
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    engine = resolve_config(parser.parse_args(["serve", "--model", "/m", "--kv-cache-dtype", "int8"])
                            )["applications"][0]["args"]["engine"]
    assert engine == {"kv_cache_dtype": "int8"}
    assert ServeArgs(model="/m", engine=engine).engine_config().kv_cache_dtype == "int8"
    with pytest.raises(ValueError, match="runs on CPU only"):
        ServeArgs(model="/m", engine={"kv_cache_dtype": "int8", "device": "cuda"})
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--kv-cache-dtype", "fp8"])


@needs_kernel
@pytest.mark.ray
@pytest.mark.slow
def test_int8_cache_under_tensor_parallelism_matches_one_rank(ray_session, tiny_checkpoint: Path) -> None:
    """Scales are per (slot, head) and each rank holds whole heads, so two ranks store the same int8 rows as
    one: the same tokens, logprobs equal up to the all-reduce's float order."""
    from neox_ray import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
    reference = LLM(str(tiny_checkpoint), block_size=4, kv_cache_dtype="int8").generate(PROMPTS, params)
    llm = LLM(str(tiny_checkpoint), tensor_parallel_size=2, block_size=4, kv_cache_dtype="int8",
              worker_num_cpus=0.25, placement_timeout_s=30)
    try:
        for ours, ref in zip(llm.generate(PROMPTS, params), reference, strict=True):
            assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
            diffs = [abs(a[t] - b[t]) for a, b, t in zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs,
                                                        ref.outputs[0].token_ids, strict=True)]
            assert max(diffs) < 1e-3
    finally:
        llm.shutdown()
