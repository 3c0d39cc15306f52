"""The miniature reproduction study: ``python -m modsquad_ds.study`` (see __main__.py)."""
