"""The training worker's optimizer: APOLLO / APOLLO-Mini, with AdamW for the other parameters."""

from worker.optim.apollo import APOLLO_MINI, DEFAULT_RANK, Apollo, projection

__all__ = ["APOLLO_MINI", "DEFAULT_RANK", "Apollo", "projection"]
