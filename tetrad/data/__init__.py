"""Text data: tokenizer, named sources, packing, and the resumable per-dp-rank loader."""

from tetrad.data.loader import TextDataLoader, build_dataloader
from tetrad.data.packing import TokenPacker
from tetrad.data.sources import build_text_source
from tetrad.data.tokenizer import Tokenizer, build_tokenizer

__all__ = [
    "TextDataLoader",
    "TokenPacker",
    "Tokenizer",
    "build_dataloader",
    "build_text_source",
    "build_tokenizer",
]
