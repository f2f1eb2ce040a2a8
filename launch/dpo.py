"""Entry script: `deepspeed launch/dpo.py --recipe recipes/dpo-tiny.yaml` (same as `llmforge dpo`)."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["dpo", *sys.argv[1:]])
