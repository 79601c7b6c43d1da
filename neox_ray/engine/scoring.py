"""Scoring arithmetic: perplexity window plans (sliding or lm-eval's rolling), lm-eval's loglikelihood
of (context, continuation) pairs, the fan-out of both into prefill-only requests and the assembly of their
prompt logprobs into lm-eval's numbers. Pure Python: tokenizing is a callable the caller passes.

A text of N tokens is scored as ``[eot] + tokens`` so its first token is conditioned on the end-of-text
token and all N tokens are scored. Texts longer than the window use one of two plans:

* ``sliding`` (default): the transformers perplexity-guide recipe: windows start every ``stride`` tokens,
  each scores only the tokens the previous window did not, so every token is scored exactly once with as
  much left context as the window allows (lower perplexity).
* ``rolling``: lm-eval's ``loglikelihood_rolling`` (``get_rolling_token_windows(context_len=1)`` +
  ``make_disjoint_window``): disjoint windows of up to ``window`` scored tokens each, every window's input
  being the ``window`` tokens before its last target; what lm-eval reports.

A rolling window, like a loglikelihood request, is ``window + 1`` tokens long: the engine computes every
token of a prefill-only request but the last, which is only a target.

:func:`plan_scores` turns a list of texts into a :class:`ScorePlan` (the window requests of every text, in
order, plus a per-item error for texts that cannot be scored); :meth:`ScorePlan.assemble` turns the
finished windows back into :class:`ScoreOutput` s. Running the requests is the engine's
(:meth:`LLMEngine.score`, :meth:`AsyncLLMEngine.score`); mapping item errors onto an exception, an HTTP
400 or an error row is the caller's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from neox_ray.engine.outputs import ScoreOutput


@dataclass(frozen=True)
class ScoreWindow:
    begin: int          # window = full_tokens[begin:end], full_tokens = [eot] + text tokens
    end: int
    first_target: int   # first position (in full_tokens) this window scores; it scores [first_target, end)


def validate_window(window: int, stride: int, max_model_len: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    if window > max_model_len:
        raise ValueError(f"window {window} exceeds max_model_len {max_model_len}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < window:
        raise ValueError(f"stride must be an integer in [1, window) = [1, {window}), got {stride!r} "
                         "(a stride equal to the window would leave each window's first token without context)")


def plan_windows(num_text_tokens: int, window: int, stride: int) -> list[ScoreWindow]:
    total = num_text_tokens + 1  # with the leading eot token
    windows, previous_end = [], 0
    for begin in range(0, total, stride):
        end = min(begin + window, total)
        first_target = max(previous_end, 1)
        if end > first_target:
            windows.append(ScoreWindow(begin, end, first_target))
        previous_end = end
        if end == total:
            break
    return windows


def plan_rolling_windows(num_text_tokens: int, max_seq_len: int) -> list[ScoreWindow]:
    """lm-eval's rolling windows (context_len=1, disjoint) in ``[eot] + tokens`` positions."""
    first = min(max_seq_len, num_text_tokens)
    windows = [ScoreWindow(0, first + 1, 1)]
    predicted = first
    while predicted < num_text_tokens:
        end = predicted + min(num_text_tokens - predicted, max_seq_len)  # in text-token positions
        windows.append(ScoreWindow(end - max_seq_len, end + 1, predicted + 1))
        predicted = end
    return windows


def score_metrics(token_logprobs: list[float], text: str, keep_token_logprobs: bool) -> ScoreOutput:
    nll = -math.fsum(token_logprobs)
    num_tokens = len(token_logprobs)
    num_bytes = len(text.encode("utf-8"))
    num_words = len(re.split(r"\s+", text))  # lm-eval's word count
    return ScoreOutput(
        num_tokens=num_tokens, nll=nll, perplexity=_safe_exp(nll / num_tokens), num_bytes=num_bytes,
        bits_per_byte=nll / (max(num_bytes, 1) * math.log(2)), num_words=num_words,
        word_perplexity=_safe_exp(nll / max(num_words, 1)), byte_perplexity=_safe_exp(nll / max(num_bytes, 1)),
        token_logprobs=list(token_logprobs) if keep_token_logprobs else None)


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass
class ScoreTask:
    """One text to score: its windows become prefill-only requests; their prompt logprobs come back to
    :meth:`finish`, which assembles the text's metrics."""
    text: str
    full_tokens: list[int]      # [eot] + text tokens
    windows: list[ScoreWindow]

    def requests(self) -> list[tuple[list[int], int]]:
        """(token ids, logprob_start) for each window, in order."""
        return [(self.full_tokens[w.begin:w.end], w.first_target - w.begin) for w in self.windows]

    def finish(self, window_prompt_logprobs: list[list[dict[int, float] | None]],
               keep_token_logprobs: bool) -> ScoreOutput:
        logprobs: list[float] = []
        for w, entries in zip(self.windows, window_prompt_logprobs, strict=False):
            for position in range(w.first_target, w.end):
                entry = entries[position - w.begin]
                assert entry is not None, "a scored position came back without its logprob"
                logprobs.append(entry[self.full_tokens[position]])
        return score_metrics(logprobs, self.text, keep_token_logprobs)


