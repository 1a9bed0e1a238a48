"""Cross-member couplings, one family per file, registered by name (see :mod:`poptrain.couplings.base`)."""

from poptrain.config.registry import COUPLINGS, register, registered, resolve_coupling
from poptrain.couplings.base import Columns, Coupling, PopulationInfo, Quantity, Rewrite, build_couplings, column_of
from poptrain.couplings.function import FunctionCoupling, coupling_function

__all__ = [
    "COUPLINGS",
    "Columns",
    "Coupling",
    "FunctionCoupling",
    "PopulationInfo",
    "Quantity",
    "Rewrite",
    "build_couplings",
    "column_of",
    "coupling_function",
    "register",
    "registered",
    "resolve_coupling",
]
