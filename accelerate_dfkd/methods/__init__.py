"""The registry of methods: one explicit dict, name -> Synthesizer class (one file per method)."""

from ..synthesis import Synthesizer
from .dafl import DAFL, DAFLConfig
from .deepinversion import DeepInversion, DeepInversionConfig
from .dfad import DFAD, DFADConfig
from .dfq import DFQ, DFQConfig
from .pre_dfkd import PreDFKD, PreDFKDConfig
from .zskt import ZSKT, ZSKTConfig

METHODS: dict[str, type[Synthesizer]] = {
    "dfad": DFAD,
    "dafl": DAFL,
    "zskt": ZSKT,
    "dfq": DFQ,
    "pre_dfkd": PreDFKD,
    "deepinversion": DeepInversion,
}

__all__ = ["METHODS", "DFAD", "DFADConfig", "DAFL", "DAFLConfig", "ZSKT", "ZSKTConfig", "DFQ", "DFQConfig",
           "PreDFKD", "PreDFKDConfig", "DeepInversion", "DeepInversionConfig"]
