"""Turns one step's logits into tokens: penalties, temperature, top-k / top-p / min-p, seeded sampling.

Everything is applied to the whole batch as tensors, in this order: bans (eos / stop ids below
``min_tokens``) and penalties, temperature, top-k and top-p, min-p. A temperature below
``GREEDY_TEMPERATURE`` is greedy (dividing logits by it would overflow) and skips the rest; a ``top_k`` at
or above the vocabulary size is no filter.

Sampling draws one uniform number ``u`` per row and returns the token where the cumulative probability
of the kept tokens (in vocabulary order) first exceeds ``u`` times their mass: an exact draw from the
filtered, renormalized distribution with a single random number, so no noise vector over the vocabulary
is ever drawn. A seeded request's ``u`` is a hash of ``(seed, output position)``, so its tokens depend on
nothing else: not on the rest of the batch, its row in it, preemption, or the run. Any seed in [0, 2**64)
(and the per-sample seeds derived from it) works. Rows without a seed draw ``u`` from the sampler's
generator, one small tensor per step.

Top-p is a rejection test, not a cut searched for first: a row with ``top_p < 1`` draws from the top-k /
min-p distribution and keeps the token if the tokens likelier than it hold less than ``top_p`` of the top-k
mass (exactly when the top-p filter keeps it), else draws again with the next of its uniforms (``u``, then
:func:`derived_uniforms` of it); an accepted draw follows the filtered distribution exactly and takes
1 / (kept share) draws on average (~1.05 at top-p 0.95). After ``TOP_P_DRAWS`` rejections the row finds the
exact cut and draws once among the tokens it keeps. The C kernel's test is one pass over the row; finding the
cut was three (a histogram of every token among them), the costliest part of sampling a flat row.

The torch path tests a draw against the exact top-p filter, found without sorting the vocabulary: the
likeliest ``TOP_P_PREFILTER`` tokens are taken with ``topk``;
a row whose ``top_k`` fits in them, or whose top-p mass is reached inside them, needs nothing else (the
usual case for a trained model). A flatter row finds its cut with a histogram of its probabilities over
their float bit patterns (one ``scatter_add``) and sorts only the tokens of the bucket where the mass
crosses ``top_p``. Only a ``top_k`` above the prefilter takes a ``topk`` of that size. Which of these a
row takes depends on its own logits and parameters alone. The draw itself is a two-level search (block
sums, then one block), so no float64 copy of the vocabulary is made.

On the CPU, float32 rows are filtered and drawn by the C kernel of :mod:`neox_ray.kernels.cpu_sampling`
instead (same uniforms, same filters as thresholds, a few passes per row instead of a dozen torch ops);
the torch code below is its fallback and the path on other devices.

Returned logprobs are those of the model's raw distribution (log-softmax of the logits before
penalties, temperature and filters), as vLLM returns by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from neox_ray.engine.step import SampleResult, SamplingRow
from neox_ray.kernels import cpu_sampling

GREEDY_TEMPERATURE = 1e-5
TOP_P_PREFILTER = 256  # likeliest tokens taken with topk before top-p falls back to the histogram
TOP_P_DRAWS = 4  # top-p rejections before the exact cut (the C kernel's TOP_P_DRAWS)
_MASK64 = (1 << 64) - 1


_GOLDEN64 = 0x9E3779B97F4A7C15


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over a uint64 array: a bijection on 64-bit integers that spreads every input bit
    (numpy's uint64 products wrap modulo 2**64)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _generator_keys(seeds: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """63-bit hashes (uint64) of each (seed, output position), folding in a seed's bits past 64 (per-sample
    offsets): the keys seeded rows draw their uniforms from."""
    low = np.array([seed & _MASK64 for seed in seeds], dtype=np.uint64)
    high = np.array([(seed >> 64) & _MASK64 for seed in seeds], dtype=np.uint64)
    offsets = np.array([(position + _GOLDEN64) & _MASK64 for position in positions], dtype=np.uint64)
    return _mix64(_mix64(low) ^ _mix64(high) ^ _mix64(offsets)) >> np.uint64(1)


def generator_seed(seed: int, position: int) -> int:
    """The 63-bit key of one (seed, output position) (the name is from when it seeded a torch generator)."""
    return int(_generator_keys([seed], [position])[0])


def row_uniforms(seeds: Sequence[int], positions: Sequence[int]) -> list[float]:
    """The uniform numbers in (0, 1) (53 bits of each key) that seeded rows sample their tokens at
    ``positions`` with; one numpy pass for a step's seeded rows."""
    keys = _generator_keys(seeds, positions)
    return (((keys >> np.uint64(10)).astype(np.float64) + 0.5) * 2.0 ** -53).tolist()


