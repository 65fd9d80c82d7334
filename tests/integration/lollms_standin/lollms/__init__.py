"""Stand-in for the parts of LoLLMS 11.0.0 that a binding meets (see ../README.md)."""
