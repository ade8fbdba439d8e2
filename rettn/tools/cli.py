"""The ``rettn`` command line: one subcommand per module (generate, eval, profile), dispatched here.

    rettn generate --prompt "a red circle moving right"              # embedded model, offline
    rettn generate --prompt "..." --compare --out clip.gif            # + dense baseline, PSNR/SSIM
    rettn generate --model THUDM/CogVideoX-2b --preset cogvideox-2b --prompt "..." --out cat.mp4
    accelerate launch --num_processes 4 -m rettn generate --prompts prompts.txt --out outputs/

Bad input gets one line ``rettn: error: <message>`` on stderr and exit code 2: a
:class:`rettn.errors.RettnError` (what the commands check), or a usage error of the parser
(:class:`rettn.tools.args.Parser`: a wrong value or a missing argument, checked before anything
loads; its line ends with ``(see rettn <command> --help)``). Any other exception is a bug and
shows its traceback. rettn's own warnings (:class:`rettn.errors.RettnWarning`, e.g. a sparse step
measured slower than dense) are one line on stderr too, without Python's source line.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from rettn.tools import args as common

COMMANDS = ("generate", "evaluate", "profile.command", "calibrate.command")  # modules of rettn.tools, in --help order


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = common.Parser(prog="rettn", description="Re-ttention sparse attention for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"rettn.tools.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    """The console script ``rettn`` (and ``python -m rettn``): the exit code."""
    args = build_parser().parse_args(argv)  # usage errors: one line, SystemExit(2)
    with warnings.catch_warnings():  # restores showwarning afterwards
        show = warnings.showwarning
        warnings.showwarning = lambda message, category, *a, **kw: (
            show_warning(message, category) if _is_rettns(category) else show(message, category, *a, **kw))
        return common.report_errors(args.handler, args)


def _is_rettns(category) -> bool:
    from rettn.errors import RettnWarning

    return issubclass(category, RettnWarning)


def show_warning(message, category=None, file=None):
    """One of rettn's warnings, as the command line shows it: its message, one line on stderr."""
    print(" ".join(str(message).split()), file=file or sys.stderr)
