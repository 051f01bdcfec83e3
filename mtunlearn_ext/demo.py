"""The README's main job. For now the ops showcase (see :mod:`mtunlearn_ext.showcase`)."""

from __future__ import annotations

from mtunlearn_ext.showcase import main

if __name__ == "__main__":
    raise SystemExit(main())
