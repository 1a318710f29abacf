"""Hypothesis runs derandomized by default: the same examples on every run, so that the suite (and CI)
passes or fails for a change of code, not for a draw. ``--hypothesis-profile explore`` draws new ones."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("default")
