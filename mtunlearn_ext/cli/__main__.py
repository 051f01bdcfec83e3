"""``python -m mtunlearn_ext.cli``: the ``mtunlearn`` command (:func:`console_main`)."""

from mtunlearn_ext.cli import console_main

if __name__ == "__main__":
    raise SystemExit(console_main())
