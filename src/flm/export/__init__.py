"""Interoperability: export checkpoints to the Hugging Face format and import them back (`flm export|import hf`)."""

from flm.export.hf import export_hf, import_hf, parse_size

__all__ = ["export_hf", "import_hf", "parse_size"]
