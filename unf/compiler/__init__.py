"""The symmetry-spec compiler: ``torch.export`` graph -> axis union-find -> :class:`~unf.spec.WeightSpaceSpec`.

Modules: ``trace`` (export, errors), ``axes`` (union-find with product/segment refinements), ``context``
(values and rule helpers), ``rules`` (the op rule table), ``entries`` (atoms -> entries), ``derive`` (driver).
"""

from .derive import UnknownOpWarning, derive_spec
from .rules import RULES
from .trace import SpecError

__all__ = ["derive_spec", "SpecError", "UnknownOpWarning", "RULES"]
