"""``python -m mtunlearn_ext``: the command line, as ``mtunlearn`` and
``python -m mtunlearn_ext.cli`` run it."""

from mtunlearn_ext.cli import console_main

if __name__ == "__main__":
    raise SystemExit(console_main())
