"""Fixtures of the demo and the post-training examples: the stdlib corpus, toy chat sets."""
