"""``SamplingParams``: what a request asks of generation: the one schema every surface derives from.

Each field is declared once, in :class:`SamplingFields`, with its type, default, bounds and description;
the bounds are those the engine can honour (any seed in [0, 2**64), any ``top_k`` up to ``MAX_TOP_K``,
which the sampler clamps to the vocabulary, ...). From that declaration come:

- the engine-side :class:`SamplingParams` (errors: :class:`~neox_ray.engine.schema.SettingsError`, a
  ``ValueError`` whose one-line message names the field),
- the HTTP request (``neox_ray.serve.protocol.CompletionRequest`` subclasses :class:`SamplingFields`),
- the batch job's CLI flags (fields tagged ``flag``) and per-row override columns (tagged ``row``), via
  :meth:`SamplingParams.specs`.

Adding a sampling option is one field here plus the code that applies it (``engine/step.py``'s
``SamplingRow`` and ``engine/sampler.py``, or the engine loop). Pure Python (no torch).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from neox_ray.engine.schema import FieldSpec, SettingsError, StrictModel, StrictSettings, field_specs, setting

MAX_N = 128                       # samples per request
MAX_TOKENS_LIMIT = 2**20          # the engine checks the real limit (max_model_len) per prompt
MAX_TOP_K = 2**63 - 1             # anything >= the vocabulary means "off" (the sampler clamps); int64 max
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_TOKEN_ID = 2**31 - 1
MAX_SEED = 2**64 - 1              # the sampler hashes (seed, position) into a 63-bit generator seed

# Tags: which surfaces carry a field besides SamplingParams itself and the HTTP request (which has all).
ROW = "row"    # a batch input column of the same name overrides the job default per row
FLAG = "flag"  # the batch ``generate`` command has a ``--kebab-name`` flag for it


def _as_string_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        return list(value)
    if not isinstance(value, list):  # a ValueError, so pydantic reports it against the field
        raise ValueError(f"stop must be a string or a list of strings, got {type(value).__name__}")  # noqa: TRY004
    return value


def _as_list(value: Any) -> Any:
    return [] if value is None else list(value) if isinstance(value, tuple) else value


def _check_stop_strings(stops: list[str]) -> list[str]:
    for index, stop in enumerate(stops):
        if not stop:
            raise ValueError("stop strings must not be empty")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters "
                             f"(stop[{index}] has {len(stop)})")
        try:
            stop.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"stop[{index}] is not valid Unicode (lone surrogate "
                             f"{stop[exc.start:exc.end]!r}); stop strings must be text") from None
    return stops


def _top_k_off(value: int) -> int:
    return 0 if value == -1 else value


StopStrings = Annotated[list[str], BeforeValidator(_as_string_list), AfterValidator(_check_stop_strings)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], BeforeValidator(_as_list)]


class SamplingFields(StrictModel):
    """The sampling fields and their rules, shared by :class:`SamplingParams` and the HTTP request."""

    n: int = setting(1, ge=1, le=MAX_N, tags=[FLAG], description="samples per prompt")
    max_tokens: int = setting(16, ge=1, le=MAX_TOKENS_LIMIT, tags=[ROW, FLAG],
                              description="tokens to generate per sample")
    min_tokens: int = setting(0, ge=0, le=MAX_TOKENS_LIMIT, tags=[ROW, FLAG],
                              description="tokens generated before eos / stop token ids may end a sample")
    temperature: float = setting(1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, tags=[ROW, FLAG],
                                 description="sampling temperature; 0 = greedy")
    top_k: Annotated[int, AfterValidator(_top_k_off)] = setting(
        0, ge=-1, le=MAX_TOP_K, tags=[ROW, FLAG], description="sample among the k likeliest tokens; 0 or -1 = off")
    top_p: float = setting(1.0, gt=0.0, le=1.0, allow_inf_nan=False, tags=[ROW, FLAG],
                           description="nucleus sampling: the smallest set of tokens holding this much mass")
    min_p: float = setting(0.0, ge=0.0, le=1.0, allow_inf_nan=False, tags=[ROW, FLAG],
                           description="drop tokens below min_p times the likeliest token's probability")
    repetition_penalty: float = setting(
        1.0, gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False, tags=[ROW, FLAG],
        description="HF/CTRL-style penalty on tokens of the prompt and output; 1 = off")
    presence_penalty: float = setting(0.0, ge=-2.0, le=2.0, allow_inf_nan=False, tags=[ROW, FLAG],
                                      description="OpenAI-style penalty on tokens already generated")
    frequency_penalty: float = setting(0.0, ge=-2.0, le=2.0, allow_inf_nan=False, tags=[ROW, FLAG],
                                       description="OpenAI-style penalty per occurrence in the output")
    stop: StopStrings = setting(default_factory=list, max_length=MAX_STOP_STRINGS, tags=[ROW, FLAG],
                                description="strings that end a sample (not included in its text)")
    stop_token_ids: TokenIds = setting(default_factory=list, max_length=MAX_STOP_TOKEN_IDS, tags=[ROW, FLAG],
                                       description="token ids that end a sample")
    include_stop_str_in_output: bool = setting(False, tags=[FLAG],
                                               description="keep the matched stop string in the text")
    ignore_eos: bool = setting(False, tags=[ROW, FLAG], description="keep generating past the end-of-text token")
    seed: int | None = setting(None, ge=0, le=MAX_SEED, tags=[ROW],
                               description="makes sampling reproducible, alone or in any batch")
    logprobs: int | None = setting(None, ge=0, le=MAX_LOGPROBS,
                                   description="top logprobs per generated token (the chosen token is always added)")
    prompt_logprobs: int | None = setting(None, ge=0, le=MAX_LOGPROBS, description="top logprobs per prompt token")
    skip_special_tokens: bool = setting(True, tags=[FLAG], description="leave special tokens out of the text")

    @field_validator("min_tokens")
    @classmethod
    def _min_at_most_max(cls, min_tokens: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")  # absent when max_tokens itself failed
        if isinstance(max_tokens, int) and min_tokens > max_tokens:
            raise ValueError(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})")
        return min_tokens


class SamplingParams(SamplingFields, StrictSettings):
    """Validated at construction; raises :class:`SettingsError` (a ``ValueError``) naming the field."""

    @classmethod
    def specs(cls, tag: str | None = None) -> list[FieldSpec]:
        """The fields (name, type, default, description, tags), optionally only those tagged ``tag``."""
        return field_specs(cls, tag)

    @classmethod
    def row_override_fields(cls) -> tuple[str, ...]:
        """Fields a batch input column of the same name overrides per row."""
        return tuple(spec.name for spec in field_specs(cls, ROW))

    def with_overrides(self, **overrides: Any) -> SamplingParams:
        """A validated copy with some fields replaced (``None`` values are ignored)."""
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise SettingsError(f"unknown sampling parameter(s): {', '.join(unknown)}", unknown[0])
        values = self.model_dump()
        values.update((name, value) for name, value in overrides.items() if value is not None)
        return type(self)(**values)
