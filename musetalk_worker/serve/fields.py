"""Form fields as the job schema sees them: each string typed by its field's type, and a description of them.

A multipart form carries only strings; the job schema is strict (``"8"`` is
not a number). Each form value is typed here by the annotation of its
:class:`~musetalk_worker.schema.JobInput` field, and a value that does not
parse is passed on as the string it was, so the schema refuses it with its
own message ("'batch_size' is 'abc'; it must be a whole number from 1 to 256.").
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any, Dict, FrozenSet, Mapping

from ..options import ENGINE_OPTIONS, LIMITS
from ..schema import MODEL_VERSIONS, JobInput

# The uploads (``adapter``, a LoRA's adapter.safetensors, is optional); every other form field is a job option.
FILE_FIELDS = ("source", "audio", "adapter")
# Uploads whose SHA-256 the job takes (hashed as they arrive; the media are not hashed).
HASHED_FILES = ("adapter",)
# Job keys a form may not set: the video comes back in the response, never to a bucket.
REFUSED_FIELDS = ("output",)

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")
_NULL = ("", "null", "none")
_INTEGER = re.compile(r"^[+-]?\d+$")


def typed_fields(form: Mapping[str, str]) -> Dict[str, Any]:
    """The form's job options, each typed as its schema field says (unknown names stay strings)."""
    return {name: _typed(name, text) for name, text in form.items()}


def _typed(name: str, text: str) -> Any:
    field = JobInput.model_fields.get(name)
    if field is None:
        return text  # the schema names it as an unknown key, with the allowed ones
    kinds = _kinds(field.annotation)
    value = text.strip()
    if "null" in kinds and value.lower() in _NULL:
        return None
    if "boolean" in kinds and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if "integer" in kinds and _INTEGER.match(value):
        return int(value)
    if "number" in kinds:
        try:
            number = float(value)
        except ValueError:
            return text
        return number if math.isfinite(number) else text
    if "list" in kinds:
        try:
            return json.loads(value)
        except ValueError:
            return text
    return text


def _kinds(annotation: Any) -> FrozenSet[str]:
    """The JSON kinds a field annotation admits: integer, number, boolean, string, list, null."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(_kinds(arg) for arg in typing.get_args(annotation)))
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return frozenset({"string"})
    if origin is list:
        return frozenset({"list"})
    return frozenset({{int: "integer", float: "number", bool: "boolean", str: "string",
                       type(None): "null"}.get(annotation, "string")})


def describe_options() -> Dict[str, Dict[str, Any]]:
    """Each model's versions and form fields (kind, default, range or choices), for ``GET /``."""
    described = {}
    for model, options_class in ENGINE_OPTIONS.items():
        fields = {}
        for option in dataclasses.fields(options_class):
            field = JobInput.model_fields[option.name]
            entry: Dict[str, Any] = {"type": sorted(_kinds(field.annotation)),
                                     "default": MODEL_VERSIONS[model][0] if option.name == "version" else field.default}
            if option.name in LIMITS:
                entry["range"] = list(LIMITS[option.name])
            choices = _choices(field.annotation)
            if choices:
                entry["choices"] = choices
            fields[option.name] = entry
        fields["version"]["choices"] = list(MODEL_VERSIONS[model])
        described[model] = {"versions": list(MODEL_VERSIONS[model]), "options": fields}
    return described


def _choices(annotation: Any) -> list:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [c for arg in typing.get_args(annotation) if typing.get_origin(arg) is typing.Literal
            for c in typing.get_args(arg)]
