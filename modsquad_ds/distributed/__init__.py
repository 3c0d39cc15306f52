"""Distributed plumbing: launch detection (env), layout checks (parallel), process-group start-up
(bootstrap), collectives, failure handling (watchdog) and DeepSpeed JSON configs (ds_config).

Importing this package imports neither deepspeed nor mpi4py; bootstrap and ds_config import
deepspeed when called.
"""
