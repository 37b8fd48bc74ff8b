"""Command-line flags generated from the typed configs, so that a default and its help text have one home.

Each training stage's pydantic config (`OptimConfig`, `ExpertConfig`, `PretrainConfig`, `TuneConfig`,
`PlanSettings`, ...) declares its fields with a default and a description. A command names the fields it
exposes; this module turns each into a flag (`field_name` -> `--field-name`, or the name in `FLAG_NAMES`)
whose default is the config's own and whose help is the field's description, and reads the parsed values back
into keyword arguments for the config. The Python API and the command line therefore cannot drift apart, and
`tests/test_cli_config.py` checks that they do not.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

# Fields whose flag has a name of its own: one flag keeps one meaning on every command.
FLAG_NAMES = {
    "z_loss_coef": "--z-loss",
    "public": "--public-data",
    "num_layers": "--layers",
    "num_heads": "--heads",
    "router_noise_multiplier": "--dp-router-noise",
}


def flag_name(field: str, prefix: str = "") -> str:
    return FLAG_NAMES.get(field, "--" + (prefix + field).replace("_", "-"))


def _unwrap_optional(annotation):
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def _argument_options(annotation, default) -> dict:
    """argparse options for a field of this type."""
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction, "default": default}
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation)), "default": default}
    if origin is list:
        (item,) = typing.get_args(annotation)
        return {"nargs": "*", "type": item, "default": None if default is None else list(default),
                "metavar": "FILE" if item is Path else None}
    if annotation in (int, float, str, Path):
        return {"type": annotation, "default": default}
    raise TypeError(f"no flag for a field of type {annotation!r}")


def add_config_flags(parser, config: type[BaseModel], fields: Sequence[str],
                     defaults: BaseModel | None = None, required: Sequence[str] = (), prefix: str = "",
                     choices: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add one flag per named field of `config`. Defaults come from `defaults` (an instance, for a stage
    whose nested config has stage-specific defaults) or from the field itself; help is the field's
    description. `prefix` names the flags of a nested config (`dp_` -> `--dp-epsilon`, read back as
    `dp_epsilon`). A field the config requires but the command does not (`required`) defaults to None:
    the config is then not built. `choices` lists the values of a text field whose values a registry names
    (such as the proxy embedders), so `--help` shows them and argparse refuses others."""
    for field in fields:
        info = config.model_fields[field]
        if field in required or (defaults is None and info.is_required()):
            default = None
        elif defaults is not None:
            default = getattr(defaults, field)
        else:
            default = info.get_default(call_default_factory=True)
        options = _argument_options(info.annotation, default)
        if choices and field in choices:
            options["choices"] = list(choices[field])
        if field in required:
            options.pop("default")
            options["required"] = True
            if options.get("nargs") == "*":
                options["nargs"] = "+"
        parser.add_argument(flag_name(field, prefix), dest=prefix + field,
                            help=(info.description or "").replace("%", "%%"), **options)


def config_values(args: argparse.Namespace, fields: Sequence[str], prefix: str = "") -> dict:
    """The parsed values of the named fields, as keyword arguments for their config."""
    return {field: getattr(args, prefix + field) for field in fields}
