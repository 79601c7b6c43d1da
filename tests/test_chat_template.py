"""Chat templates rendered like transformers' ``apply_chat_template``; malformed input is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from neox_ray.chat import ChatTemplate, ChatTemplateError, MessagesError

# A ChatML-style template using the features real templates use: loops, conditionals, raise_exception,
# special tokens, add_generation_prompt and the whitespace control trim_blocks/lstrip_blocks change.
CHATML = (
    "{% for message in messages %}\n"
    "    {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role ' + message['role']) }}{% endif %}\n"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    "{{ eos_token if false else '' }}"
)

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Count "}, {"type": "text", "text": "to 3"}]}]


@pytest.fixture()
def chat_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    directory = tmp_path / "chat"
    shutil.copytree(tiny_checkpoint, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update({"chat_template": CHATML, "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                   "tokenizer_class": "PreTrainedTokenizerFast"})
    config_path.write_text(json.dumps(config))
    return directory


def test_matches_transformers(chat_checkpoint: Path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(chat_checkpoint)
    template = ChatTemplate.load(chat_checkpoint)
    assert template is not None
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "Count to 3"} for m in MESSAGES]
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert template.render(MESSAGES, add_generation_prompt) == expected


def test_sources_and_override(tmp_path: Path, chat_checkpoint: Path, tiny_checkpoint: Path):
    assert ChatTemplate.load(tiny_checkpoint) is None  # Pythia-like: no template
    (chat_checkpoint / "chat_template.jinja").write_text("FILE{{ messages[0]['content'] }}")
    assert ChatTemplate.load(chat_checkpoint).render(MESSAGES) == "FILEYou are terse."
    override = tmp_path / "mine.jinja"
    override.write_text("OVERRIDE{{ messages | length }}{{ bos_token }}")
    assert ChatTemplate.load(chat_checkpoint, override).render(MESSAGES) == "OVERRIDE4<|endoftext|>"
    with pytest.raises(ChatTemplateError, match="cannot read"):
        ChatTemplate.load(chat_checkpoint, tmp_path / "missing.jinja")


def test_named_template_list(tmp_path: Path, chat_checkpoint: Path):
    config_path = chat_checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    config_path.write_text(json.dumps(config))
    assert ChatTemplate.load(chat_checkpoint).render(MESSAGES) == "DEFAULT"


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "parts are supported"),
    (["not an object"], "messages[0] must be an object"),
])
def test_malformed_messages(chat_checkpoint: Path, messages, fragment):
    with pytest.raises(MessagesError) as info:
        ChatTemplate.load(chat_checkpoint).render(messages)
    assert fragment in str(info.value)


def test_template_errors_are_clear(chat_checkpoint: Path, tmp_path: Path):
    template = ChatTemplate.load(chat_checkpoint)
    with pytest.raises(ChatTemplateError, match="unsupported role tool"):
        template.render([{"role": "tool", "content": "x"}])
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate.load(chat_checkpoint, broken).render(MESSAGES)
    escape = tmp_path / "escape.jinja"
    escape.write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate.load(chat_checkpoint, escape).render(MESSAGES)
