"""The pipeline's stages, each a function or class that Ray Data runs with ``map_batches`` on Arrow tables.

``prepare`` (CPU tasks): validates each row, resolves its sampling parameters (job defaults, per-row
overrides, a seed derived from the job seed and the row id) and tokenizes. A bad row is not an exception:
it gets an ``error`` and skips the engine.

``GenerateEngineStage`` / ``ScoreEngineStage`` (an actor pool): each actor owns one ``LLM`` (one TP shard
group) behind an :class:`AsyncLLMEngine`. Ray Data runs several calls per actor at once; every call submits
its rows to the same engine loop, so rows from all calls share one continuous batch and a finished row's
slot goes to the next waiting row at the next step. If the engine loop dies, the actor exits so Ray
restarts it and retries its calls.

Scoring has two modes: ``perplexity`` (texts; sliding or lm-eval's rolling windows) and ``loglikelihood``
((context, continuation) rows, tokenized here the way lm-eval does; the engine stage submits the first
row of each shared context first so the others reuse its cached KV blocks).

``format_generation`` / ``format_scores`` (CPU, inside the commit task): final column layout, one row per
sample. Text comes out of the engine already detokenized: its incremental detokenizer is what finds stop
strings, so decoding again here would only repeat that work.

Reading belongs to :mod:`neox_ray.batch.source`, writing to :mod:`neox_ray.batch.sink`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from typing import Any

import pyarrow as pa

from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.scoring import ScoreItemError, encode_pair

logger = logging.getLogger(__name__)

# Per-row overrides a generation input may carry (null = the job's default): the SamplingParams fields
# tagged as row overrides, under their own names.
OVERRIDE_COLUMNS = SamplingParams.row_override_fields()
_INTEGER_OVERRIDES = frozenset(spec.name for spec in SamplingParams.specs("row")
                               if spec.value_type is int and not spec.is_list)

GENERATION_COLUMNS = ("generated_text", "num_prompt_tokens", "num_generated_tokens", "finish_reason", "error",
                      "sample_index")
SCORE_COLUMNS = ("num_tokens", "nll", "perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity",
                 "num_bytes", "num_words", "error")
LOGLIKELIHOOD_COLUMNS = ("logprob", "is_greedy", "num_tokens", "error")
TOKEN_LOGPROBS = "token_logprobs"          # optional (--token-logprobs / --logprobs): one per scored token
GENERATION_LOGPROB_COLUMNS = ("token_ids", TOKEN_LOGPROBS, "cumulative_logprob", "top_logprobs")

# Columns that only travel between stages.
TOKEN_IDS = "__neox_token_ids"
SAMPLING = "__neox_sampling"
TEXTS = "__neox_texts"
NUM_GENERATED = "__neox_num_generated"
FINISH_REASONS = "__neox_finish_reasons"
CONTINUATION_IDS = "__neox_continuation_ids"
LOGPROBS = "__neox_logprobs"               # per sample, JSON: {token_ids, token_logprobs, cumulative, top}
ENGINE_START = "__neox_engine_start"   # wall-clock span of the engine call (dry-run projection)
ENGINE_END = "__neox_engine_end"
INTERNAL_COLUMNS = (TOKEN_IDS, SAMPLING, TEXTS, NUM_GENERATED, FINISH_REASONS, CONTINUATION_IDS, LOGPROBS,
                    ENGINE_START, ENGINE_END)

_SEED_BITS = 40  # any seed < 2**64 works; 40 bits stay exact in float64 columns and readable in outputs


def row_seed(job_seed: int, row_id: Any) -> int:
    """A row's sampling seed: a hash of the job seed and the row id, so it does not depend on which replica
    or batch the row lands in."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - _SEED_BITS)


@functools.lru_cache(maxsize=4)
def _model_dir(model: str, revision: str | None) -> str:
    """The local checkpoint of a directory or hub id, resolved once per worker process (on this node)."""
    from neox_ray.hub import resolve_model

    return resolve_model(model, revision)


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str, revision: str | None = None):
    from neox_ray.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(_model_dir(model, revision))


@functools.lru_cache(maxsize=4)
def _chat_template(model: str, revision: str | None, override: str | None):
    from neox_ray.chat import ChatTemplate

    return ChatTemplate.load(_model_dir(model, revision), override)


