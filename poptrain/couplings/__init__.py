"""Cross-member couplings, one family per file, registered by name (see :mod:`poptrain.couplings.base`)."""

from poptrain.couplings.base import Coupling, PopulationInfo, Quantity, Rewrite, build_couplings
from poptrain.couplings.function import FunctionCoupling, coupling_function
from poptrain.registry import COUPLINGS, register, registered, resolve_coupling

__all__ = [
    "COUPLINGS", "Coupling", "FunctionCoupling", "PopulationInfo", "Quantity", "Rewrite", "build_couplings", "coupling_function", "register",
    "registered", "resolve_coupling",
]
