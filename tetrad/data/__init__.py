"""Text and chat data: tokenizer, chat encoding, named sources, packing, and the resumable
per-dp-rank loader.

The names below are imported from their modules on first use (PEP 562), so that importing one
light module of this package (``tetrad train --nproc``'s launcher checks the local files with
``tetrad.data.sources``) does not import torch and ``datasets`` through the loader."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tetrad.data.batch import IGNORE_INDEX, Batch, document_positions
    from tetrad.data.chat import ChatEncoder, build_chat_encoder
    from tetrad.data.loader import TextDataLoader, build_dataloader
    from tetrad.data.mixture import format_shares
    from tetrad.data.packing import TokenPacker
    from tetrad.data.sources import build_text_source
    from tetrad.data.tokenizer import Tokenizer, build_tokenizer

# Where each exported name lives.
_MODULES = {
    "IGNORE_INDEX": "batch",
    "Batch": "batch",
    "document_positions": "batch",
    "ChatEncoder": "chat",
    "build_chat_encoder": "chat",
    "TextDataLoader": "loader",
    "build_dataloader": "loader",
    "format_shares": "mixture",
    "TokenPacker": "packing",
    "build_text_source": "sources",
    "Tokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
}

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


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
