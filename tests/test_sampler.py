"""The vectorised sampler (C kernel and torch path) against the per-row sort-based code it replaced (kept
here as the oracle), its sampling statistics, and the reproducibility of seeded rows. No model: logits are
made up."""

from __future__ import annotations

import random

import pytest
import torch

from neox_ray.engine import sampler as sampler_module
from neox_ray.engine.sampler import TOP_P_PREFILTER, Sampler, _inverse_cdf, filtered_probs, row_uniform, row_uniforms
from neox_ray.engine.step import SamplingRow
from neox_ray.kernels import cpu_sampling


@pytest.fixture(params=["kernel", "torch"], autouse=True)
def sampling_path(request, monkeypatch) -> str:
    """Every Sampler test runs on the C kernel (when it built) and on the torch path it falls back to."""
    if request.param == "kernel" and not cpu_sampling.available():
        pytest.skip("the CPU sampling kernel did not build here")
    if request.param == "torch":
        monkeypatch.setattr(sampler_module, "_use_kernel", lambda logits: False)
    return str(request.param)


# ---- the previous implementation, the oracle ---------------------------------------------------------------
def oracle_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    logits = logits.clone()
    for i, row in enumerate(rows):
        if not row.needs_history:
            continue
        if row.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
            if len(seen):
                values = logits[i, seen]
                logits[i, seen] = torch.where(values > 0, values / row.repetition_penalty,
                                              values * row.repetition_penalty)
        if row.output_token_ids and (row.presence_penalty or row.frequency_penalty):
            counts = torch.zeros(logits.shape[1])
            counts.index_add_(0, torch.tensor(row.output_token_ids), torch.ones(len(row.output_token_ids)))
            logits[i] -= row.frequency_penalty * counts + row.presence_penalty * (counts > 0).float()
    return logits


