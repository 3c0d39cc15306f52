"""Taskonomy data: task registry, decoding, transforms and the streaming pipeline."""
