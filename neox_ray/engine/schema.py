"""What the typed settings models (``SamplingParams``, ``EngineConfig``) share: strict pydantic models whose
errors are one short line naming the field, and a field table that other surfaces are derived from.

``StrictModel`` is the base: strict types (a bool is not an int, ``"1"`` is not a number; an int is a
fine float) and unknown keys rejected; ``StrictSettings`` adds construction errors raised as
:class:`SettingsError` (a ``ValueError``) with a message such as ``"temperature must be >= 0.0, got -1"``.
:func:`describe_error` is the one formatter; the HTTP layer uses it too, so a 400 reads the same and never
echoes a whole input back.

:func:`field_specs` lists a model's fields (type, default, description, tags); a field's tags say which
surfaces carry it (a CLI flag, a per-row batch column). :meth:`FieldSpec.argparse_options` turns a field
into a command-line flag's options; which flags a command has, and the commands, are the CLI modules' own.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined

_INPUT_REPR_CHARS = 40  # longer inputs are cut: an error message must not echo a whole request back

# Error type -> what the field "must" be; ``{name}`` placeholders come from the error's ``ctx``.
_REQUIREMENTS = {
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}", "less_than": "must be < {lt}",
    "int_type": "must be an integer", "int_from_float": "must be an integer", "int_parsing": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "finite_number": "must be a finite number", "bool_type": "must be a boolean", "bool_parsing": "must be a boolean",
    "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be an object",
    "model_type": "must be an object", "too_long": "must have at most {max_length} items",
    "too_short": "must have at least {min_length} items",
    "string_too_long": "must be at most {max_length} characters", "string_too_short": "must not be empty",
    "literal_error": "must be one of {expected}", "none_required": "must be null",
}


class SettingsError(ValueError):
    """Invalid settings. ``field`` names the first offending field (None for a rule across fields)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _INPUT_REPR_CHARS else text[:_INPUT_REPR_CHARS - 3] + "..."


def _is_union_branch(part: Any) -> bool:
    """pydantic names the branch of a union it tried (``str``, ``list[int]``) in an error's location."""
    return isinstance(part, str) and (not part.isidentifier() or part in _TYPE_NAMES)


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "bytes", "none"})


def error_location(error: Mapping[str, Any]) -> tuple[str | None, str]:
    """(the top-level field, the path as written: ``stop[2]``, ``stream_options.include_usage``)."""
    loc = error.get("loc", ())
    if not loc:
        return None, ""
    path = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_branch(part):
            path += f".{part}"
    return str(loc[0]), path


def describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``"<field> must be <requirement>, got <short input>"``."""
    field, path = error_location(error)
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", error["msg"]))
        return message if field is None or message.startswith(field) else f"{path}: {message}"
    if field is None:
        return error["msg"]
    if kind == "missing":
        return f"{path} is required"
    if kind == "extra_forbidden":
        return f"{path}: unknown option"
    requirement = _REQUIREMENTS.get(kind)
    loc = error.get("loc", ())
    if requirement is None or any(_is_union_branch(part) for part in loc[1:]):  # "must be a string" misleads there
        return f"invalid value for {path}: {error['msg'][:1].lower()}{error['msg'][1:]}"
    got = ctx["actual_length"] if kind in ("too_long", "too_short") and "actual_length" in ctx \
        else short_repr(error.get("input"))
    return f"{path} {requirement.format(**ctx)}, got {got}"


def settings_error(exc: ValidationError) -> SettingsError:
    errors = exc.errors(include_url=False)
    field = error_location(errors[0])[0] if errors else None
    return SettingsError("; ".join(describe_error(e) for e in errors), field)


class StrictModel(BaseModel):
    """Strict and closed: a bool is not an int, ``"1"`` is not a number (an int is a float), unknown keys fail."""
    model_config = ConfigDict(strict=True, extra="forbid")


class StrictSettings(StrictModel):
    """A :class:`StrictModel` whose construction raises :class:`SettingsError` (one line naming the field).

    Only for models built directly (``SamplingParams(...)``); a model validated as part of another one (an
    HTTP request) derives from :class:`StrictModel`, so its errors keep their location for the caller.
    """

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise settings_error(exc) from None


def setting(default: Any = PydanticUndefined, *, description: str, tags: Iterable[str] = (), **constraints: Any) -> Any:
    """``pydantic.Field`` with a required description and the surfaces (tags) that carry the field."""
    tag_list = sorted(tags)
    extra: dict[str, Any] | None = {"tags": tag_list} if tag_list else None
    return Field(default, description=description, json_schema_extra=extra, **constraints)


@dataclass(frozen=True)
class FieldSpec:
    """One settings field, as the surfaces that derive from it need it."""
    name: str
    value_type: type          # int, float, bool or str; for a list field, its items' type
    is_list: bool
    optional: bool            # None is a valid value
    choices: tuple[Any, ...] | None  # a Literal's values
    default: Any              # the default value (a fresh one for list fields)
    description: str
    tags: frozenset[str]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def argparse_options(self, shown_default: Any = None, note: str = "") -> dict[str, Any]:
        """``add_argument`` options for this field's flag: its type and choices, a list as one or more values
        (repeatable), a boolean as ``--x/--no-x``. The parsed default is None, meaning "not given"."""
        help_text = self.description + (f"; {note}" if note else "")
        if shown_default is not None and shown_default != []:
            shown = str(shown_default).lower() if isinstance(shown_default, bool) else shown_default
            help_text += f" (default {shown})"
        # argparse formats help with %: a description's own % must not be read as a format.
        options: dict[str, Any] = {"dest": self.name, "default": None, "help": help_text.replace("%", "%%")}
        if self.value_type is bool and not self.is_list:
            options["action"] = argparse.BooleanOptionalAction
            return options
        options["type"] = self.value_type
        if self.choices is not None:
            options["choices"] = self.choices
        if self.is_list:
            options.update(nargs="+", action="extend")
        return options


def field_specs(model: type[BaseModel], tag: str | None = None) -> list[FieldSpec]:
    """The model's fields in declaration order (only those tagged ``tag`` when given)."""
    specs = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        tags = frozenset(typing.cast(list[str], extra.get("tags", [])))
        if tag is not None and tag not in tags:
            continue
        value_type, is_list, optional, choices = _unpack(info.annotation)
        default = info.get_default(call_default_factory=True)
        specs.append(FieldSpec(name, value_type, is_list, optional, choices, default, info.description or "", tags))
    return specs


def _unpack(annotation: Any) -> tuple[type, bool, bool, tuple[Any, ...] | None]:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else annotation
        origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
        origin = typing.get_origin(annotation)
    if origin is list:
        item = typing.get_args(annotation)[0]
        if typing.get_origin(item) is typing.Annotated:
            item = typing.get_args(item)[0]
        return item, True, optional, None
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), False, optional, choices
    return annotation, False, optional, None
