"""Model references: a local checkpoint directory or a Hugging Face hub id, with a revision.

Everywhere a model is named (``LLM(...)``, the CLI, Serve args, batch YAML) it may be

- a local directory holding ``config.json``, the tokenizer and safetensors weights;
- a hub id such as ``EleutherAI/pythia-160m``, optionally with a revision (branch, tag or commit sha):
  ``revision="step1000"`` or the short form ``EleutherAI/pythia-160m@step1000``.

:func:`resolve_model` turns either into a local directory. Hub ids go through ``huggingface_hub`` and
fetch only what the engine reads (config, tokenizer, chat template, safetensors), into the standard HF
cache, so ``HF_TOKEN``, ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` (resolve from the cache alone) work as usual.
Every engine process resolves the reference itself; on a node the first one downloads and the others
find the snapshot in that node's cache (huggingface_hub locks the files).

Failures are :class:`ModelNotFoundError` with a one-line message. Loading the files is left to
:mod:`neox_ray.config`, :mod:`neox_ray.tokenizer` and :mod:`neox_ray.loader`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# What the engine reads from a snapshot; everything else in a repo (pytorch .bin files, optimizer
# states, README images) stays on the hub.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json")

# owner/name as the hub spells repository ids (letters, digits, '-', '_', '.'; owner optional).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class ModelNotFoundError(ValueError):
    """The model reference names no local checkpoint and cannot be resolved on the hub or in its cache."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: ``name`` is a local path or a hub id, ``revision`` applies to hub ids."""
    name: str
    revision: str | None = None

    @property
    def display(self) -> str:
        """The reference as a user would write it (the default served model name)."""
        return f"{self.name}@{self.revision}" if self.revision else self.name


def parse_model_ref(model: str, revision: str | None = None) -> ModelRef:
    """Splits ``ID@REVISION``; a separate ``revision`` must agree with the short form when both are given."""
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"model must be a checkpoint directory or a hub id, got {model!r}")
    model = model.strip()
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ModelNotFoundError(f"revision must be a non-empty branch, tag or commit sha, got {revision!r}")
    if os.path.exists(model) or "@" not in model:
        return ModelRef(model, revision)
    name, _, short_revision = model.rpartition("@")
    if not name or not short_revision:
        raise ModelNotFoundError(f"model {model!r}: write a revision as ID@REVISION")
    if revision is not None and revision != short_revision:
        raise ModelNotFoundError(f"model {model!r} names revision {short_revision!r} but revision={revision!r} "
                                 "was also given; give one")
    return ModelRef(name, short_revision)


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def resolve_model(model: str, revision: str | None = None, allow_pickle: bool = False) -> str:
    """A local checkpoint directory for ``model`` (a directory, or a hub id resolved to a cached snapshot)."""
    ref = parse_model_ref(model, revision)
    path = Path(ref.name).expanduser()
    if path.is_dir():
        if ref.revision is not None:
            raise ModelNotFoundError(f"model {ref.name!r} is a local directory; a revision ({ref.revision!r}) only "
                                     "applies to hub ids")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"model {ref.name!r} is a file, not a checkpoint directory")
    if not looks_like_hub_id(ref.name):
        raise ModelNotFoundError(f"model {ref.name!r}: no such directory, and not a hub id (ORG/NAME)")
    return _download(ref, allow_pickle)


def _download(ref: ModelRef, allow_pickle: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [*SIDE_FILES, *WEIGHT_PATTERNS, *(PICKLE_WEIGHT_PATTERNS if allow_pickle else ())]
    where = ref.display
    try:
        snapshot = snapshot_download(ref.name, revision=ref.revision, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {ref.name!r} has no revision {ref.revision!r} on the hub") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"model {where!r} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model {ref.name!r} not found on the hub (a private repo needs HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(_not_cached_message(where)) from None
    except (OSError, ValueError) as exc:  # network errors, bad revision strings, unreadable cache
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(f"model {where!r}: cannot resolve on the hub: {first_line}") from None
    if not (Path(snapshot) / "config.json").is_file():
        raise ModelNotFoundError(f"model {where!r}: the snapshot at {snapshot} has no config.json")
    return snapshot


def _not_cached_message(where: str) -> str:
    if _offline():
        return (f"model {where!r} is not in the local Hugging Face cache ({_hub_cache()}) and HF_HUB_OFFLINE=1 "
                "forbids downloading it")
    return (f"model {where!r} is not in the local Hugging Face cache ({_hub_cache()}) and the hub cannot be "
            "reached")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
