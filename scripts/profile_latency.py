#!/usr/bin/env python
"""Latency profile, dense vs rettn: the same code and options as ``rettn profile``.

    python scripts/profile_latency.py                                   # embedded tiny model
    python scripts/profile_latency.py --random-weights --arch cogvideox-2b   # full size (GPU)
    python scripts/profile_latency.py --random-weights --arch cogvideox-5b --layers 2 \\
        --frames 9 --height 96 --width 96                               # shrunk, runs on a CPU

Prints a table, writes a JSON report and a PNG chart (see docs/profiling.md).
Bad input: one line ``rettn: error: ...`` on stderr and exit code 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch_log  # noqa: E402  (scripts/: records kernel launches when RETTN_LAUNCH_LOG is set)
from rettn.tools.profile.command import main  # noqa: E402

if __name__ == "__main__":
    launch_log.install_from_env()
    sys.exit(main(prog="profile_latency.py"))
