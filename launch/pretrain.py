"""Entry script: `python launch/pretrain.py --help` (same as `llmforge pretrain`)."""

import sys

from llmforge.allocator import reexec_with_tcmalloc

reexec_with_tcmalloc()  # before torch is imported (see llmforge/allocator.py): a training process's allocator

from llmforge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["pretrain", *sys.argv[1:]])
