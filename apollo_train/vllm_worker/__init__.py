"""Runs inside vLLM's engine (its worker processes): the model loader that shares the weights."""
