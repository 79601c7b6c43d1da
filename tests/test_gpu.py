"""GPU path checks: bf16 parity with transformers for every Pythia head dim, flash-attn vs SDPA, paged decode,
TP=1 bf16 vs fp32, and TP=2 over NCCL. Skipped (with the reason) where CUDA or flash-attn is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import build_hf_checkpoint, load_hf_model

from neox_ray import LLM, SamplingParams
from neox_ray.layers.attention import FLASH_ATTN_AVAILABLE, AttentionMetadata
from neox_ray.loader import load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Pythia head dims: 64 (70m-410m), 80 (2.8b), 96 (20b), 128 (1.4b, 6.9b, 12b), 256 (1b).
HEAD_DIMS = [64, 80, 96, 128, 256]


def checkpoint_with_head_dim(root: Path, head_dim: int) -> Path:
    heads = 4
    return build_hf_checkpoint(root / f"hd{head_dim}", hidden_size=heads * head_dim, num_attention_heads=heads,
                               intermediate_size=4 * heads * head_dim, rotary_pct=0.25)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_bf16_logits_match_transformers(tmp_path: Path, head_dim: int) -> None:
    directory = checkpoint_with_head_dim(tmp_path, head_dim)
    ours = load_model(directory, dtype="bfloat16", device="cuda", attention_backend="sdpa")
    hf = load_hf_model(directory).cuda()
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 512, (n,), generator=generator) for n in (7, 33, 100)]
    ids = torch.cat(sequences).cuda()
    positions = torch.cat([torch.arange(len(s)) for s in sequences]).cuda()
    meta = AttentionMetadata.for_plain_forward([len(s) for s in sequences], torch.device("cuda"))
    with torch.no_grad():
        logits = ours.compute_logits(ours(ids, positions, meta))
        ref = torch.cat([hf(s.unsqueeze(0).cuda()).logits[0] for s in sequences])
    assert relative_error(logits, ref) < 2e-2


@pytest.mark.skipif(not FLASH_ATTN_AVAILABLE, reason="flash-attn is not installed (pip install 'neox-ray[gpu]')")
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_flash_attn_backend_matches_sdpa(tmp_path: Path, head_dim: int) -> None:
    directory = checkpoint_with_head_dim(tmp_path, head_dim)
    prompts = [[(7 * i + j) % 500 + 2 for j in range(n)] for i, n in enumerate((5, 40, 300))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    flash = LLM(str(directory), dtype="bfloat16", attention_backend="flash_attn", block_size=256)
    sdpa = LLM(str(directory), dtype="bfloat16", attention_backend="sdpa", block_size=256)
    for a, b in zip(flash.generate(prompts, params), sdpa.generate(prompts, params), strict=False):
        diffs = [abs(x[t] - y[t]) for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:],
                                                    a.prompt_token_ids[1:], strict=False)]
        assert max(diffs) < 5e-2


@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_decode_matches_plain_forward_on_gpu(tmp_path: Path, head_dim: int) -> None:
    directory = checkpoint_with_head_dim(tmp_path, head_dim)
    llm = LLM(str(directory), dtype="float32", block_size=16)
    prompt = [(3 * j) % 500 + 2 for j in range(40)]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    full = prompt + out.outputs[0].token_ids
    scored = llm.generate([full], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    generated = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                      logprobs=0))[0].outputs[0]
    for k, token in enumerate(generated.token_ids):
        assert abs(generated.logprobs[k][token] - scored.prompt_logprobs[len(prompt) + k][token]) < 1e-3


def test_tp1_bf16_close_to_fp32(tmp_path: Path) -> None:
    directory = checkpoint_with_head_dim(tmp_path, 64)
    prompts = [[(5 * j) % 500 + 2 for j in range(n)] for n in (9, 64)]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    fp32 = LLM(str(directory), dtype="float32").generate(prompts, params)
    bf16 = LLM(str(directory), dtype="bfloat16").generate(prompts, params)
    for a, b in zip(fp32, bf16, strict=False):
        diffs = [abs(x[t] - y[t]) for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:],
                                                    a.prompt_token_ids[1:], strict=False)]
        assert sum(diffs) / len(diffs) < 5e-2


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 over NCCL needs two GPUs")
def test_tp2_over_nccl_matches_tp1(ray_session, tmp_path: Path) -> None:
    directory = checkpoint_with_head_dim(tmp_path, 64)
    prompts = [[(11 * j) % 500 + 2 for j in range(n)] for n in (9, 64)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    tp1 = LLM(str(directory), dtype="float32").generate(prompts, params)
    tp2_llm = LLM(str(directory), dtype="float32", tensor_parallel_size=2, worker_num_gpus=1.0)
    try:
        tp2 = tp2_llm.generate(prompts, params)
    finally:
        tp2_llm.shutdown()
    assert [o.outputs[0].token_ids for o in tp1] == [o.outputs[0].token_ids for o in tp2]
