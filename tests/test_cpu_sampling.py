"""The C sampling kernel against the float64 sort-based oracle of tests/test_sampler.py: every token it
draws is the oracle's for the same uniforms (top-p as a rejection test on draws from the top-k / min-p
distribution, then the exact cut); and the Sampler gives the same tokens with the kernel as with its torch
path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_sampler import oracle_filtered_probs, random_rows

from neox_ray.engine import sampler as sampler_module
from neox_ray.engine.sampler import TOP_P_DRAWS, Sampler, derived_uniforms
from neox_ray.engine.step import SamplingRow
from neox_ray.kernels import cpu_sampling

needs_kernel = pytest.mark.skipif(not cpu_sampling.available(), reason="the CPU sampling kernel did not build here")


def kernel_tokens(logits: torch.Tensor, rows: list[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[1]
    return cpu_sampling.sample(logits, torch.tensor([r.temperature for r in rows]),
                               torch.tensor([r.top_k if 0 < r.top_k < vocab else 0 for r in rows]),
                               torch.tensor([r.top_p for r in rows]), torch.tensor([r.min_p for r in rows]),
                               uniforms)


def oracle_draws(logits: torch.Tensor, rows: list[SamplingRow],
                 uniforms: torch.Tensor) -> tuple[list[int], list[bool]]:
    """The sampler's rule in float64 with the sort-based oracle: a row with top-p takes the first of its
    proposals (uniforms u, then derived_uniforms(u), placed in the top-k / min-p distribution) that the top-p
    filter keeps, else the place of the next uniform in the filtered distribution. Also whether rounding may
    decide the row: a uniform within 1e-5 of its token's edges, or a filter decided within 1e-5 of top_p."""
    full, margin = oracle_filtered_probs(logits, rows)
    proposal, _ = oracle_filtered_probs(logits, [replace(r, top_p=1.0) for r in rows])
    extra = torch.from_numpy(derived_uniforms(uniforms.tolist(), TOP_P_DRAWS))
    draws = torch.cat([uniforms.unsqueeze(1), extra], dim=1)

    def place(probs: torch.Tensor, u: float) -> tuple[int, bool]:
        cdf = (probs / probs.sum()).cumsum(0)
        token = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True).clamp(max=len(cdf) - 1))
        low = float(cdf[token] - probs[token] / probs.sum())
        return token, min(abs(u - low), abs(float(cdf[token]) - u)) < 1e-5

    tokens, uncertain = [], []
    for i, row in enumerate(rows):
        near = bool((margin[i] < 1e-5).any())
        if row.top_p >= 1.0:
            token, edge = place(full[i], float(draws[i, 0]))
        else:
            for attempt in range(TOP_P_DRAWS + 1):
                token, edge = place(proposal[i] if attempt < TOP_P_DRAWS else full[i], float(draws[i, attempt]))
                near |= edge
                if attempt == TOP_P_DRAWS or full[i, token] > 0:
                    break
        tokens.append(token)
        uncertain.append(near or edge)
    return tokens, uncertain


@needs_kernel
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("vocab", [3000, 50304])
def test_each_draw_is_the_oracles(scale: float, vocab: int) -> None:
    """Every token is the oracle's for the same uniforms: the first accepted proposal, or after TOP_P_DRAWS
    rejections the draw from the exact cut (rows at top-p 0.5 on flat logits reach it)."""
    generator = torch.Generator().manual_seed(int(scale * 10) + vocab)
    logits = torch.randn(48, vocab, generator=generator) * scale
    rows = random_rows(48, vocab, generator)
    decided = 0
    for _ in range(4):
        uniforms = torch.rand(48, dtype=torch.float64, generator=generator)
        tokens = kernel_tokens(logits, rows, uniforms).tolist()
        want, uncertain = oracle_draws(logits, rows, uniforms)
        wrong = [(rows[i], float(uniforms[i]), tokens[i], want[i]) for i in range(48)
                 if tokens[i] != want[i] and not uncertain[i]]
        assert not wrong, wrong[:3]
        decided += sum(not u for u in uncertain)
    assert decided > 48  # most rows are decided, not excused


