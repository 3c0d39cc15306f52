"""Training on DeepSpeed: ``python -m modsquad_ds.train --config run.yaml [--set key=value ...]``."""
