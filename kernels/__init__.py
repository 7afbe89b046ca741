"""Pallas kernel ops, each usable on its own (one folder per op; see each op's README)."""
