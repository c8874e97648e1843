"""universal-neural-functionals: learning on neural-network weights.

Core API: :func:`derive_spec` (automatic permutation-symmetry specs for any ``nn.Module``),
:class:`WeightSpaceSpec` (the spec value), :func:`check_spec` (numerical proof of a spec).
"""

from .check import SpecCheckReport, check_spec, randomize_
from .compiler import SpecError, UnknownOpWarning, derive_spec
from .spec import Entry, Permutation, WeightSpaceSpec

__all__ = [
    "derive_spec",
    "check_spec",
    "randomize_",
    "SpecCheckReport",
    "WeightSpaceSpec",
    "Entry",
    "Permutation",
    "SpecError",
    "UnknownOpWarning",
]
__version__ = "0.1.0"
