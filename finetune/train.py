"""Fine-tune a vision-language model on image→JSON pairs.

    accelerate launch finetune/train.py recipe=invoices [key.path=value ...]

`recipe` is a YAML path or a bare name under recipes/; overrides are YAML values (`train.max_steps=50`,
`tuning.groups.vision=full`, `tracking.report_to=[tensorboard]`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts finetune/ itself first on sys.path, where its modules (config, data, ...)
# would shadow top-level packages of the same names. Import the package from its parent instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from finetune.errors import UserError
from finetune.recipe import load_recipe, parse_cli


def main(argv: list[str] | None = None) -> dict:
    """Parse `recipe=... key=value ...`, run the recipe, return the before/after metrics."""
    from finetune.training.runner import FineTuneRecipe

    recipe_name, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    recipe = load_recipe(recipe_name, overrides)
    job = FineTuneRecipe(recipe)
    job.setup()
    return job.run()


if __name__ == "__main__":
    try:
        main()
    except (UserError, FileExistsError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")  # a problem with the recipe, the data or the run folder: one line, no traceback
