"""``python -m bench [options]``: the same as ``countercache bench``."""

from __future__ import annotations

from .main import main

raise SystemExit(main())
