"""The `kvsplice` command: `serve` (here), the library's commands (estimate, calibrate, eval), `bench`
and `plan`.

Every subcommand sets `func` (args -> exit status) with `set_defaults`, the convention shared
with `kvsplice.cli.register_commands`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, get_args

from kvsplice.cli import register_commands as register_library_commands
from server import bench, plan
from server.settings import InvalidSettings, Settings, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would blame the top-level command and print its usage; the subcommand's says more.
        command = getattr(args, "parser", parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsplice", description="Serve DeepSeek-V2 with a KVSplice-compressed MLA cache, and the tools around it.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    add_serve(subparsers)
    register_library_commands(subparsers)
    bench.register(subparsers)
    plan.register(subparsers)
    for command in subparsers.choices.values():
        command.set_defaults(parser=command)  # main() reports stray arguments with this command's usage
    return parser


# ---------------------------------------------------------------- serve


def add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the HTTP server",
        description="Serve a DeepSeek-V2 model over HTTP. Every setting is also read from KVSPLICE_<NAME> "
                    "environment variables and from the --config file; precedence: flags > env > file > defaults.")
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                        help="the model, as `vllm serve MODEL` takes it (the same as --model)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        # SUPPRESS: a flag that is not given must not hide the env or file value behind a default.
        common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(field)}
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif name == "served_model_name":  # vLLM's `--served-model-name A B`
            parser.add_argument(flag, nargs="+", **common)
        else:
            # Values stay text: the settings model converts and validates them with field-named errors.
            parser.add_argument(flag, **common, **_choices_metavar(field))
    vllm = parser.add_argument_group("vLLM's names for settings above")
    vllm.add_argument("--enforce-eager", dest="cuda_graphs", action="store_const", const=False,
                      default=argparse.SUPPRESS, help="no CUDA graphs (the same as --no-cuda-graphs)")
    vllm.add_argument("--kv-cache-memory-bytes", dest="kv_cache_bytes", default=argparse.SUPPRESS,
                      help="the KV budget (the same as --kv-cache-bytes)")
    vllm.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_const", const=False,
                      default=argparse.SUPPRESS, help="no line per request (the same as --no-enable-log-requests)")
    parser.set_defaults(func=run_serve)


def _help(field) -> str:
    default = field.default
    return f"{field.description} (default: {default})" if default is not None else field.description


def _choices_metavar(field) -> dict[str, str]:
    """Show a Literal's choices in the usage line; the settings model still does the checking."""
    choices = [arg for arg in get_args(field.annotation) if isinstance(arg, str)]
    return {"metavar": "{" + ",".join(choices) + "}"} if choices else {}


def run_serve(args: argparse.Namespace) -> int:
    flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    if args.model_tag is not None:
        if flags.get("model", args.model_tag) != args.model_tag:
            print(f"kvsplice serve: MODEL {args.model_tag!r} and --model {flags['model']!r} disagree; give one",
                  file=sys.stderr)
            return 2
        flags["model"] = args.model_tag
    try:
        settings = load_settings(**flags)
    except InvalidSettings as exc:
        print(f"kvsplice serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.api.launcher import serve  # imports torch and the model code: only now

    try:
        return serve(settings)
    except Exception as exc:  # noqa: BLE001 - a start-up failure is one line; the traceback is for debugging
        logging.getLogger("kvsplice.serve").debug("start-up failed", exc_info=True)
        print(f"kvsplice serve: cannot start: {startup_message(exc)}", file=sys.stderr)
        return 2


def startup_message(exc: BaseException) -> str:
    """One line. Our own refusals (ModelNotFound, and ValueError for settings the engine or the
    model cannot take) name the problem and the fix already; anything else gets its type, its
    first line, and where to find the rest."""
    from kvsplice.model_source import ModelNotFound

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if isinstance(exc, (ModelNotFound, ValueError)):
        return " ".join(lines) or type(exc).__name__
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first} (run with --log-level debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
