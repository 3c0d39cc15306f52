"""Evaluation: the paper's metrics as exact sums (metrics), Delta_t (delta_t), expert usage and task
similarity (usage, similarity), heat maps (plots), results files (report); the command is
``python -m modsquad_ds.evaluate`` (eval/__main__.py)."""
