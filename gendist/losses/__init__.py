"""Losses as small functions of network outputs; no distributed code."""
