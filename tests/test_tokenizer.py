"""Tests for neox_ray.tokenizer: special-token resolution, encode/decode, and streaming detokenization.

A tiny byte-level BPE is trained here so multi-byte characters (accents, CJK, emoji) are split across
tokens; the real GPT-NeoX tokenizer from ../shared is used too when present.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from neox_ray.tokenizer import IncrementalDetokenizer, Tokenizer

REAL_TOKENIZER_PATH = Path(__file__).resolve().parents[1].parent / "shared/data/gpt-neox-20b-tokenizer.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
TRAINING_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A naïve café owner served crème brûlée to the über-cool crowd.",
    "日本語のテキストを少し書きます。",
    "今日は天気がいいですね。",
    "Emoji time: 🙂🚀 and more 🙂 smiles.",
    "Señor Muñoz visited Zürich and São Paulo.",
    "Ελληνικά γράμματα και русский текст.",
    "Tokens, tokens everywhere; spaces   and\ttabs\nand newlines.",
    "def add(a, b):\n    return a + b",
    "Numbers like 3.14159 and 2718 appear often.",
] * 4
DETOKENIZE_TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "naïve café crème brûlée",
    "日本語のテキスト",
    # 🦀 and 🧪 never occur in training, so they are always split into byte tokens.
    "🙂🚀 rocket 🦀 crab 🧪",
    "mixed: über 日本 🙂 end",
    "Ελληνικά and русский",
    "tabs\tand\nnewlines\n\n  indented",
    "ǅ ﬁ é (combining accent) 한국어",
    "",
]


def build_tiny_tokenizer(directory: Path) -> Path:
    """Trains a 400-token byte-level BPE into directory/tokenizer.json (+ config.json); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter(TRAINING_SENTENCES), trainer=trainer)
    tokenizer_path = directory / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    (directory / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    return tokenizer_path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny")).parent


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_dir)


def copy_tokenizer_only(source_dir: Path, target_dir: Path) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(source_dir / "tokenizer.json", target_dir / "tokenizer.json")
    return target_dir


