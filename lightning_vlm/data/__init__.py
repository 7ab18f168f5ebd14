"""LightningDataModules, row checks and collation."""

from lightning_vlm.data.base import SyntheticData, VLMDataModule
from lightning_vlm.data.preference import PreferenceDataModule
from lightning_vlm.data.prompt import PromptDataModule
from lightning_vlm.data.sft import SFTDataModule

__all__ = ["PreferenceDataModule", "PromptDataModule", "SFTDataModule", "SyntheticData", "VLMDataModule"]
