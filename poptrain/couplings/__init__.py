"""Cross-member couplings, one family per file, registered by name (see :mod:`poptrain.couplings.base`)."""

from poptrain.couplings.base import Coupling, PopulationInfo, Quantity, Rewrite, build_couplings
from poptrain.registry import COUPLINGS, register, registered, resolve_coupling

__all__ = ["COUPLINGS", "Coupling", "PopulationInfo", "Quantity", "Rewrite", "build_couplings", "register", "registered", "resolve_coupling"]
