"""Entry script: `python launch/train_tokenizer.py --help` (same as `llmforge train-tokenizer`)."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["train-tokenizer", *sys.argv[1:]])
