"""Command-line arguments -> :class:`RunConfig`, generated from the config's fields.

Option names are the field names with dashes (``keep_columns`` -> ``--keep-columns``); help,
choices and defaults come from the dataclass, so nothing is declared twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .config import JOB_EXCLUDES, JOB_OPTIONS, RunConfig, parse_int_list, parse_name_list


def _dims(text: str) -> tuple[int, ...]:
    try:
        return parse_int_list(text, "--dims")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_CONVERTERS = {"dims": _dims, "keep_columns": parse_name_list}


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_run_arguments(parser: argparse.ArgumentParser, fields: typing.Iterable[str] | None = None,
                      job: str = "run"):
    """Add one option per :class:`RunConfig` field (or per name in ``fields``) that ``job``
    takes: every shared option, and the job's own (:data:`JOB_OPTIONS`)."""
    hints = typing.get_type_hints(RunConfig)
    others = {name for j, names in JOB_OPTIONS.items() if j != job for name in names}
    others |= set(JOB_EXCLUDES.get(job, ()))
    for f in dataclasses.fields(RunConfig):
        if (fields is not None and f.name not in fields) or f.name in others:
            continue
        meta = dict(f.metadata)
        kwargs: dict = {"dest": f.name, "help": meta.pop("help")}
        if hints[f.name] is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _CONVERTERS.get(f.name) or _scalar_type(hints[f.name])
            kwargs |= {k: v for k, v in meta.items() if v is not None}
            if f.default not in (None, ()) and not kwargs.get("required"):
                shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                kwargs["help"] += f" (default: {shown})"
        kwargs.setdefault("default", argparse.SUPPRESS)
        parser.add_argument(option_name(f.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config for parsed arguments; options not given keep the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names})


def _scalar_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
