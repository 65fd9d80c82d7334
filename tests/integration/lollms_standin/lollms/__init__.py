"""Stand-in for the parts of the `lollms` package that a binding meets, in its two generations (see ../README.md).

GENERATION chooses which one the submodules follow; the harness sets it before it imports them:
* "11.0.0": the PyPI wheel lollms 11.0.0 (February 2025);
* "webui": the `lollms/` package of today's ParisNeo/lollms-webui (e6afb66a, 2026-04-07).
"""
GENERATIONS = ("11.0.0", "webui")
GENERATION = "webui"
