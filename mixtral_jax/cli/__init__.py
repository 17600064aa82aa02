"""The `mixtral-jax` command: one module per subcommand, each with `register(subparsers)`.

Every subcommand module in this package is discovered and registered; heavy imports happen inside `run`.
User errors (`MixtralError`) and bad arguments print one line on stderr and exit non-zero;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from mixtral_jax.errors import MixtralError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixtral-jax", description="Mixtral mixture-of-experts models in JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except MixtralError as e:
        if args.debug:
            raise
        print(f"mixtral-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mixtral-jax {args.command}: interrupted", file=sys.stderr)
        return 130