def _render_messages(messages: Any, model: str, revision: str | None, chat_template: str | None) -> \
        tuple[str | None, str | None]:
    """(prompt text, None) for a row of chat messages, or (None, the row's error)."""
    from neox_ray.chat import ChatTemplateError, MessagesError

    if messages is None:
        return None, "messages is null"
    template = _chat_template(model, revision, chat_template)
    if template is None:  # the preflight checked; a changed checkpoint would land here
        return None, "the model has no chat template"
    try:
        return template.render(messages), None
    except (MessagesError, ChatTemplateError) as exc:
        return None, str(exc)


# ---- prepare (CPU) ---------------------------------------------------------------------------------------
def _text_error(value: Any, what: str) -> str | None:
    if value is None:
        return f"{what} is null"
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if not value:
        return f"{what} is empty"
    return None


def _row_overrides(batch: pa.Table, row: int, columns: list[str]) -> dict[str, Any]:
    overrides = {}
    for name in columns:
        value = batch.column(name)[row].as_py()
        if isinstance(value, float) and math.isnan(value):
            value = None  # pandas-written files store a missing number as NaN
        if name in _INTEGER_OVERRIDES and isinstance(value, float) and value.is_integer():
            value = int(value)  # an integer column with nulls, written by pandas as float64
        # Anything else of the wrong type (a string temperature, a float top_k) is left for SamplingParams
        # to reject: strictly, naming the field, as this row's error.
        if value is not None:
            overrides[name] = value
    return overrides


def prepare_generation(batch: pa.Table, *, model: str, prompt_column: str, sampling: dict[str, Any],
                       job_seed: int, max_model_len: int, revision: str | None = None, chat: bool = False,
                       chat_template: str | None = None) -> pa.Table:
    """Adds the token ids, the resolved sampling parameters (JSON), ``num_prompt_tokens`` and ``error``.
    With ``chat``, ``prompt_column`` holds messages, rendered to prompt text with the chat template first."""
    defaults = SamplingParams(**sampling)
    tokenizer = _tokenizer(model, revision)
    override_columns = [c for c in OVERRIDE_COLUMNS if c in batch.column_names]
    prompts = batch.column(prompt_column).to_pylist()
    ids = batch.column("id").to_pylist()
    errors: list[str | None] = []
    params_json: list[str | None] = []
    max_tokens_of: list[int] = []
    render_errors: dict[int, str] = {}
    if chat:
        for row, messages in enumerate(prompts):
            prompts[row], render_error = _render_messages(messages, model, revision, chat_template)
            if render_error is not None:
                render_errors[row] = render_error
    for row, prompt in enumerate(prompts):
        error = render_errors.get(row) or _text_error(prompt, "prompt")
        params = None
        if error is None:
            overrides = _row_overrides(batch, row, override_columns)
            overrides.setdefault("seed", row_seed(job_seed, ids[row]))
            try:
                params = defaults.with_overrides(**overrides)
            except (TypeError, ValueError) as exc:
                error = f"invalid per-row override: {exc}"
        errors.append(error)
        params_json.append(params.model_dump_json() if params is not None else None)
        max_tokens_of.append(params.max_tokens if params is not None else 0)

    to_encode = [i for i, e in enumerate(errors) if e is None]
    encoded = tokenizer.encode_batch([prompts[i] for i in to_encode]) if to_encode else []
    token_ids: list[list[int] | None] = [None] * len(prompts)
    for row, row_ids in zip(to_encode, encoded, strict=False):
        token_ids[row] = row_ids
        max_tokens = max_tokens_of[row]
        if not row_ids:
            errors[row] = "prompt is empty (no tokens)"
        elif len(row_ids) + max_tokens > max_model_len:  # the engine's own check, made before the GPU stage
            errors[row] = (f"prompt has {len(row_ids)} tokens; with max_tokens={max_tokens} it exceeds "
                           f"max_model_len={max_model_len}")
    return (batch.append_column(TOKEN_IDS, pa.array(token_ids, type=pa.list_(pa.int32())))
            .append_column(SAMPLING, pa.array(params_json, type=pa.string()))
            .append_column("num_prompt_tokens", pa.array([len(t) if t is not None else None for t in token_ids],
                                                         type=pa.int64()))
            .append_column("error", pa.array(errors, type=pa.string())))