def oracle_filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the probabilities after temperature, top-k / top-p (full sort) and min-p, and each token's
    distance from its top-p decision (|mass before it - top_p|, in sorted order), in float64."""
    logits = logits.double() / torch.tensor([r.temperature for r in rows], dtype=torch.float64).unsqueeze(1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    positions = torch.arange(vocab).unsqueeze(0)
    top_k = torch.tensor([min(r.top_k, vocab) if r.top_k > 0 else vocab for r in rows]).unsqueeze(1)
    remove = positions >= top_k
    top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float64).unsqueeze(1)
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    remove |= (before >= top_p) & (top_p < 1.0)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    filtered = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    margin = torch.empty_like(logits).scatter_(1, order, (before - top_p).abs())
    probs = filtered.softmax(dim=-1)
    min_p = torch.tensor([r.min_p for r in rows], dtype=torch.float64).unsqueeze(1)
    return probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0), margin


def random_rows(count: int, vocab: int, generator: torch.Generator) -> list[SamplingRow]:
    rows = []
    for _ in range(count):
        choice = int(torch.randint(5, (1,), generator=generator))
        top_k = [0, 1, 7, TOP_P_PREFILTER + 37, vocab][choice]
        top_p = [1.0, 0.5, 0.9, 0.97, 0.999][int(torch.randint(5, (1,), generator=generator))]
        min_p = [0.0, 0.0, 0.05][int(torch.randint(3, (1,), generator=generator))]
        temperature = [0.3, 0.8, 1.0, 1.7][int(torch.randint(4, (1,), generator=generator))]
        rows.append(SamplingRow(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    return rows


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 8.0])  # flat (histogram path) to peaked (prefilter path)
def test_filters_keep_the_same_tokens_as_the_sort_based_oracle(scale: float) -> None:
    generator = torch.Generator().manual_seed(int(scale * 10))
    vocab = 3000
    logits = torch.randn(64, vocab, generator=generator) * scale
    rows = random_rows(64, vocab, generator)
    expected, margin = oracle_filtered_probs(logits, rows)
    kept = filtered_probs(logits, rows) > 0
    # float32 probabilities underflow where the oracle's float64 ones do not: such tokens are never drawn.
    representable = expected > expected.max(dim=-1, keepdim=True).values * 1e-30
    disagree = (kept & (expected == 0)) | (~kept & representable)
    # Float rounding may only decide tokens whose mass-before sits within a hair of top_p.
    assert not bool((disagree & (margin > 1e-5)).any()), [rows[i] for i in disagree.any(dim=-1).nonzero()[:, 0]]
    assert int(disagree.sum()) <= 2
    probs = filtered_probs(logits, rows).double()
    torch.testing.assert_close(probs / probs.sum(dim=-1, keepdim=True), expected / expected.sum(dim=-1, keepdim=True),
                               atol=1e-6, rtol=1e-4)


def test_penalties_equal_the_per_row_loop() -> None:
    generator = torch.Generator().manual_seed(5)
    vocab = 500
    logits = torch.randn(12, vocab, generator=generator) * 3
    rows = []
    for i in range(12):
        history = torch.randint(vocab, (int(torch.randint(0, 40, (1,), generator=generator)),),
                                generator=generator).tolist()
        prompt = torch.randint(vocab, (10,), generator=generator).tolist()
        rows.append(SamplingRow(repetition_penalty=[1.0, 1.3, 0.7][i % 3], presence_penalty=[0.0, 0.5, -0.4][i % 3 - 1],
                                frequency_penalty=[0.0, 0.2, 1.1][(i // 3) % 3], prompt_token_ids=prompt,
                                output_token_ids=history))
    penalized = logits.clone()
    Sampler._apply_penalties(penalized, rows)
    torch.testing.assert_close(penalized, oracle_penalties(logits, rows), atol=1e-6, rtol=1e-6)


def test_seeded_row_is_the_same_alone_in_a_batch_and_at_another_index() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 2000
    target_logits = torch.randn(1, vocab, generator=generator)
    for template in (SamplingRow(), SamplingRow(top_p=0.9), SamplingRow(top_k=20, top_p=0.95),
                     SamplingRow(min_p=0.1), SamplingRow(top_p=0.5)):
        sampler = Sampler(0)
        tokens = []
        for position in range(6):
            target = SamplingRow(**{**template.__dict__, "temperature": 0.9, "seed": 1234,
                                    "output_position": position})
            alone = sampler(target_logits, [target])[0].token_id
            others = torch.randn(9, vocab, generator=generator) * 4
            mates = [SamplingRow(temperature=t, top_p=p, seed=s) for t, p, s in
                     [(1.0, 1.0, None), (0.0, 1.0, None), (0.5, 0.3, 7), (1.2, 0.99, None), (0.7, 1.0, 3),
                      (1.0, 0.8, None), (2.0, 1.0, 9), (0.0, 1.0, 1), (1.0, 0.95, None)]]
            for index in (0, 4, 9):
                batch = torch.cat([others[:index], target_logits, others[index:]])
                rows = mates[:index] + [target] + mates[index:]
                assert sampler(batch, rows)[index].token_id == alone
            tokens.append(alone)
        assert len(set(tokens)) > 1  # the position moves the draw


def test_every_seed_works_and_the_uniform_stays_inside_zero_one() -> None:
    for seed in (0, 1, 2**63, 2**64 - 1, 2**64 - 1 + 7919 * 3):
        for position in (0, 1, 10**6):
            assert 0.0 < row_uniform(seed, position) < 1.0
    assert row_uniform(5, 0) != row_uniform(5, 1) != row_uniform(6, 1)


_MASK64 = (1 << 64) - 1


def _reference_mix64(value: int) -> int:
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def reference_row_uniform(seed: int, position: int) -> float:
    """The seeded uniform written out with Python integers (splitmix64's finalizer, masked to 64 bits)."""
    folded = _reference_mix64(seed) ^ _reference_mix64(seed >> 64)
    key = _reference_mix64(folded ^ _reference_mix64(position + 0x9E3779B97F4A7C15)) >> 1
    return ((key >> 10) + 0.5) * 2.0 ** -53


def test_a_steps_uniforms_hashed_at_once_equal_the_per_row_hash() -> None:
    """The sampler hashes a step's seeded rows in one numpy pass; the values are the Python-integer hash's,
    bit for bit, for seeds past 64 bits (per-sample offsets) and positions past 64 bits too."""
    generator = random.Random(3)
    seeds = [generator.randrange(2**64) for _ in range(500)] + [generator.randrange(2**90) for _ in range(100)]
    seeds += [0, 2**64 - 1, 2**64, 2**64 - 1 + 7919 * 3]
    positions = [generator.randrange(10**6) for _ in range(600)] + [0, 2**64 - 1, 2**64, 5]
    want = [reference_row_uniform(seed, position) for seed, position in zip(seeds, positions, strict=True)]
    assert row_uniforms(seeds, positions) == want


def test_the_draw_never_lands_on_a_dropped_token_at_the_ends_of_zero_one() -> None:
    probs = torch.zeros(3, 300)
    probs[:, 5] = 0.25
    probs[:, 130] = 0.5
    probs[:, 200] = 0.25  # tokens after 200 (and the padding to 384) are dropped
    uniforms = torch.tensor([[2.0 ** -54], [0.8], [1.0 - 2.0 ** -53]], dtype=torch.float64)
    assert _inverse_cdf(probs, uniforms).tolist() == [5, 200, 200]
    assert _inverse_cdf(probs, torch.ones(3, 1, dtype=torch.float64)).tolist() == [200] * 3  # rounded up to 1
    assert _inverse_cdf(probs, torch.full((3, 1), 0.4, dtype=torch.float64)).tolist() == [130] * 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.99th percentiles of chi-square: a correct sampler fails one of these tests about once in 10,000 runs.
CHI2_9999 = {2: 18.4, 3: 21.1, 4: 23.5, 7: 29.9}


@pytest.mark.parametrize("seeded", [True, False])
def test_samples_follow_the_filtered_distribution(seeded: bool) -> None:
    probs = torch.tensor([0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.05, 0.01])
    logits = probs.log().unsqueeze(0).repeat(20000, 1)
    sampler = Sampler(11)
    cases = [(SamplingRow(), probs),
             (SamplingRow(top_k=4), probs[:4]),
             (SamplingRow(top_p=0.6), probs[:3]),  # 0.3 + 0.2 < 0.6 <= 0.65: tokens 0-2
             (SamplingRow(min_p=0.3), probs[:5]),  # 0.07 < 0.3 * 0.3 <= 0.1
             (SamplingRow(temperature=0.5), probs ** 2)]
    for row, expected in cases:
        rows = [SamplingRow(**{**row.__dict__, "seed": i if seeded else None, "output_position": i % 7})
                for i in range(len(logits))]
        tokens = torch.tensor([r.token_id for r in sampler(logits, rows)])
        counts = torch.bincount(tokens, minlength=len(probs)).double()
        assert int(counts[len(expected):].sum()) == 0, row
        expected = expected.double() / expected.double().sum()
        assert chi_square(counts[:len(expected)], expected) < CHI2_9999[len(expected) - 1], (row, counts)


def test_flat_top_p_rows_sample_their_nucleus() -> None:
    """A distribution too flat for the top-k prefilter: the histogram path's nucleus, then frequencies."""
    vocab = 4 * TOP_P_PREFILTER
    probs = torch.linspace(1.0, 2.0, vocab)
    probs = probs / probs.sum()
    sorted_probs, order = probs.sort(descending=True)
    nucleus = order[:int((sorted_probs.cumsum(0) - sorted_probs < 0.9).sum())]
    logits = probs.log().unsqueeze(0).repeat(16000, 1)
    rows = [SamplingRow(top_p=0.9, seed=i) for i in range(len(logits))]
    tokens = torch.tensor([r.token_id for r in Sampler(0)(logits, rows)])
    assert set(tokens.tolist()) <= set(nucleus.tolist())
    # Frequencies of the nucleus in 4 groups of likelihood (each token is drawn ~20 times: group them).
    groups = torch.zeros(vocab, dtype=torch.long)
    groups[nucleus] = torch.arange(len(nucleus)) * 4 // len(nucleus)
    counts = torch.bincount(groups[tokens], minlength=4).double()
    mass = torch.zeros(4, dtype=torch.float64).index_add_(0, groups[nucleus], probs[nucleus].double())
    assert chi_square(counts, mass / mass.sum()) < CHI2_9999[3]


def test_logprobs_are_raw_and_greedy_rows_are_argmax() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 100, generator=generator)
    rows = [SamplingRow(temperature=0.0, logprobs=3), SamplingRow(temperature=0.7, top_k=5, logprobs=0, seed=1),
            SamplingRow(temperature=0.0, repetition_penalty=2.0, prompt_token_ids=[int(logits[2].argmax())]),
            SamplingRow(temperature=1.0, logprobs=1)]
    results = Sampler(0)(logits, rows)
    raw = logits.log_softmax(dim=-1)
    assert results[0].token_id == int(logits[0].argmax())
    assert results[0].top_logprobs is not None and [t for t, _ in results[0].top_logprobs] == \
        raw[0].topk(3).indices.tolist()
    assert results[1].logprob == pytest.approx(float(raw[1, results[1].token_id])) and results[1].top_logprobs == []
    assert results[1].token_id in logits[1].topk(5).indices.tolist()
    assert results[2].token_id != int(logits[2].argmax())
    assert results[2].logprob is None and results[3].top_logprobs is not None and len(results[3].top_logprobs) == 1
    banned = SamplingRow(temperature=1.0, banned_token_ids=list(range(99)) + [500])
    assert Sampler(0)(logits[:1], [banned])[0].token_id == 99
