"""Pure PyTorch and numpy core of bayprano: data, model, meta-learning, metrics, baselines.

Nothing under this package imports Ray; the actors, Serve app and Tune trainable move these objects
between processes.
"""
