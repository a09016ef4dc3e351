"""Tutorials that double as the package's embedded defaults (``twinflow mnist ...``)."""
