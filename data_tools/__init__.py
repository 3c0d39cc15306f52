"""Command-line tools for Taskonomy data: make_shards, verify_shards, mini_taskonomy."""
