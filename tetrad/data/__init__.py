"""Text and chat data: tokenizer, chat encoding, named sources, packing, and the resumable
per-dp-rank loader."""

from tetrad.data.batch import IGNORE_INDEX, Batch, document_positions
from tetrad.data.chat import ChatEncoder, build_chat_encoder
from tetrad.data.loader import TextDataLoader, build_dataloader
from tetrad.data.mixture import format_shares
from tetrad.data.packing import TokenPacker
from tetrad.data.sources import build_text_source
from tetrad.data.tokenizer import Tokenizer, build_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ChatEncoder",
    "TextDataLoader",
    "TokenPacker",
    "Tokenizer",
    "build_chat_encoder",
    "build_dataloader",
    "build_text_source",
    "build_tokenizer",
    "document_positions",
    "format_shares",
]