PERPLEXITY_PLANS = ("sliding", "rolling")


def make_score_task(text: str | None, token_ids: list[int], eot_token_id: int, window: int,
                    stride: int, perplexity: str = "sliding") -> ScoreTask:
    """``text`` may be None when the caller gave token ids; it is then the ids' decoding (for bytes/words).
    ``rolling`` ignores ``stride``."""
    if not token_ids:
        raise ValueError("text is empty (no tokens to score)")
    full = [eot_token_id] + list(token_ids)
    if perplexity == "rolling":
        return ScoreTask(text or "", full, plan_rolling_windows(len(token_ids), window))
    return ScoreTask(text or "", full, plan_windows(len(token_ids), window, stride))


# The texts of one scoring call: (text, token ids); the text counts bytes and words, the ids are scored.
ScoreItems = Sequence[tuple[str | None, list[int]]]


class ScoreItemError(ValueError):
    """Item ``index`` of a scoring call cannot be scored; ``message`` says why (without the index)."""

    def __init__(self, index: int, message: str, what: str = "text"):
        super().__init__(f"{what} {index}: {message}")
        self.index = index
        self.message = message


@dataclass(frozen=True)
class WindowRequest:
    """One prefill-only engine request: the logprob of every token of ``token_ids`` from ``logprob_start``."""
    item: int                   # which text it belongs to
    token_ids: list[int]
    logprob_start: int


@dataclass
class ScorePlan:
    """Texts to score, fanned out into window requests (text by text, window by window)."""
    num_items: int
    tasks: dict[int, ScoreTask] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)       # item -> why it cannot be scored

    def raise_first_error(self) -> None:
        if self.errors:
            index = min(self.errors)
            raise ScoreItemError(index, self.errors[index])

    def requests(self) -> list[WindowRequest]:
        return [WindowRequest(item, token_ids, start) for item in sorted(self.tasks)
                for token_ids, start in self.tasks[item].requests()]

    def assemble(self, window_prompt_logprobs: Sequence[list[dict[int, float] | None] | None],
                 keep_token_logprobs: bool) -> dict[int, ScoreOutput]:
        """The prompt logprobs of every request of :meth:`requests`, in that order -> item -> metrics."""
        results, position = {}, 0
        for item in sorted(self.tasks):
            task = self.tasks[item]
            windows = window_prompt_logprobs[position:position + len(task.windows)]
            position += len(task.windows)
            results[item] = task.finish([w or [] for w in windows], keep_token_logprobs)
        return results


def plan_scores(items: ScoreItems, eot_token_id: int, window: int, stride: int,
                check_request: Callable[[list[int]], None], perplexity: str = "sliding") -> ScorePlan:
    """``items`` are (text, token ids); ``check_request`` raises ValueError for a window the engine cannot
    run. A text that cannot be scored becomes an entry of ``errors`` instead of a task."""
    if perplexity not in PERPLEXITY_PLANS:
        raise ValueError(f"perplexity must be one of {', '.join(PERPLEXITY_PLANS)}, got {perplexity!r}")
    plan = ScorePlan(len(items))
    for index, (text, token_ids) in enumerate(items):
        try:
            task = make_score_task(text, token_ids, eot_token_id, window, stride, perplexity)
            for window_ids, _ in task.requests():
                check_request(window_ids)
        except ValueError as exc:
            plan.errors[index] = str(exc)
            continue
        plan.tasks[index] = task
    return plan


# ---- loglikelihood of (context, continuation) pairs ---------------------------------------------------