def derived_uniforms(first: Sequence[float], attempts: int) -> np.ndarray:
    """(rows, attempts) float64: each row's uniforms for draws 1..attempts after its first ``u`` (splitmix64 of
    u's bits plus the attempt times the golden ratio, 53 bits in (0, 1)); the C kernel computes the same."""
    bits = np.asarray(first, dtype=np.float64).view(np.uint64)
    keys = bits[:, None] + np.arange(1, attempts + 1, dtype=np.uint64)[None, :] * np.uint64(_GOLDEN64)
    return ((_mix64(keys) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def row_uniform(seed: int, position: int) -> float:
    """:func:`row_uniforms` of one row."""
    return row_uniforms([seed], [position])[0]


def _kept_by_top_k_top_p(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                         vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of a row's likeliest tokens survive top-k then top-p: a token is dropped when the tokens
    before it already hold ``top_p`` of the top-k mass; the top token always stays.

    sorted_probs: (rows, n) probabilities sorted descending (n <= vocab, with n >= top_k where top_k is
    below vocab); top_k: (rows, 1), ``vocab`` when off; top_p: (rows, 1). Returns the (rows, n) keep mask
    and, per row, whether the token after the n-th would be dropped by top-p ((rows,) bool). Only prefix
    sums of ``sorted_probs`` are used, so the first columns come out the same however many follow."""
    positions = torch.arange(sorted_probs.shape[1], device=sorted_probs.device).unsqueeze(0)
    cumulative = sorted_probs.cumsum(dim=-1)
    top_k_mass = torch.where(top_k < vocab, cumulative.gather(1, (top_k - 1).clamp(max=sorted_probs.shape[1] - 1)),
                             torch.ones_like(top_p))
    no_top_p = top_p >= 1.0
    keep = (positions < top_k) & (((cumulative - sorted_probs) / top_k_mass < top_p) | no_top_p)
    keep[:, 0] = True
    next_dropped = ((cumulative[:, -1:] / top_k_mass >= top_p) & ~no_top_p).squeeze(1)
    return keep, next_dropped


class Sampler:
    def __init__(self, unseeded_generator_seed: int | None = None):
        self.generator = torch.Generator()
        if unseeded_generator_seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(unseeded_generator_seed)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        """logits: (rows, vocab) float32 on any device."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(rows)} sampling rows")
        logprob_rows = [i for i, r in enumerate(rows) if r.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
        if any(r.needs_history or r.banned_token_ids for r in rows):
            logits = logits.clone()  # penalties and bans edit in place; the caller's logits stay intact
            self._apply_penalties(logits, rows)
            self._apply_bans(logits, rows)
        sampled = [i for i, r in enumerate(rows) if r.temperature >= GREEDY_TEMPERATURE]
        if len(sampled) == len(rows):
            tokens = self._sample(logits, rows)
        else:
            tokens = cpu_sampling.argmax(logits) if _use_kernel(logits) else logits.argmax(dim=-1)
            if sampled:
                index = torch.tensor(sampled, device=logits.device)
                tokens[index] = self._sample(logits[index], [rows[i] for i in sampled])
        token_list = tokens.tolist()
        results = [SampleResult(token) for token in token_list]
        if raw_logprobs is not None:
            self._add_logprobs(results, raw_logprobs, logprob_rows, rows, tokens)
        return results

    @staticmethod
    def _add_logprobs(results: list[SampleResult], raw_logprobs: torch.Tensor, logprob_rows: list[int],
                      rows: list[SamplingRow], tokens: torch.Tensor) -> None:
        chosen = tokens[logprob_rows].to(raw_logprobs.device).unsqueeze(1)
        chosen_logprobs = raw_logprobs.gather(1, chosen).squeeze(1).tolist()
        widest = min(max(rows[i].logprobs or 0 for i in logprob_rows), raw_logprobs.shape[1])
        top_values, top_ids = raw_logprobs.topk(widest, dim=-1) if widest else (None, None)
        for k, i in enumerate(logprob_rows):
            result = results[i]
            result.logprob = chosen_logprobs[k]
            wanted = min(rows[i].logprobs or 0, raw_logprobs.shape[1])
            if wanted and top_values is not None and top_ids is not None:
                result.top_logprobs = list(zip(top_ids[k, :wanted].tolist(), top_values[k, :wanted].tolist(),
                                               strict=True))
            else:
                result.top_logprobs = []

    @staticmethod
    def _apply_bans(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        vocab = logits.shape[1]
        pairs = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids if t < vocab]
        if pairs:
            index = torch.tensor(pairs, dtype=torch.long, device=logits.device)
            logits[index[:, 0], index[:, 1]] = float("-inf")

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Repetition penalty (divide positive logits of tokens seen in prompt or output, multiply negative
        ones), then frequency and presence penalties (by count in the output), one scatter each."""
        device, vocab = logits.device, logits.shape[1]
        repeated = [i for i, r in enumerate(rows) if r.repetition_penalty != 1.0]
        if repeated:
            seen = _token_counts([rows[i].prompt_token_ids + rows[i].output_token_ids for i in repeated],
                                 vocab, device) > 0
            penalty = torch.tensor([rows[i].repetition_penalty for i in repeated], device=device).unsqueeze(1)
            index = torch.tensor(repeated, device=device)
            values = logits[index]
            penalized = torch.where(values > 0, values / penalty, values * penalty)
            logits[index] = torch.where(seen, penalized, values)
        counted = [i for i, r in enumerate(rows)
                   if r.output_token_ids and (r.presence_penalty or r.frequency_penalty)]
        if counted:
            counts = _token_counts([rows[i].output_token_ids for i in counted], vocab, device)
            frequency = torch.tensor([rows[i].frequency_penalty for i in counted], device=device).unsqueeze(1)
            presence = torch.tensor([rows[i].presence_penalty for i in counted], device=device).unsqueeze(1)
            index = torch.tensor(counted, device=device)
            logits[index] -= frequency * counts + presence * (counts > 0).float()

    def _row_uniforms(self, rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
        """(rows, 1) float64 uniforms: hashed from (seed, position) for seeded rows, drawn for the rest."""
        unseeded = sum(1 for r in rows if r.seed is None)
        drawn = torch.rand(unseeded, dtype=torch.float64, generator=self.generator).tolist() if unseeded else []
        drawn.reverse()
        seeds = [r.seed for r in rows if r.seed is not None]
        positions = [r.output_position for r in rows if r.seed is not None]
        hashed = row_uniforms(seeds, positions) if seeds else []
        hashed.reverse()
        values = [hashed.pop() if r.seed is not None else drawn.pop() for r in rows]
        return torch.tensor(values, dtype=torch.float64, device=device).unsqueeze(1)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Tokens for non-greedy rows: (rows,) long."""
        uniforms = self._row_uniforms(rows, logits.device)
        if _use_kernel(logits):
            vocab = logits.shape[1]
            return cpu_sampling.sample(logits, torch.tensor([r.temperature for r in rows]),
                                       torch.tensor([r.top_k if 0 < r.top_k < vocab else 0 for r in rows]),
                                       torch.tensor([r.top_p for r in rows]), torch.tensor([r.min_p for r in rows]),
                                       uniforms.squeeze(1))
        return _draw(logits, rows, uniforms)


def _draw(logits: torch.Tensor, rows: list[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
    """The torch path's draws, the C kernel's rule: rows with top-p propose up to ``TOP_P_DRAWS`` tokens from
    their top-k / min-p distribution and take the first the top-p filter keeps, else one draw from the exact
    filtered distribution with the next uniform. (rows,) long."""
    if all(r.top_p >= 1.0 for r in rows):
        return _inverse_cdf(filtered_probs(logits, rows), uniforms)
    extra = torch.from_numpy(derived_uniforms(uniforms.squeeze(1).tolist(), TOP_P_DRAWS)).to(uniforms.device)
    probs = _tempered_probs(logits, rows)
    proposal_probs = _apply_filters(probs.clone(), [replace(r, top_p=1.0) for r in rows])
    kept = _apply_filters(probs, rows)
    proposals = _inverse_cdf(proposal_probs, torch.cat([uniforms, extra[:, :TOP_P_DRAWS - 1]], dim=1))
    accepted = kept.gather(1, proposals) > 0
    accepted[:, 0] |= torch.tensor([r.top_p >= 1.0 for r in rows], device=logits.device)
    tokens = proposals.gather(1, accepted.int().argmax(dim=1, keepdim=True)).squeeze(1)
    rejected = ~accepted.any(dim=1)
    if bool(rejected.any()):
        index = rejected.nonzero().squeeze(1)
        tokens[index] = _inverse_cdf(kept[index], extra[index, TOP_P_DRAWS - 1:])
    return tokens


def _use_kernel(logits: torch.Tensor) -> bool:
    """float32 logits on the CPU are sampled (and argmaxed) by the C kernel when it built: the same tokens,
    fewer passes."""
    return cpu_sampling.applies(logits)


def filtered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution non-greedy rows sample from, not renormalized: softmax(logits / temperature) with
    the tokens top-k, top-p and min-p drop set to 0. (rows, vocab) float32."""
    return _apply_filters(_tempered_probs(logits, rows), rows)


def _tempered_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """softmax(logits / temperature), (rows, vocab) float32."""
    temperatures = torch.tensor([r.temperature for r in rows], device=logits.device).unsqueeze(1)
    return (logits / temperatures).softmax(dim=-1)


def _apply_filters(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """``probs`` with the tokens top-k, top-p and min-p drop set to 0, in place (returned)."""
    device, vocab = probs.device, probs.shape[1]
    filtered = [i for i, r in enumerate(rows) if 0 < r.top_k < vocab or r.top_p < 1.0]
    if len(filtered) == len(rows):
        probs = probs.masked_fill_(_dropped_tokens(probs, rows), 0.0)
    elif filtered:
        index = torch.tensor(filtered, device=device)
        probs[index] = probs[index].masked_fill_(_dropped_tokens(probs[index], [rows[i] for i in filtered]), 0.0)
    if any(r.min_p > 0 for r in rows):  # relative to the likeliest token, so renormalizing changes nothing
        min_p = torch.tensor([r.min_p for r in rows], device=device).unsqueeze(1)
        probs = probs.masked_fill_(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _dropped_tokens(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """(rows, vocab) bool: the tokens top-k and top-p drop, for rows that have either filter.

    Three ways, chosen per row from its own parameters and probabilities: a ``top_k`` up to
    ``TOP_P_PREFILTER``, or a top-p that the likeliest ``TOP_P_PREFILTER`` tokens can reach, sorts just those
    (``topk``); a top-p they cannot reach (or do not reach after all) takes the histogram; a larger
    ``top_k`` takes a ``topk`` of its size."""
    device, vocab = probs.device, probs.shape[1]
    top_k = torch.tensor([min(r.top_k, vocab) if r.top_k > 0 else vocab for r in rows], device=device).unsqueeze(1)
    top_p = torch.tensor([r.top_p for r in rows], device=device).unsqueeze(1)
    width = min(vocab, TOP_P_PREFILTER)
    top_k_fits = (top_k <= width).squeeze(1)
    top_p_only = (top_k >= vocab).squeeze(1)
    # width * p_max < top_p: the likeliest width tokens cannot hold top_p, go straight to the histogram.
    prefilter = top_k_fits | (top_p_only & (probs.amax(dim=-1) * width >= top_p.squeeze(1)))
    histogram = top_p_only & ~prefilter
    if bool(histogram.all()):
        return probs < _top_p_threshold(probs, top_p)
    if bool(prefilter.all()):
        dropped, unresolved = _dropped_by_prefilter(probs, top_k, top_p, width)
        if not bool(unresolved.any()):
            return dropped
        histogram = unresolved
    else:
        dropped = torch.ones_like(probs, dtype=torch.bool)
        if bool(prefilter.any()):
            index = prefilter.nonzero().squeeze(1)
            dropped[index], unresolved = _dropped_by_prefilter(probs[index], top_k[index], top_p[index], width)
            histogram[index] |= unresolved
    if bool(histogram.any()):
        index = histogram.nonzero().squeeze(1)
        dropped[index] = probs[index] < _top_p_threshold(probs[index], top_p[index])
    wide_top_k = ~top_k_fits & ~top_p_only
    if bool(wide_top_k.any()):
        index = wide_top_k.nonzero().squeeze(1)
        sorted_probs, ids = probs[index].topk(int(top_k[index].max()), dim=-1)
        keep_sorted, _ = _kept_by_top_k_top_p(sorted_probs, top_k[index], top_p[index], probs.shape[1])
        dropped[index] = torch.ones_like(probs[index], dtype=torch.bool).scatter_(1, ids, ~keep_sorted)
    return dropped


def _dropped_by_prefilter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k / top-p among each row's likeliest ``width`` tokens: the (rows, vocab) dropped mask, and
    which rows (top-p only) did not reach top_p inside them ((rows,) bool)."""
    sorted_probs, ids = probs.topk(width, dim=-1)
    keep_sorted, next_dropped = _kept_by_top_k_top_p(sorted_probs, top_k, top_p, probs.shape[1])
    dropped = torch.ones_like(probs, dtype=torch.bool).scatter_(1, ids, ~keep_sorted)
    return dropped, (top_k > width).squeeze(1) & ~next_dropped


_BUCKET_SHIFT = 16  # buckets of float32 bit patterns: sign, exponent and 7 mantissa bits (128 per octave)
_FLOAT32_ONE_BITS = 0x3F800000


def _top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p without sorting the vocabulary: (rows, vocab) probabilities, (rows, 1) top_p < 1; returns
    the (rows, 1) smallest probability kept. Non-negative float32 values order like their int32 bit
    patterns, so buckets of high bits are ranges of probability; the mass per bucket says in which
    bucket the cumulative mass (from the likeliest token down) crosses top_p; every token above that
    bucket is kept, every one below dropped, and only the tokens of the crossing bucket are sorted."""
    num_buckets = (_FLOAT32_ONE_BITS >> _BUCKET_SHIFT) + 1  # probabilities are at most 1.0
    # float32 bucket sums: rounding moves the cut by ~1e-10 of mass, far below any token that matters.
    mass = torch.zeros(probs.shape[0], num_buckets, device=probs.device)
    mass.scatter_add_(1, (probs.view(torch.int32) >> _BUCKET_SHIFT).long(), probs)
    up_to = mass.double().cumsum(dim=-1)  # mass of each bucket and those below it
    total = up_to[:, -1:]
    # The crossing bucket is the lowest one with less than top_p above it (none when rounding left the total
    # below top_p: then the lowest bucket, which keeps everything).
    crossing = torch.searchsorted(up_to, (total - top_p.double()).clamp(min=-1.0), right=True)
    crossing = crossing.clamp(max=num_buckets - 1)
    above = total - up_to.gather(1, crossing)  # mass of the buckets strictly above the crossing one
    lower = (crossing.int() << _BUCKET_SHIFT).view(torch.float32)  # the crossing bucket's smallest value
    upper = ((crossing.int() + 1) << _BUCKET_SHIFT).view(torch.float32)  # and the next bucket's
    candidates = probs.masked_fill(probs >= upper, -1.0)
    width = max(1, int(torch.count_nonzero(candidates >= lower, dim=-1).max()))
    candidates = candidates.topk(width, dim=-1).values  # the crossing bucket's tokens, sorted, first
    in_crossing = candidates >= lower
    candidates = candidates.double()
    before = above + candidates.masked_fill(~in_crossing, 0.0).cumsum(dim=-1) - candidates
    kept_in_crossing = in_crossing & (before < top_p)
    kept_in_crossing[:, 0] = True  # the crossing bucket's top token: the mass above it is below top_p
    threshold = candidates.masked_fill(~kept_in_crossing, float("inf")).min(dim=-1, keepdim=True).values
    return threshold.float()  # every token above the crossing bucket is above it too


_BLOCK = 128  # tokens per block of the two-level inverse CDF


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token where the cumulative probability (vocabulary order) first exceeds ``u`` times the row's
    mass: (rows, vocab) probabilities (0 = dropped), (rows, draws) float64 uniforms -> (rows,) long for one
    draw a row, else (rows, draws).

    Two levels, so that only one block of each row is summed in float64: float32 block sums (rounding
    moves boundaries by ~1e-10 of mass), their float64 cumulative sum, then the chosen block's tokens."""
    rows, vocab = probs.shape
    if vocab % _BLOCK:
        probs = torch.nn.functional.pad(probs, (0, _BLOCK - vocab % _BLOCK))
    blocks = probs.view(rows, -1, _BLOCK)  # (rows, blocks, block)
    block_mass = blocks.sum(dim=-1)  # (rows, blocks)
    block_cumulative = block_mass.double().cumsum(dim=-1)
    targets = uniforms * block_cumulative[:, -1:]
    block = torch.searchsorted(block_cumulative, targets, right=True)  # (rows, 1)
    # Rounding can leave a target at the very end: take the last block with any mass then (and below, the
    # last kept token of a block the target is past).
    block = torch.minimum(block, (block_mass > 0).int().cumsum(dim=-1).argmax(dim=-1, keepdim=True))
    before = torch.where(block > 0, block_cumulative.gather(1, (block - 1).clamp(min=0)), 0.0)
    draws = uniforms.shape[1]
    inside = blocks.gather(1, block.unsqueeze(2).expand(rows, draws, _BLOCK))  # (rows, draws, block)
    position = torch.searchsorted(before.unsqueeze(2) + inside.double().cumsum(dim=-1), targets.unsqueeze(2),
                                  right=True)
    last_kept = (inside > 0).int().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    position = torch.minimum(position, last_kept).squeeze(2)
    tokens = block * _BLOCK + position
    return tokens.squeeze(1) if draws == 1 else tokens


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(len(token_lists), vocab) float32 counts of each token per list: one scatter_add over a padded tensor
    (padding goes to an extra column that is dropped)."""
    width = max(1, max(len(tokens) for tokens in token_lists))
    padded = torch.tensor([tokens + [vocab] * (width - len(tokens)) for tokens in token_lists], dtype=torch.long,
                          device=device)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]
