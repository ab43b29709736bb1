"""Tiny offline checkpoints of the models the auto family is proven on.

One module per model, each with `build(out_dir, *, seed=0, **sizes)`.
"""
