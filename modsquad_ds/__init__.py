"""Mod-Squad on DeepSpeed."""