def stream(
    tokenizer: Tokenizer, prompt_ids: list[int], generated_ids: list[int], skip: bool = True
) -> tuple[list[str], str, str]:
    """Feeds generated_ids one by one; returns (per-token deltas, flushed remainder, final text)."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    deltas = [detokenizer.add_token(token_id) for token_id in generated_ids]
    assert detokenizer.text == "".join(deltas)
    flushed = detokenizer.flush()
    assert detokenizer.text == "".join(deltas) + flushed
    return deltas, flushed, detokenizer.text


def check_streaming_invariant(tokenizer: Tokenizer, text: str) -> None:
    generated_ids = tokenizer.encode(text)
    deltas, flushed, streamed = stream(tokenizer, [], generated_ids)
    assert streamed == tokenizer.decode(generated_ids) == text
    assert flushed == "", "valid text leaves nothing pending"
    assert not any("\ufffd" in delta for delta in deltas), deltas

    prompt_ids = tokenizer.encode("Prompt with café 🙂 context:")
    deltas, flushed, streamed = stream(tokenizer, prompt_ids, generated_ids)
    prompt_text = tokenizer.decode(prompt_ids)
    full_text = tokenizer.decode(prompt_ids + generated_ids)
    assert full_text.startswith(prompt_text)
    assert streamed == full_text[len(prompt_text) :]
    assert not any("\ufffd" in delta for delta in deltas), deltas


def test_tiny_tokenizer_splits_multibyte_characters(tiny: Tokenizer) -> None:
    # Guards the premise of the streaming tests: some single tokens are only part of a character.
    crab_ids = tiny.encode("🦀")
    assert len(crab_ids) > 1
    assert "\ufffd" in tiny.decode(crab_ids[:1])


@pytest.mark.parametrize("text", DETOKENIZE_TEXTS)
def test_encode_decode_roundtrip(tiny: Tokenizer, text: str) -> None:
    token_ids = tiny.encode(text)
    assert all(0 <= token_id < tiny.vocab_size for token_id in token_ids)
    assert tiny.decode(token_ids) == text


def test_encode_batch_matches_encode(tiny: Tokenizer) -> None:
    assert tiny.encode_batch(DETOKENIZE_TEXTS) == [tiny.encode(text) for text in DETOKENIZE_TEXTS]


def test_vocab_and_special_tokens_from_config_json(tiny: Tokenizer) -> None:
    assert tiny.vocab_size == 400
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.eos_token_ids) == (0, 0, frozenset({0}))
    assert tiny.pad_token_id is None
    assert tiny.id_to_token(1) == "<|padding|>"
    assert tiny.id_to_token(10**6) is None
    assert tiny.decode([0, *tiny.encode("hi")]) == "hi"
    assert tiny.decode([0, *tiny.encode("hi")], skip_special_tokens=False) == "<|endoftext|>hi"


def test_eos_list_in_config_json_keeps_every_id(tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_tokenizer_only(tiny_dir, tmp_path)
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": [1, 0], "pad_token_id": 1}))
    tokenizer = Tokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token_id == 1
    assert tokenizer.eos_token_ids == frozenset({0, 1})
    assert tokenizer.pad_token_id == 1


def test_tokenizer_config_wins_over_config_json(tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_tokenizer_only(tiny_dir, tmp_path)
    (model_dir / "config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": {"__type": "AddedToken", "content": "<|padding|>"},
                "pad_token": "<|padding|>",
                "bos_token": None,
            }
        )
    )
    tokenizer = Tokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token_id == 1
    assert tokenizer.eos_token_ids == frozenset({0, 1}), "config.json eos ids are kept as extra stops"
    assert tokenizer.pad_token_id == 1
    assert tokenizer.bos_token_id == 0


def test_special_tokens_map(tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_tokenizer_only(tiny_dir, tmp_path)
    (model_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<|padding|>", "eos_token": {"content": "<|padding|>"}, "pad_token": "<|endoftext|>"}
        )
    )
    tokenizer = Tokenizer.from_pretrained(model_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 1, 0)


def test_endoftext_fallback_when_nothing_says(tiny_dir: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(copy_tokenizer_only(tiny_dir, tmp_path))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, None)

    word_level = HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    word_level.save(str(bare_dir / "tokenizer.json"))
    bare = Tokenizer.from_pretrained(bare_dir)
    assert (bare.bos_token_id, bare.eos_token_id, bare.eos_token_ids) == (None, None, frozenset())


def test_missing_tokenizer_json_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_config_names_the_file(tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_tokenizer_only(tiny_dir, tmp_path)
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        Tokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", DETOKENIZE_TEXTS)
def test_incremental_detokenizer_matches_decode(tiny: Tokenizer, text: str) -> None:
    check_streaming_invariant(tiny, text)


def test_incremental_detokenizer_on_random_ids(tiny: Tokenizer) -> None:
    # Arbitrary ids may form invalid UTF-8 and include special tokens; the stream must still equal decode.
    rng = random.Random(0)
    for skip in (True, False):
        for _ in range(200):
            generated_ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randrange(1, 24))]
            deltas, flushed, streamed = stream(tiny, [], generated_ids, skip=skip)
            assert streamed == tiny.decode(generated_ids, skip_special_tokens=skip)


def test_incomplete_character_waits_until_complete_or_flush(tiny: Tokenizer) -> None:
    crab_ids = tiny.encode("ab🦀")
    head_ids = tiny.encode("ab")
    assert crab_ids[: len(head_ids)] == head_ids
    detokenizer = IncrementalDetokenizer(tiny)
    assert "".join(detokenizer.add_token(token_id) for token_id in crab_ids[:-1]) == "ab"
    assert detokenizer.text == "ab"
    assert detokenizer.add_token(crab_ids[-1]) == "🦀"
    assert detokenizer.flush() == ""

    truncated = IncrementalDetokenizer(tiny)
    for token_id in crab_ids[:-1]:
        truncated.add_token(token_id)
    assert truncated.flush() == tiny.decode(crab_ids[:-1])[len("ab") :]
    assert truncated.flush() == ""
    assert truncated.text == tiny.decode(crab_ids[:-1])


def test_skipped_special_token_emits_nothing(tiny: Tokenizer) -> None:
    generated_ids = [*tiny.encode("hi"), 0, *tiny.encode(" there")]
    deltas, flushed, streamed = stream(tiny, tiny.encode("say"), generated_ids)
    assert deltas[len(tiny.encode("hi"))] == ""
    assert streamed == "hi there"
    _, _, with_specials = stream(tiny, [], generated_ids, skip=False)
    assert with_specials == "hi<|endoftext|> there"


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    if not REAL_TOKENIZER_PATH.is_file():
        pytest.skip(f"real GPT-NeoX tokenizer not found at {REAL_TOKENIZER_PATH}")
    model_dir = tmp_path_factory.mktemp("neox")
    shutil.copy(REAL_TOKENIZER_PATH, model_dir / "tokenizer.json")
    return Tokenizer.from_pretrained(model_dir)


def test_real_gpt_neox_tokenizer(real_tokenizer: Tokenizer) -> None:
    assert real_tokenizer.eos_token_id == 0 and real_tokenizer.bos_token_id == 0
    assert real_tokenizer.vocab_size > 50_000
    for text in [*DETOKENIZE_TEXTS, *TRAINING_SENTENCES[:10], "    code    with    runs of spaces\n\n\n"]:
        check_streaming_invariant(real_tokenizer, text)