def prepare_scoring(batch: pa.Table, *, model: str, text_column: str, revision: str | None = None) -> pa.Table:
    tokenizer = _tokenizer(model, revision)
    texts = batch.column(text_column).to_pylist()
    errors = [_text_error(t, "text") for t in texts]
    to_encode = [i for i, e in enumerate(errors) if e is None]
    encoded = tokenizer.encode_batch([texts[i] for i in to_encode]) if to_encode else []
    token_ids: list[list[int] | None] = [None] * len(texts)
    for row, row_ids in zip(to_encode, encoded, strict=False):
        token_ids[row] = row_ids
        if not row_ids:
            errors[row] = "text is empty (no tokens to score)"
    return (batch.append_column(TOKEN_IDS, pa.array(token_ids, type=pa.list_(pa.int32())))
            .append_column("error", pa.array(errors, type=pa.string())))


@functools.lru_cache(maxsize=4)
def _eot_token_id(model: str, revision: str | None = None) -> int:
    """The token an empty context conditions on: the engine's end-of-text token (tokenizer, else config)."""
    from neox_ray.config import ModelConfig

    eot = _tokenizer(model, revision).eos_token_id
    if eot is None:
        eot = ModelConfig.from_pretrained(_model_dir(model, revision)).eos_token_id
    if eot is None:
        raise ValueError(f"model {model} has no end-of-text token id (tokenizer or config.json)")
    return eot


def prepare_loglikelihood(batch: pa.Table, *, model: str, context_column: str, continuation_column: str,
                          revision: str | None = None) -> pa.Table:
    """lm-eval's tokenization of each (context, continuation) row (:func:`encode_pair`); an empty context
    is allowed (it conditions on the end-of-text token), an empty continuation is the row's error."""
    tokenizer = _tokenizer(model, revision)
    eot = _eot_token_id(model, revision)
    contexts = batch.column(context_column).to_pylist()
    continuations = batch.column(continuation_column).to_pylist()
    context_ids: list[list[int] | None] = [None] * batch.num_rows
    continuation_ids: list[list[int] | None] = [None] * batch.num_rows
    errors: list[str | None] = [None] * batch.num_rows
    for row, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
        error = _text_error(continuation, "continuation")
        if error is None and context is None:
            error = "context is null"
        elif error is None and not isinstance(context, str):
            error = f"context must be a string, got {type(context).__name__}"
        if error is None:
            context_ids[row], continuation_ids[row] = encode_pair(context, continuation, tokenizer.encode, eot)
            if not continuation_ids[row]:
                error = "continuation is empty (no tokens to score)"
        errors[row] = error
    return (batch.append_column(TOKEN_IDS, pa.array(context_ids, type=pa.list_(pa.int32())))
            .append_column(CONTINUATION_IDS, pa.array(continuation_ids, type=pa.list_(pa.int32())))
            .append_column("error", pa.array(errors, type=pa.string())))


