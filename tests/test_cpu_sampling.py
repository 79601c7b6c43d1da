"""The C sampling kernel against the float64 sort-based oracle of tests/test_sampler.py: every token it
draws is kept by the filters and sits where the uniform falls in the oracle's cumulative distribution;
and the Sampler gives the same tokens with the kernel as with its torch path."""

from __future__ import annotations

import pytest
import torch
from test_sampler import oracle_filtered_probs, random_rows

from neox_ray.engine import sampler as sampler_module
from neox_ray.engine.sampler import Sampler
from neox_ray.engine.step import SamplingRow
from neox_ray.kernels import cpu_sampling

needs_kernel = pytest.mark.skipif(not cpu_sampling.available(), reason="the CPU sampling kernel did not build here")


def kernel_tokens(logits: torch.Tensor, rows: list[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[1]
    return cpu_sampling.sample(logits, torch.tensor([r.temperature for r in rows]),
                               torch.tensor([r.top_k if 0 < r.top_k < vocab else 0 for r in rows]),
                               torch.tensor([r.top_p for r in rows]), torch.tensor([r.min_p for r in rows]),
                               uniforms)


@needs_kernel
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("vocab", [3000, 50304])
def test_each_draw_is_where_the_uniform_falls_in_the_oracle_distribution(scale: float, vocab: int) -> None:
    generator = torch.Generator().manual_seed(int(scale * 10) + vocab)
    logits = torch.randn(48, vocab, generator=generator) * scale
    rows = random_rows(48, vocab, generator)
    expected, margin = oracle_filtered_probs(logits, rows)
    for _ in range(4):
        uniforms = torch.rand(48, dtype=torch.float64, generator=generator)
        tokens = kernel_tokens(logits, rows, uniforms)
        chosen = tokens.unsqueeze(1)
        # A token the oracle drops may only be drawn where float rounding decides its filter.
        dropped = expected.gather(1, chosen).squeeze(1) == 0
        assert not bool((dropped & (margin.gather(1, chosen).squeeze(1) > 1e-5)).any())
        mass = expected / expected.sum(dim=-1, keepdim=True)
        up_to = mass.cumsum(dim=-1).gather(1, chosen).squeeze(1)
        before = up_to - mass.gather(1, chosen).squeeze(1)
        near_cut = (margin < 1e-5).any(dim=-1)  # a filter decided by rounding shifts the whole CDF a hair
        inside = (before - 1e-5 <= uniforms) & (uniforms <= up_to + 1e-5)
        assert bool((inside | near_cut).all()), [(rows[i], float(uniforms[i])) for i in (~inside).nonzero()[:, 0]]


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
