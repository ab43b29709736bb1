"""`python -m finetune COMMAND ...`: the same as the `finetune` command (see `finetune.cli`)."""

import sys

from finetune.cli import main

sys.exit(main())
