"""Evaluation: the long-context harness (RULER/NIAH-style tasks, positional bias), the
InfLLM v2 retrieval experiment, task accuracy."""
