"""Entry script: `deepspeed launch/dpo.py --recipe recipes/dpo-tiny.yaml` (same as `llmforge dpo`)."""

import sys

from llmforge.allocator import reexec_with_tcmalloc
from llmforge.errors import exit_on_user_error

# before torch is imported (see llmforge/allocator.py): the allocator of a training process
exit_on_user_error(reexec_with_tcmalloc)()

from llmforge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["dpo", *sys.argv[1:]])
