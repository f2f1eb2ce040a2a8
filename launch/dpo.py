"""Entry script: `deepspeed launch/dpo.py --recipe recipes/dpo-tiny.yaml` (same as `llmforge dpo`)."""

import sys

from llmforge.allocator import reexec_with_tcmalloc

reexec_with_tcmalloc()  # before torch is imported (see llmforge/allocator.py): a training process's allocator

from llmforge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["dpo", *sys.argv[1:]])
