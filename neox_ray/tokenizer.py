"""Text <-> token ids, and streaming detokenization.

The engine speaks token ids; this module is the only place text meets ids. It wraps a HuggingFace
`tokenizers` JSON file (no `transformers` needed), resolves the special token ids from whatever config
files sit beside it, and turns a growing list of generated ids into text deltas that are safe to stream
and to match stop strings against. Stop-string matching, sampling and scheduling are left to others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

DEFAULT_SPECIAL_TOKEN = "<|endoftext|>"
# How far back the prompt reaches as left context for the first generated token (as in vLLM).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return content if isinstance(content, dict) else {}


def _token_content(entry: Any) -> str | None:
    """A special token in tokenizer_config.json is either a string or a serialized AddedToken dict."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


class Tokenizer:
    """A byte-level BPE (or any `tokenizers`) tokenizer with its special token ids resolved."""

    def __init__(
        self,
        hf_tokenizer: _HFTokenizer,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self._tokenizer = hf_tokenizer
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        # Order matters only for the primary id; the set is what stop checks use.
        self.eos_token_id: int | None = eos_token_ids[0] if eos_token_ids else None
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """Loads <model_dir>/tokenizer.json and resolves bos/eos/pad ids.

        Precedence per token: tokenizer_config.json, then special_tokens_map.json, then the ids in
        config.json / generation_config.json, then "<|endoftext|>" (bos and eos only) if the vocab has it.
        """
        model_dir = Path(model_dir)
        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_path}")
        hf_tokenizer = _HFTokenizer.from_file(str(tokenizer_path))

        token_sources = [
            _read_json(model_dir / "tokenizer_config.json"),
            _read_json(model_dir / "special_tokens_map.json"),
        ]
        id_sources = [_read_json(model_dir / "config.json"), _read_json(model_dir / "generation_config.json")]

        def resolve(role: str, fallback_token: str | None) -> list[int]:
            for source in token_sources:
                content = _token_content(source.get(f"{role}_token"))
                token_id = hf_tokenizer.token_to_id(content) if content is not None else None
                if token_id is not None:
                    return [token_id]
            for source in id_sources:
                token_ids = _as_id_list(source.get(f"{role}_token_id"))
                if token_ids:
                    return token_ids
            fallback_id = hf_tokenizer.token_to_id(fallback_token) if fallback_token else None
            return [fallback_id] if fallback_id is not None else []

        eos_token_ids = resolve("eos", DEFAULT_SPECIAL_TOKEN)
        # Models often list extra eos ids (e.g. end-of-turn) only in the config files; keep them all.
        for source in id_sources:
            eos_token_ids += [i for i in _as_id_list(source.get("eos_token_id")) if i not in eos_token_ids]
        bos_token_ids = resolve("bos", DEFAULT_SPECIAL_TOKEN)
        pad_token_ids = resolve("pad", None)
        return cls(
            hf_tokenizer,
            eos_token_ids=eos_token_ids,
            bos_token_id=bos_token_ids[0] if bos_token_ids else None,
            pad_token_id=pad_token_ids[0] if pad_token_ids else None,
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        # The Rust side parallelizes across texts, which matters in the batch tokenize stage.
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # int() accepts numpy/torch scalars, which the Rust binding rejects.
        return self._tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text, one finalized delta per token.

    Decoding tokens one at a time and concatenating is wrong for byte-level BPE: a multi-byte character
    may span tokens, and some decoders treat the first token of a decode specially. So, as vLLM does, we
    decode a short window of trailing tokens twice -- [prefix_offset, read_offset) is text already
    emitted, [prefix_offset, end) is that plus the new tokens -- and emit the difference only once it
    no longer ends in U+FFFD (an incomplete character). Each token costs O(window), not O(length).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The prompt tail is left context only, so the first generated token gets its leading space right.
        self._token_ids: list[int] = [int(i) for i in prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._text = ""

    def add_token(self, token_id: int) -> str:
        """Appends one generated id; returns the newly finalized text (possibly "")."""
        self._token_ids.append(int(token_id))
        return self._emit(allow_incomplete=False)

    def flush(self) -> str:
        """Emits whatever is pending, an incomplete character included (as a full decode would show it)."""
        return self._emit(allow_incomplete=True)

    @property
    def text(self) -> str:
        """All generated text emitted so far, prompt excluded (kept up to date, never re-decoded)."""
        return self._text

    def _emit(self, allow_incomplete: bool) -> str:
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text):
            # e.g. a skipped special token: nothing visible yet; keep the window open.
            if not allow_incomplete:
                return ""
            delta = ""
        elif full_text.endswith(REPLACEMENT_CHAR) and not allow_incomplete:
            return ""
        else:
            delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        # Drop ids that left the window so memory stays O(window) over long generations.
        del self._token_ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        self._text += delta
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
