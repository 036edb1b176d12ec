"""The registry of methods: one explicit dict, name -> Synthesizer class (one file per method)."""

from ..synthesis import Synthesizer
from .dfad import DFAD, DFADConfig

METHODS: dict[str, type[Synthesizer]] = {
    "dfad": DFAD,
}

__all__ = ["METHODS", "DFAD", "DFADConfig"]
