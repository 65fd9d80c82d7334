"""`airobackend` command line: `serve` (the default), `run` (llama.cpp `main`-style generation), `inspect`, `kernels`.

Each subcommand lives in `airobackend.commands.<name>` with `add_arguments(parser)` and `main(args) -> int`, so this
module only dispatches. KoboldCpp's spelling `airobackend MODEL [PORT] [--flags]` means `serve`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "serve": "Start the HTTP/WebSocket server (KoboldAI/KoboldCpp, text-generation-webui and OpenAI APIs)",
    "run": "Generate from a prompt on the console, like llama.cpp's main (-i for an interactive chat)",
    "inspect": "Print what a model file holds: format, mix, hparams, tensor types, RAM needed",
    "perplexity": "A model's perplexity on a text file, computed as llama.cpp's perplexity tool does",
    "kernels": "Show the fast kernels this CPU gets; --dump DIR writes their generated source",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' only where the help does not state the default itself and there is one to state (not
    for on/off flags), so that each default shows once (most help texts say theirs, with the AIRO_* variable)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airobackend", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        importlib.import_module(f"airobackend.commands.{name}").add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"airobackend.commands.{args.command}")
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
