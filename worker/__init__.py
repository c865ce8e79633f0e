"""The training worker: trains the served model's weights in place and checkpoints them."""
