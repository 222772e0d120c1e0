"""Meta-learning: Proto-MAML episodes, the inner loop, meta-training and its checkpoints."""
