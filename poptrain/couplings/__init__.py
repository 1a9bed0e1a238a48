"""Cross-member couplings, one family per file, registered by name (see :mod:`poptrain.couplings.base`)."""

from poptrain.couplings.base import COUPLINGS, Coupling, PopulationInfo, Quantity, build_couplings, register, resolve_coupling
from poptrain.couplings import averaging, relative, separation, sharing  # noqa: F401  (registers the built-ins)

__all__ = ["COUPLINGS", "Coupling", "PopulationInfo", "Quantity", "build_couplings", "register", "resolve_coupling"]
