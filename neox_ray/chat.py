"""Chat messages -> prompt text with the checkpoint's chat template, rendered as transformers renders it.

The template comes from ``--chat-template FILE`` when given, else the checkpoint's ``chat_template.jinja``,
else ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named templates of which
``default`` is used). It runs in jinja2's immutable sandbox with the names transformers' templates rely
on: ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, loop controls,
``trim_blocks``/``lstrip_blocks``, the special tokens (``bos_token``, ``eos_token``, ...) and
``add_generation_prompt``. The rendered text is tokenized without adding special tokens, as
``apply_chat_template(tokenize=True)`` does.

Message validation (roles, content shapes) and template errors are :class:`ChatTemplateError` /
:class:`MessagesError` (both ``ValueError``): the HTTP layer answers them with a 400 and a batch job with
an error row. Tokenization and generation are left to the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

MAX_MESSAGES = 4096
ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplateError(ValueError):
    """No template, an unreadable one, or one that failed while rendering."""


class MessagesError(ValueError):
    """The messages are malformed (not a list of {role, content})."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str                    # the jinja text
    origin: str                    # where it came from (for messages)
    special_tokens: dict[str, str]  # bos_token, eos_token, unk_token, pad_token as strings

    @classmethod
    def load(cls, model_dir: str | Path, override_file: str | Path | None = None) -> ChatTemplate | None:
        """The template of a checkpoint directory (None if it has none); ``override_file`` wins."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        tokens = {**_special_tokens(_read_json(model_dir / "special_tokens_map.json")), **_special_tokens(config)}
        if override_file is not None:
            path = Path(override_file)
            try:
                return cls(path.read_text(encoding="utf-8"), str(path), tokens)
            except OSError as exc:
                raise ChatTemplateError(f"cannot read chat template {path}: {exc.strerror or exc}") from None
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), str(jinja_file), tokens)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return cls(template, f"{model_dir / 'tokenizer_config.json'}:chat_template", tokens)
        return None

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        plain = validate_messages(messages)
        try:
            compiled = _compile(self.source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise ChatTemplateError(f"chat template {self.origin} does not compile: {exc}") from None
        try:
            return compiled.render(messages=plain, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except Exception as exc:  # raise_exception(...) in the template, a sandbox violation, a bad lookup
            raise ChatTemplateError(f"chat template rejected the messages: {exc}") from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain-data copy of OpenAI-style messages; content may be a string or a list of text parts."""
    if not isinstance(messages, list) or not messages:
        raise MessagesError("messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise MessagesError(f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are accepted")
    plain = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise MessagesError(f"{where} must be an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise MessagesError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = _join_text_parts(content, where)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise MessagesError(f"{where}.content must be a string or a list of text parts")
        entry = {key: value for key, value in message.items() if key in ("name",) and isinstance(value, str)}
        plain.append({"role": role, "content": content, **entry})
    return plain


def _join_text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise MessagesError(f"{where}.content[{index}]: only {{\"type\": \"text\", \"text\": ...}} parts are "
                                "supported (this model reads text only)")
        texts.append(part["text"])
    return "".join(texts)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return content if isinstance(content, dict) else {}


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens
