"""Pure PyTorch and numpy core of bayprano: data, model, meta-learning, methods, metrics.

Nothing under this package imports Ray; the actors, Serve app and Tune trainable move these objects
between processes.
"""