# ---- engine (actor pool) ---------------------------------------------------------------------------------
class _EngineActor:
    """Owns one LLM and the background loop that all concurrent calls on this actor feed."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any]):
        from neox_ray.engine.async_engine import AsyncLLMEngine
        from neox_ray.llm import LLM

        started = time.monotonic()
        self.llm = LLM(model, **engine_kwargs)
        self.engine = AsyncLLMEngine(self.llm.engine)
        logger.info("engine actor pid %d loaded %s in %.1fs", os.getpid(), model, time.monotonic() - started)

    def _exit_if_dead(self, exc: BaseException) -> None:
        from neox_ray.engine.async_engine import EngineDeadError

        if isinstance(exc, EngineDeadError):
            # The engine cannot recover in this process; exiting lets Ray restart the actor and retry the
            # calls it held (max_restarts / max_task_retries), instead of failing the whole job.
            logger.error("engine loop died (%s); exiting so Ray restarts this actor", exc)
            os._exit(1)

    def _wait(self, futures: dict[int, Any], errors: list[str | None]) -> dict[int, Any]:
        results = {}
        for row, future in futures.items():
            try:
                results[row] = future.result()
            except Exception as exc:
                self._exit_if_dead(exc)
                errors[row] = f"engine error: {exc}"
        return results


class GenerateEngineStage(_EngineActor):
    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        errors: list[str | None] = batch.column("error").to_pylist()
        token_ids = batch.column(TOKEN_IDS).to_pylist()
        params_json = batch.column(SAMPLING).to_pylist()
        futures = {}
        for row, error in enumerate(errors):
            if error is not None:
                continue
            try:
                params = SamplingParams(**json.loads(params_json[row]))
                futures[row] = self.engine.submit_and_wait(token_ids[row], params)
            except Exception as exc:
                self._exit_if_dead(exc)
                errors[row] = str(exc)
        outputs = self._wait(futures, errors)
        texts, generated, reasons, logprobs = [], [], [], []
        for row in range(batch.num_rows):
            output = outputs.get(row) if errors[row] is None else None
            completions = output.outputs if output is not None else []
            texts.append([c.text for c in completions] or None)
            generated.append([len(c.token_ids) for c in completions] or None)
            reasons.append([c.finish_reason for c in completions] or None)
            logprobs.append([_sample_logprobs_json(c) for c in completions]
                            if any(c.logprobs is not None for c in completions) else None)
        finished = time.time()
        batch = batch.drop_columns([TOKEN_IDS, SAMPLING])
        batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(errors, type=pa.string()))
        return (batch.append_column(TEXTS, pa.array(texts, type=pa.list_(pa.string())))
                .append_column(NUM_GENERATED, pa.array(generated, type=pa.list_(pa.int64())))
                .append_column(FINISH_REASONS, pa.array(reasons, type=pa.list_(pa.string())))
                .append_column(LOGPROBS, pa.array(logprobs, type=pa.list_(pa.string())))
                .append_column(ENGINE_START, pa.array([started] * batch.num_rows, type=pa.float64()))
                .append_column(ENGINE_END, pa.array([finished] * batch.num_rows, type=pa.float64())))


def _sample_logprobs_json(completion: Any) -> str:
    """One sample's logprobs as the engine gives them (``SamplingParams(logprobs=K)``): the chosen tokens,
    their logprobs, the running sum and, per step, the K likeliest tokens (likeliest first)."""
    entries = completion.logprobs or []
    chosen = [entry[token] for token, entry in zip(completion.token_ids, entries, strict=False)]
    top = [sorted(entry.items(), key=lambda item: -item[1]) for entry in entries]
    return json.dumps({"token_ids": list(completion.token_ids), "token_logprobs": chosen,
                       "cumulative_logprob": completion.cumulative_logprob, "top": top})


class ScoreEngineStage(_EngineActor):
    """Perplexity rows (``text_column``) or, with ``mode="loglikelihood"``, (context, continuation) rows."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], text_column: str, window: int | None,
                 stride: int | None, *, mode: str = "perplexity", perplexity: str = "sliding",
                 token_logprobs: bool = False):
        super().__init__(model, engine_kwargs)
        self.text_column = text_column
        self.window, self.stride = self.llm.engine.score_window(window, stride)
        self.mode, self.perplexity, self.token_logprobs = mode, perplexity, token_logprobs

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        errors: list[str | None] = batch.column("error").to_pylist()
        token_ids = batch.column(TOKEN_IDS).to_pylist()
        rows = [row for row, error in enumerate(errors) if error is None]
        if self.mode == "loglikelihood":
            continuation_ids = batch.column(CONTINUATION_IDS).to_pylist()
            futures = self.engine.loglikelihood_futures([(token_ids[row], continuation_ids[row]) for row in rows],
                                                        self.token_logprobs)
            names: tuple[str, ...] = LOGLIKELIHOOD_COLUMNS[:-1]
            types: tuple[pa.DataType, ...] = (pa.float64(), pa.bool_(), pa.int64())
        else:
            texts = batch.column(self.text_column).to_pylist()
            futures = self.engine.score_futures([(texts[row], token_ids[row]) for row in rows], self.window,
                                                self.stride, self.token_logprobs, self.perplexity)
            names = SCORE_COLUMNS[:-1]
            types = tuple(pa.int64() if name in ("num_tokens", "num_bytes", "num_words") else pa.float64()
                          for name in names)
        if self.token_logprobs:
            names, types = (*names, TOKEN_LOGPROBS), (*types, pa.list_(pa.float64()))
        scores = {}
        for row, future in zip(rows, futures, strict=True):
            try:
                scores[row] = future.result()
            except ScoreItemError as exc:
                errors[row] = exc.message
            except Exception as exc:
                self._exit_if_dead(exc)
                errors[row] = f"engine error: {exc}"
        finished = time.time()
        columns: dict[str, list[Any]] = {name: [] for name in names}
        for row in range(batch.num_rows):
            score = scores.get(row) if errors[row] is None else None
            for name in columns:
                columns[name].append(getattr(score, name) if score is not None else None)
        batch = batch.drop_columns([c for c in (TOKEN_IDS, CONTINUATION_IDS, "error") if c in batch.column_names])
        for (name, values), kind in zip(columns.items(), types, strict=True):
            batch = batch.append_column(name, pa.array(values, type=kind))
        return (batch.append_column("error", pa.array(errors, type=pa.string()))
                .append_column(ENGINE_START, pa.array([started] * batch.num_rows, type=pa.float64()))
                .append_column(ENGINE_END, pa.array([finished] * batch.num_rows, type=pa.float64())))


