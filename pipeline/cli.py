"""The command line: ``python -m pipeline {run,nightly,enrich,serve,demo}``.

Options are generated from :class:`~pipeline.config.RunConfig`'s fields (option names are the
field names with dashes, ``keep_columns`` -> ``--keep-columns``; help, choices and defaults come
from the dataclass, so nothing is declared twice); ``serve``'s from
:class:`~pipeline.serve.config.ServeConfig`'s the same way. A job's result is reported as a few lines
(``--json``: the summary as JSON); exit codes: 0 done, 1 rows do not reconcile, 2 a setup
mistake found before any work (:class:`~pipeline.errors.UserError` and the model's own
errors), 3 the run started and failed (:class:`~pipeline.errors.RunFailed`; rerun to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import typing
from importlib import resources
from pathlib import Path

from . import summary
from .config import JOB_EXCLUDES, JOB_OPTIONS, RunConfig, parse_int_list, parse_name_list
from .errors import RunFailed, UserError
from .serve.config import API_KEY_ENV, ServeConfig


def demo(args: argparse.Namespace) -> int:
    """Embed the bundled sample corpus with the offline tiny model on a local Ray."""
    # Lazy: the model builder imports torch; --help and option errors should not wait for it.
    from .model.builder import build_model_dir

    corpus = resources.files("pipeline.data").joinpath("sample_corpus")
    model_dir = Path(args.model_dir)
    try:  # A demo is rerun often: replace its previous output (only the pipeline's own files).
        config = RunConfig(input=str(corpus), output=args.out, model=str(model_dir),
                           dims=args.dims, keep_columns=("lang",), overwrite=True,
                           progress=args.progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not (model_dir / "config.json").is_file():
        build_model_dir(model_dir, "tiny", seed=0)
        # stderr: with --json, stdout holds the summary alone
        print(f"built tiny random-weight model in {model_dir}", file=sys.stderr)
    return _run_and_report(config, "run", args.json)


def run(args: argparse.Namespace) -> int:
    """Pre-flight, run the Ray Data job, report; exit 2 on a user error."""
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run_and_report(config, args.command, args.json)


def serve(args: argparse.Namespace) -> int:
    """Run the query service until SIGINT/SIGTERM; exit 2 on a setup mistake (found before
    Ray starts), 3 when the service fails to start."""
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    try:
        config = ServeConfig(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Lazy: the service imports Ray Serve and torch, which --help and option errors should
    # not wait for.
    from .serve.server import serve_until_stopped

    try:
        serve_until_stopped(config, config.api_key or os.environ.get(API_KEY_ENV))
    except RunFailed as err:
        print(f"error: {str(err)[:4000]}", file=sys.stderr)
        return 3
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _job(command: str):
    """The job function of a command. Lazy: the jobs import Ray (and torch), which ``--help``
    and option errors should not wait for."""
    if command == "enrich":
        from .jobs.enrich import run_enrich  # lazy: ray, torch (see above)

        return run_enrich
    if command == "nightly":
        from .jobs.nightly import run_nightly  # lazy: ray, torch

        return run_nightly
    from .jobs.run import run as run_job  # lazy: ray, torch

    return run_job


def _run_and_report(config: RunConfig, command: str = "run", as_json: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        result = _job(command)(config)
    except RunFailed as err:
        print(f"error: {str(err)[:4000]}", file=sys.stderr)
        print(summary.resume_hint(config, str(err)), file=sys.stderr)
        return 3
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if as_json:
        shown = {k: v for k, v in result.items() if k not in ("config", "output_files")}
        print(json.dumps(shown, indent=2))
    else:
        print("\n".join(summary.report(result, config, command,
                                        elapsed_s=time.monotonic() - started)))
    if not result["reconciled"]:
        print("error: row counts do not reconcile: " + "; ".join(result["reconcile_problems"]),
              file=sys.stderr)
        return 1
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are setup mistakes (exit 2): the pipeline's :class:`UserError`, option
    values (``ValueError``, also ``TokenizerError`` and ``UnsupportedConfigError``), a local
    path that is not there, and the model package's own errors (it depends on nothing of the
    pipeline)."""
    from .model.checkpoint import CheckpointError  # lazy: imports torch
    from .model.sources import ModelSourceError

    return UserError, ValueError, FileNotFoundError, CheckpointError, ModelSourceError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"demo": demo, "run": run, "nightly": run, "enrich": run,
            "serve": serve}[args.command](args)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job (options from ``RunConfig``), and ``demo``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="embed a corpus with Ray Data (the main job)")
    add_run_arguments(p)
    _report_option(p)
    p = sub.add_parser("nightly", help="re-embed a corpus into a new snapshot, encoding only "
                       "new and changed rows; _LATEST names the newest complete one")
    add_run_arguments(p, job="nightly")
    _report_option(p)
    p = sub.add_parser("enrich", help="write the source table back with embedding columns "
                       "added, every row and column intact (Parquet folders, hive partitions, "
                       "Iceberg tables)")
    add_run_arguments(p, job="enrich")
    _report_option(p)
    p = sub.add_parser("serve", help="an OpenAI-compatible /v1/embeddings service on Ray Serve "
                       "with the batch jobs' encoder (docs/serve.md)")
    add_field_arguments(p, ServeConfig)
    p = sub.add_parser("demo", help="embed the bundled sample corpus with an offline tiny "
                       "model on a local Ray")
    p.add_argument("--model-dir", default="models/nomic-moe-tiny",
                   help="where the tiny model is built on first use")
    p.add_argument("--out", default="out/demo", help="output folder (replaced on each run)")
    p.add_argument("--dims", default="64,32,16", help="widths (the tiny model is 64 wide; "
                   "default: 64,32,16)")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"),
                   help="Ray Data progress bars (auto: when stderr is a terminal)")
    _report_option(p)
    return parser


def _report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON "
                        "on stdout instead of the short report (it is in <output>/_summary.json "
                        "either way)")


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
    others = {name for j, names in JOB_OPTIONS.items() if j != job for name in names}
    others |= set(JOB_EXCLUDES.get(job, ()))
    names = [f.name for f in dataclasses.fields(RunConfig)
             if (fields is None or f.name in fields) and f.name not in others]
    add_field_arguments(parser, RunConfig, names)


def add_field_arguments(parser: argparse.ArgumentParser, cls: type,
                        names: typing.Iterable[str] | None = None) -> None:
    """One option per field of the config dataclass ``cls`` (or per name in ``names``): its
    help, metavar and choices from the field's metadata, its default shown."""
    hints = typing.get_type_hints(cls)
    names = None if names is None else set(names)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
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
