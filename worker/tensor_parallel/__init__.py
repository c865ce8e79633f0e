"""Training vLLM's tensor-parallel shards where they are: one training rank per vLLM rank.

Each rank's HuggingFace model holds views of its own shard only (views.py binds them); `layers`
turns the model into a tensor-parallel one with the few collectives a forward and backward need;
`shards` knows every rank's box of every weight; `optimizer` steps each shard as the whole matrix
would be stepped at one rank; `lockstep` makes the ranks run the same steps.
"""
