"""Capacity planning for cluster runs: memory per GPU, all-to-all traffic, throughput (python -m modsquad_ds.plan)."""
