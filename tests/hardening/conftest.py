"""Import paths for the hardening tests (abort/disconnect, bad model loads, security audit); the demo model is
tests/conftest.py's `demo_model`."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent / "server"):      # hardening_support, and the scripted engine of tests/server/fakes.py
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

