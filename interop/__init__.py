"""PyTorch side of duquant-jax: DLPack bridge, DuQuantLinear, model conversion."""
