"""Federated meta-learning core, pure PyTorch + numpy (no Ray): what travels between sites and what the
server does with it.

- ``state``: the model's trainable parameters as one float32 vector with a stable layout, and the bytes
  that carry it (fp32 or fp16, with a header that names the layout).
- ``local``: one site's local meta-update (Proto-MAML episodes on its own task banks, optional FedProx
  term), returning the parameter delta.
- ``privacy``: client-level DP-FedAvg (clip, Gaussian noise on the sum) and its RDP privacy accountant.
- ``secagg``: dropout-robust secure aggregation (double masking, optional sparse neighbour graph), so
  the server only learns the survivors' sum; ``shamir``: the secret sharing it recovers masks with.
- ``summaries``: what a site reports besides its update (feature statistics, validation), as vectors
  whose sum over sites is all the server needs.
- ``aggregation``: server update rules on flat vectors (FedAvg, FedProx's penalty, FedAdam).
- ``strategy``: the pieces a round is made of, composable: sampling (seeded, or Poisson under DP), the
  round's instruction, aggregation (plain or from a secure sum), the server optimiser, and client-level
  DP as a wrapper around a strategy.
- ``messages``: the typed messages between the Coordinator and the sites (settings, round instruction,
  replies).

The Ray actors (Factory, Coordinator) move these objects between processes and hold no logic of their
own. Submodules are imported by name; this package imports nothing, so that ``privacy`` (which pulls in
Opacus) costs nothing to the code that does not need it.
"""