# ---- format (CPU, in the commit task) --------------------------------------------------------------------
def format_generation(batch: pa.Table, num_samples: int, top_logprobs: int | None = None) -> pa.Table:
    """One row per (input row, sample): input columns, ``id``, the generation columns; ``sample_index`` only
    when ``num_samples > 1``. An error row is repeated per sample so every sample of every row exists.
    ``top_logprobs`` (None: none) adds ``token_ids``, ``token_logprobs``, ``cumulative_logprob`` and, when
    K > 0, ``top_logprobs`` (per token, the K likeliest as {token_id, logprob})."""
    passthrough = [c for c in batch.column_names if c not in INTERNAL_COLUMNS and c not in GENERATION_COLUMNS]
    texts = batch.column(TEXTS).to_pylist()
    generated = batch.column(NUM_GENERATED).to_pylist()
    reasons = batch.column(FINISH_REASONS).to_pylist()
    logprobs: list[Any] = (batch.column(LOGPROBS).to_pylist() if LOGPROBS in batch.column_names
                           else [None] * batch.num_rows)
    take, sample_index, out_text, out_generated, out_reason = [], [], [], [], []
    out_logprobs: list[dict[str, Any] | None] = []
    for row in range(batch.num_rows):
        for sample in range(num_samples):
            take.append(row)
            sample_index.append(sample)
            ok = texts[row] is not None and sample < len(texts[row])
            out_text.append(texts[row][sample] if ok else None)
            out_generated.append(generated[row][sample] if ok else None)
            out_reason.append(reasons[row][sample] if ok else None)
            has_logprobs = ok and logprobs[row] is not None and sample < len(logprobs[row])
            out_logprobs.append(json.loads(logprobs[row][sample]) if has_logprobs else None)
    rows = batch.select(passthrough + ["num_prompt_tokens", "error"]).take(pa.array(take, type=pa.int64()))
    table = rows.select(passthrough)
    table = (table.append_column("generated_text", pa.array(out_text, type=pa.string()))
             .append_column("num_prompt_tokens", rows.column("num_prompt_tokens"))
             .append_column("num_generated_tokens", pa.array(out_generated, type=pa.int64()))
             .append_column("finish_reason", pa.array(out_reason, type=pa.string())))
    if top_logprobs is not None:
        table = _append_logprob_columns(table, out_logprobs, top_logprobs)
    table = table.append_column("error", rows.column("error"))
    if num_samples > 1:
        table = table.append_column("sample_index", pa.array(sample_index, type=pa.int64()))
    return table


_TOP_LOGPROB = pa.struct([("token_id", pa.int64()), ("logprob", pa.float64())])


def _append_logprob_columns(table: pa.Table, samples: list[dict[str, Any] | None], top_logprobs: int) -> pa.Table:
    table = (table.append_column("token_ids", pa.array([s and s["token_ids"] for s in samples],
                                                       type=pa.list_(pa.int64())))
             .append_column(TOKEN_LOGPROBS, pa.array([s and s["token_logprobs"] for s in samples],
                                                     type=pa.list_(pa.float64())))
             .append_column("cumulative_logprob", pa.array([s and s["cumulative_logprob"] for s in samples],
                                                           type=pa.float64())))
    if top_logprobs == 0:
        return table
    top = [None if s is None else [[{"token_id": t, "logprob": lp} for t, lp in step[:top_logprobs]]
                                   for step in s["top"]] for s in samples]
    return table.append_column("top_logprobs", pa.array(top, type=pa.list_(pa.list_(_TOP_LOGPROB))))


def format_scores(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in INTERNAL_COLUMNS if c in batch.column_names])


def engine_span(batch: pa.Table) -> tuple[float, float] | None:
    if ENGINE_START not in batch.column_names or batch.num_rows == 0:
        return None
    return (min(batch.column(ENGINE_START).to_pylist()), max(batch.column(ENGINE_END).to_pylist()))