@needs_kernel
def test_a_top_p_draw_is_rejected_redrawn_and_falls_back_to_the_exact_cut() -> None:
    """Two likely tokens and a flat tail, top-p 0.4: the nucleus is token 0 alone. Uniforms that land in the
    tail are redrawn; the kernel, the torch path and the oracle agree on every row, and every row gets token 0
    (also the rows whose TOP_P_DRAWS proposals all miss it and take the exact cut)."""
    vocab = 1000
    probs = torch.full((vocab,), 0.4 / (vocab - 2), dtype=torch.float64)
    probs[0], probs[1] = 0.45, 0.15
    logits = probs.log().float().unsqueeze(0).repeat(64, 1)
    rows = [SamplingRow(top_p=0.4) for _ in range(64)]
    uniforms = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    tokens = kernel_tokens(logits, rows, uniforms).tolist()
    assert tokens == [0] * 64
    extra = torch.from_numpy(derived_uniforms(uniforms.tolist(), TOP_P_DRAWS))
    assert bool(((torch.cat([uniforms.unsqueeze(1), extra[:, :TOP_P_DRAWS - 1]], 1) > 0.45).all(1)).any())
    assert sampler_module._draw(logits, rows, uniforms.unsqueeze(1)).tolist() == tokens


@needs_kernel
def test_sampler_gives_the_same_tokens_with_and_without_the_kernel(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(7)
    vocab = 5000
    logits = torch.randn(64, vocab, generator=generator) * 2
    rows = [SamplingRow(**{**row.__dict__, "seed": i, "output_position": 3})
            for i, row in enumerate(random_rows(64, vocab, generator))]
    with_kernel = [r.token_id for r in Sampler(0)(logits, rows)]
    monkeypatch.setattr(sampler_module, "_use_kernel", lambda logits: False)
    without = [r.token_id for r in Sampler(0)(logits, rows)]
    # Exact agreement but for draws whose uniform sits within rounding of a token boundary (none expected).
    assert sum(a != b for a, b in zip(with_kernel, without, strict=True)) <= 1


@needs_kernel
def test_degenerate_rows_still_give_a_token() -> None:
    logits = torch.full((3, 100), float("-inf"))
    logits[1, 42] = 0.0
    logits[2, 7] = float("nan")
    tokens = kernel_tokens(logits, [SamplingRow(top_p=0.9)] * 3, torch.full((3,), 0.5, dtype=torch.float64))
    assert tokens[1] == 42 and all(0 <= int(t) < 100 for t in tokens)
    peaked = torch.zeros(2, 300)
    peaked[:, 123] = 50.0
    tokens = kernel_tokens(peaked, [SamplingRow(min_p=1.0), SamplingRow(top_k=1)],
                           torch.tensor([0.999, 0.001], dtype=torch.float64))
    assert tokens.tolist() == [123, 123]


@needs_kernel
def test_argmax_is_torchs_including_ties_and_nan() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 50304, generator=generator)
    logits[1, 100] = logits[1, 40000] = 99.0  # a tie: the first index
    logits[2, 7] = float("nan")
    logits[2, 9] = float("nan")
    logits[3] = float("-inf")
    logits[4, -1] = float("inf")
    assert cpu_sampling.argmax(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert cpu_sampling.argmax(logits[:, :17]).tolist() == logits[:, :17].argmax(dim=-1).tolist()  # strided rows


@needs_kernel
def test_logsumexp_is_torchs() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(37, 50304, generator=generator) * 4
    logits[3, 5:] = float("-inf")
    torch.testing.assert_close(cpu_sampling.logsumexp(logits), logits.logsumexp(dim=-1), atol=2e-6, rtol=1e-6)
    odd = torch.zeros(3, 10)
    odd[0] = float("-inf")
    odd[1, 4] = float("inf")
    odd[2, 2] = float("nan")
    assert str(cpu_sampling.logsumexp(odd).tolist()) == str(odd.logsumexp(dim=-1).tolist())


def test_kernels_switched_off_mean_the_torch_sampler(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NEOX_RAY_CPU_KERNELS", "0")
    monkeypatch.setenv("NEOX_RAY_KERNEL_CACHE", str(tmp_path))
    cpu_sampling._library.cache_clear()
    try:
        assert cpu_sampling.available() is False and not sampler_module._use_kernel(torch.zeros(1, 4))
        logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
        assert Sampler(0)(logits, [SamplingRow(temperature=0.0)])[0].token_id == 1
        assert Sampler(0)(logits, [SamplingRow(top_k=2, seed=3)])[0].token_id in (1, 3)
        with pytest.raises(RuntimeError, match="not available"):
            cpu_sampling.argmax(logits)
        assert not list(tmp_path.iterdir())  # nothing was built
    finally:
        monkeypatch.undo()
        cpu_sampling._library.cache_clear()
