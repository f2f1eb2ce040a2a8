"""Evaluation: perplexity on val splits, lm-evaluation-harness tasks."""
