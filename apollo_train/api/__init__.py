"""Runs inside vLLM's API server: the training routes and the supervisor of the training worker."""
