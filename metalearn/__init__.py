"""Pure-torch meta-learning core of edgemeta.

Nothing in this package imports Ray: data sets and task samplers, models, meta-learning
algorithms, adaptation, evaluation and checkpoints can be used, tested and benchmarked alone.
The Ray layers (`actors`, `serve`, `experiments`) wrap it, so that an edge actor, the cloud
driver and a serving replica run the very same adaptation code.
"""
