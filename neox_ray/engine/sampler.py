"""Turns one step's logits into tokens: penalties, temperature, top-k / top-p / min-p, seeded sampling.

Reproducibility: a request with a seed draws its randomness from a generator seeded with a 63-bit hash of
``(seed, output position)`` and used by that row alone, so its tokens do not depend on the rest of the
batch, its position in it, preemption, or the run; any seed in [0, 2**64) (and the per-sample seeds
derived from it) works. Sampling is the exponential race ``argmax(p / q), q ~ Exp(1)``, which draws
exactly from ``p`` with one vector of noise per row. A temperature below ``GREEDY_TEMPERATURE`` is greedy
(dividing logits by it would overflow), and a ``top_k`` at or above the vocabulary size is no filter.

Returned logprobs are those of the model's raw distribution (log-softmax of the logits before
penalties, temperature and filters), as vLLM returns by default.
"""

from __future__ import annotations

import torch

from neox_ray.engine.step import SampleResult, SamplingRow

GREEDY_TEMPERATURE = 1e-5
_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit integers that spreads every input bit."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def generator_seed(seed: int, position: int) -> int:
    """The torch generator seed of one (seed, output position): 63 bits, inside manual_seed's range."""
    folded = _mix64(seed) ^ _mix64(seed >> 64)  # seeds past 64 bits (per-sample offsets) still count
    return _mix64(folded ^ _mix64(position + 0x9E3779B97F4A7C15)) >> 1


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
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.logprobs is not None for r in rows) else None
        if any(r.needs_history or r.banned_token_ids for r in rows):
            logits = logits.clone()  # penalties and bans edit in place; the caller's logits stay intact
        self._apply_penalties(logits, rows)
        for i, row in enumerate(rows):
            if row.banned_token_ids:
                logits[i, [t for t in row.banned_token_ids if t < logits.shape[1]]] = float("-inf")
        greedy = torch.tensor([r.temperature < GREEDY_TEMPERATURE for r in rows], device=logits.device)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            tokens = torch.where(greedy, tokens, self._sample(logits, rows, greedy))
        token_list = tokens.tolist()
        results = []
        for i, (row, token) in enumerate(zip(rows, token_list)):
            result = SampleResult(token)
            if row.logprobs is not None and raw_logprobs is not None:
                result.logprob = float(raw_logprobs[i, token])
                if row.logprobs > 0:
                    values, ids = raw_logprobs[i].topk(min(row.logprobs, raw_logprobs.shape[1]))
                    result.top_logprobs = list(zip(ids.tolist(), values.tolist()))
                else:
                    result.top_logprobs = []
            results.append(result)
        return results

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        for i, row in enumerate(rows):
            if not row.needs_history:
                continue
            if row.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                                    dtype=torch.long, device=logits.device)
                if len(seen):
                    values = logits[i, seen]
                    logits[i, seen] = torch.where(values > 0, values / row.repetition_penalty,
                                                  values * row.repetition_penalty)
            if row.output_token_ids and (row.presence_penalty or row.frequency_penalty):
                counts = torch.zeros(logits.shape[1], device=logits.device)
                counts.index_add_(0, torch.tensor(row.output_token_ids, device=logits.device),
                                  torch.ones(len(row.output_token_ids), device=logits.device))
                logits[i] -= row.frequency_penalty * counts + row.presence_penalty * (counts > 0).float()

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], greedy: torch.Tensor) -> torch.Tensor:
        temperatures = torch.tensor([r.temperature if r.temperature >= GREEDY_TEMPERATURE else 1.0 for r in rows],
                                    device=logits.device).unsqueeze(1)
        logits = logits / temperatures
        vocab = logits.shape[1]
        if any(0 < r.top_k < vocab or r.top_p < 1.0 for r in rows):
            logits = self._top_k_top_p(logits, rows)
        probs = logits.softmax(dim=-1)
        if any(r.min_p > 0 for r in rows):
            min_p = torch.tensor([r.min_p for r in rows], device=logits.device).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            if bool(greedy[i]):
                noise[i] = 1.0
                continue
            generator = self.generator
            if row.seed is not None:
                generator = torch.Generator().manual_seed(generator_seed(row.seed, row.output_position))
            noise[i] = torch.empty(probs.shape[1]).exponential_(generator=generator).to(probs.device)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        positions = torch.arange(vocab, device=logits.device).unsqueeze(0)
        top_k = torch.tensor([min(r.top_k, vocab) if r.top_k > 0 else vocab for r in rows],
                             device=logits.device).unsqueeze(1)
        remove = positions >= top_k
        top_p = torch.tensor([r.top_p for r in rows], device=logits.device).unsqueeze(1)
        cumulative = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the top token always stays.
        remove |= (cumulative - sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)) >= top_p
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
