"""The ``rettn`` command line: one subcommand per module (generate, eval, profile), dispatched here.

    rettn generate --prompt "a red circle moving right"              # embedded model, offline
    rettn generate --prompt "..." --compare --out clip.gif            # + dense baseline, PSNR/SSIM
    rettn generate --model THUDM/CogVideoX-2b --preset cogvideox-2b --prompt "..." --out cat.mp4
    accelerate launch --num_processes 4 -m rettn generate --prompts prompts.txt --out outputs/

Bad input gets one line ``rettn: error: <message>`` on stderr and exit code 2: a
:class:`rettn.errors.RettnError` (what the commands check), or a usage error of the parser
(:class:`rettn.tools.args.Parser`: a wrong value or a missing argument, checked before anything
loads; its line ends with ``(see rettn <command> --help)``). Any other exception is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse

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
    return common.report_errors(args.handler, args)
