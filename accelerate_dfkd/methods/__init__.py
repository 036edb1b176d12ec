"""The registry of methods: one explicit dict, name -> Synthesizer class (one file per method)."""

from ..synthesis import Synthesizer
from .dafl import DAFL, DAFLConfig
from .dfad import DFAD, DFADConfig
from .dfq import DFQ, DFQConfig
from .zskt import ZSKT, ZSKTConfig

METHODS: dict[str, type[Synthesizer]] = {
    "dfad": DFAD,
    "dafl": DAFL,
    "zskt": ZSKT,
    "dfq": DFQ,
}

__all__ = ["METHODS", "DFAD", "DFADConfig", "DAFL", "DAFLConfig", "ZSKT", "ZSKTConfig", "DFQ", "DFQConfig"]
