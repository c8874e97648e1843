"""Meta-training of learned optimizers (built in a later issue)."""

__all__: list[str] = []