def encode_pair(context: str, continuation: str, encode: Callable[[str], list[int]],
                prefix_token_id: int) -> tuple[list[int], list[int]]:
    """lm-eval's tokenization (``LM.loglikelihood`` / ``_encode_pair``): the context's trailing whitespace
    moves to the continuation; context + continuation are encoded whole and split at the length of the
    context's own encoding; an empty context conditions on ``prefix_token_id`` (the end-of-text token)."""
    if context == "":
        continuation_enc = encode(continuation)
        if not continuation_enc:
            return [prefix_token_id], []
        if continuation_enc[0] == prefix_token_id:
            return continuation_enc[:1], continuation_enc[1:]
        return [prefix_token_id], continuation_enc
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces > 0:
        continuation = context[-num_spaces:] + continuation
        context = context[:-num_spaces]
    whole = encode(context + continuation)
    context_len = len(encode(context))
    return whole[:context_len], whole[context_len:]


@dataclass(frozen=True)
class LoglikelihoodOutput:
    """lm-eval's loglikelihood of one continuation: the sum of its tokens' natural-log probabilities and
    whether each of its tokens is the argmax given everything before it."""
    logprob: float
    is_greedy: bool
    num_tokens: int
    token_logprobs: list[float] | None = None


@dataclass(frozen=True)
class LoglikelihoodTask:
    """One prefill-only request: ``token_ids`` (context + continuation, at most max_model_len + 1 tokens,
    the last only a target) scored from ``logprob_start`` (the continuation's first token) on."""
    token_ids: list[int]
    logprob_start: int

    @property
    def context_ids(self) -> tuple[int, ...]:
        return tuple(self.token_ids[:self.logprob_start])

    def finish(self, prompt_logprobs: Sequence[dict[int, float] | None],
               keep_token_logprobs: bool) -> LoglikelihoodOutput:
        """``prompt_logprobs``: one entry per token of the request, each with the actual token and the top-1."""
        logprobs, greedy = [], True
        for position in range(self.logprob_start, len(self.token_ids)):
            entry = prompt_logprobs[position]
            assert entry is not None, "a scored position came back without its logprob"
            logprob = entry[self.token_ids[position]]
            logprobs.append(logprob)
            greedy = greedy and logprob >= max(entry.values())
        return LoglikelihoodOutput(math.fsum(logprobs), greedy, len(logprobs),
                                   logprobs if keep_token_logprobs else None)


def make_loglikelihood_task(context_ids: list[int], continuation_ids: list[int],
                            max_model_len: int) -> LoglikelihoodTask:
    """lm-eval's HF truncation: an over-long pair keeps its last max_model_len + 1 tokens (the model reads
    the last max_model_len of them but the final one)."""
    if not continuation_ids:
        raise ValueError("continuation is empty (no tokens to score)")
    if len(continuation_ids) > max_model_len:
        raise ValueError(f"continuation has {len(continuation_ids)} tokens; at most max_model_len={max_model_len} "
                         "can be scored")
    token_ids = (list(context_ids) + list(continuation_ids))[-(max_model_len + 1):]
    return LoglikelihoodTask(token_ids, len(token_ids) - len(continuation_ids))


# The pairs of one loglikelihood call, tokenized: (context ids, continuation ids).
LoglikelihoodItems = Sequence[tuple[list[int], list[int]]]


@dataclass
class LoglikelihoodPlan:
    """Pairs to score, one prefill-only request each, plus a per-item error for pairs that cannot be."""
    num_items: int
    tasks: dict[int, LoglikelihoodTask] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def raise_first_error(self) -> None:
        if self.errors:
            index = min(self.errors)
            raise ScoreItemError(index, self.errors[index], "pair")

    def groups(self) -> list[list[int]]:
        """Items grouped by shared context, in first-seen order. The first of a group computes the context;
        the engine's prefix cache serves it to the others only if they are admitted after that."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for item in sorted(self.tasks):
            by_context.setdefault(self.tasks[item].context_ids, []).append(item)
        return list(by_context.values())

    def waves(self) -> list[list[int]]:
        """Items in two rounds: the first of every group, then the rest (which reuse the cached contexts)."""
        groups = self.groups()
        return [wave for wave in ([g[0] for g in groups], [i for g in groups for i in g[1:]]) if wave]


def plan_loglikelihood(items: LoglikelihoodItems, max_model_len: int,
                       check_request: Callable[[list[int]], None]) -> LoglikelihoodPlan:
    """``items`` are (context ids, continuation ids) (see :func:`encode_pair`); ``check_request`` raises
    ValueError for a request the engine cannot run. A bad pair becomes an entry of ``errors``."""
    plan = LoglikelihoodPlan(len(items))
    for index, (context_ids, continuation_ids) in enumerate(items):
        try:
            task = make_loglikelihood_task(context_ids, continuation_ids, max_model_len)
            check_request(task.token_ids)
        except ValueError as exc:
            plan.errors[index] = str(exc)
            continue
        plan.tasks[index] = task
    return plan
