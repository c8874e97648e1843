"""Learned optimizers as ``torch.optim.Optimizer`` subclasses (built in a later issue)."""

__all__: list[str] = []
