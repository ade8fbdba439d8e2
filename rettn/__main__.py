"""``python -m rettn``: the command line (the same as the ``rettn`` script)."""

from rettn.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
