"""The registry of methods: one explicit dict, name -> Synthesizer class (one file per method)."""

from ..synthesis import Synthesizer
from .cmi import CMI, CMIConfig
from .dafl import DAFL, DAFLConfig
from .deepinversion import DeepInversion, DeepInversionConfig
from .dfad import DFAD, DFADConfig
from .dfq import DFQ, DFQConfig
from .exported_dataset import ExportedDataset, ExportedDatasetConfig
from .fast_dfkd import FastDFKD, FastDFKDConfig
from .pre_dfad import PreDFAD, PreDFADConfig
from .pre_dfkd import PreDFKD, PreDFKDConfig
from .ssd_kd import SSDKD, SSDKDConfig
from .zskt import ZSKT, ZSKTConfig

METHODS: dict[str, type[Synthesizer]] = {
    "dfad": DFAD,
    "dafl": DAFL,
    "zskt": ZSKT,
    "dfq": DFQ,
    "pre_dfkd": PreDFKD,
    "pre_dfad": PreDFAD,
    "deepinversion": DeepInversion,
    "cmi": CMI,
    "fast_dfkd": FastDFKD,
    "ssd_kd": SSDKD,
    "exported_dataset": ExportedDataset,  # KD on a set written by `accelerate-dfkd synthesize`
}

__all__ = ["METHODS", "DFAD", "DFADConfig", "DAFL", "DAFLConfig", "ZSKT", "ZSKTConfig", "DFQ", "DFQConfig",
           "PreDFKD", "PreDFKDConfig", "PreDFAD", "PreDFADConfig", "DeepInversion", "DeepInversionConfig", "CMI", "CMIConfig",
           "SSDKD", "SSDKDConfig", "FastDFKD", "FastDFKDConfig", "ExportedDataset", "ExportedDatasetConfig"]
