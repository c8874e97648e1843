"""``python -m meta_train`` (or ``torchrun --nproc_per_node N -m meta_train``): see :mod:`meta_train.distributed`."""

from .distributed import run_and_exit

run_and_exit()
