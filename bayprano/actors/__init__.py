"""Ray actors: one Factory per site holding a private data shard, and the Coordinator."""
