"""Text side: a word-level BiGRU encoder and a Hugging Face transformer encoder, both GPO-pooled.

Both take ``tokens (B, L)`` (long, padded with 0 on the right), ``lengths (B,)`` and
``attention_mask (B, L)``, and return :class:`TextOutput` with an L2-normalised ``(B, E)``
embedding. USER uses BERT-base + Linear(768 -> 1024) + GPO (method notes section 2.3); the GRU
encoder is VSE-infinity's / SCAN's word-embedding + BiGRU alternative that needs no pretrained
download.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..config import ModelConfig
from ..errors import ConfigError, DataError
from .pooling import GPO, as_lengths, length_mask, unit_embedding

GLOVE_DIM = 50


@dataclass
class TextOutput:
    """What a text encoder returns.

    Attributes:
        embedding: ``(B, E)`` L2-normalised caption embedding.
        gpo_weights: ``(B, L)`` GPO's weights over the sorted token ranks (zero on padding).
    """

    embedding: torch.Tensor
    gpo_weights: torch.Tensor


def _lengths_from(tokens: torch.Tensor, lengths: Optional[torch.Tensor],
                  attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-row token counts from ``lengths`` or, when absent, from ``attention_mask``."""
    if lengths is None:
        if attention_mask is None:
            raise DataError(None, "batch needs 'lengths' or 'attention_mask' next to 'tokens'")
        lengths = attention_mask.long().sum(1)
    return as_lengths(lengths, tokens.shape[0], tokens.shape[1], tokens.device)


class GRUTextEncoder(nn.Module):
    """``Embedding -> Dropout -> BiGRU (directions averaged) -> GPO over tokens -> L2 norm``.

    Padding never reaches the result: the BiGRU runs on packed sequences (the backward direction
    starts at each caption's last real word) and GPO gives padded positions zero weight, so a
    caption's embedding does not depend on how far the batch is padded.

    With ``glove=True`` the word table is 50 wide (GloVe 6B-50d), initialised from
    :func:`userlab.data.text.load_glove_vectors`, and followed by a trainable
    ``Linear(50, word_dim)`` when ``word_dim != 50``. Otherwise the table is ``word_dim`` wide
    with SCAN's uniform(-0.1, 0.1) init. Row 0 (``<pad>``) is zero either way.

    Args:
        vocab_size: number of word ids ``V``.
        word_dim: width of the word vectors fed to the GRU.
        embed_size: ``E``, hidden width of each GRU direction and of the output.
        glove: initialise the word table from GloVe (needs ``vocab``).
        vocab: the :class:`userlab.data.text.Vocabulary` (only read for GloVe).
        dropout: dropout on the word vectors (DBL's GRU uses 0.4).
        gpo_dim: GPO's positional-encoding and GRU width.
    """

    is_pretrained_text = False

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, glove: bool = False,
                 vocab: Any = None, dropout: float = 0.0, gpo_dim: int = 32):
        super().__init__()
        if vocab_size <= 0:
            raise ConfigError("model.vocab_size",
                              f"must be > 0 for a GRU text encoder, got {vocab_size} "
                              "(it is filled in from the vocabulary)")
        self.embed_size = embed_size
        table_dim = GLOVE_DIM if glove else word_dim
        self.embed = nn.Embedding(vocab_size, table_dim, padding_idx=0)
        self.word_proj = (nn.Linear(GLOVE_DIM, word_dim) if glove and word_dim != GLOVE_DIM
                          else nn.Identity())
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(word_dim, embed_size, num_layers=1, batch_first=True, bidirectional=True)
        self.gpo = GPO(gpo_dim, gpo_dim)
        if glove:
            self._init_from_glove(vocab, vocab_size)
        else:
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def _init_from_glove(self, vocab: Any, vocab_size: int) -> None:
        if vocab is None:
            raise ConfigError("model.glove", "GloVe initialisation needs the word vocabulary")
        if len(vocab) != vocab_size:
            raise ConfigError("model.vocab_size", f"{vocab_size} does not match the vocabulary's "
                                                  f"{len(vocab)} words")
        from ..data.text import load_glove_vectors  # reads the GloVe package only when asked

        vectors, _found = load_glove_vectors(vocab)
        if vectors.shape != (vocab_size, GLOVE_DIM):
            raise DataError(None, f"GloVe table has shape {vectors.shape}, expected "
                                  f"{(vocab_size, GLOVE_DIM)}")
        with torch.no_grad():
            self.embed.weight.copy_(torch.from_numpy(vectors))

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """No transformer backbone here: every parameter trains at the base learning rate."""
        return []

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> TextOutput:
        """Embed ``tokens (B, L)`` whose first ``lengths[b]`` entries are real words."""
        lengths = _lengths_from(tokens, lengths, attention_mask)
        b, length = tokens.shape
        words = self.dropout(self.word_proj(self.embed(tokens)))
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        out = (out[..., :self.embed_size] + out[..., self.embed_size:]) / 2
        pooled, weights = self.gpo(out, lengths)
        return TextOutput(embedding=unit_embedding(pooled), gpo_weights=weights)


class TransformerTextEncoder(nn.Module):
    """A local Hugging Face BERT-family model, ``Linear(hidden -> E)`` per token, GPO, L2 norm.

    The model is read with ``AutoModel.from_pretrained(path, local_files_only=True)``: no hub is
    contacted. :meth:`pretrained_parameters` gives the backbone's parameters so the optimiser can
    train them at a tenth of the base learning rate, as USER does for BERT.

    Args:
        path: folder holding ``config.json`` and the weights (e.g. from ``save_pretrained``).
        embed_size: ``E``.
        gpo_dim: GPO's positional-encoding and GRU width.
    """

    is_pretrained_text = True

    def __init__(self, path: str, embed_size: int, gpo_dim: int = 32):
        super().__init__()
        folder = Path(path).expanduser() if path else None
        if folder is None or not folder.is_dir():
            raise ConfigError("model.transformer_path",
                              f"{str(path)!r} is not a folder; a transformer text encoder needs a "
                              "local Hugging Face model folder (config.json + weights)")
        if not (folder / "config.json").is_file():
            raise ConfigError("model.transformer_path", f"{str(folder)!r} has no config.json")
        from transformers import AutoModel  # heavy import, only for this encoder

        try:
            self.backbone = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError("model.transformer_path",
                              f"could not load a model from {str(folder)!r}: {err}") from None
        self.path = str(folder)
        self.hidden_size = int(self.backbone.config.hidden_size)
        self.proj = nn.Linear(self.hidden_size, embed_size)
        self.gpo = GPO(gpo_dim, gpo_dim)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (trained at ``lr * text_lr_scale``)."""
        return list(self.backbone.parameters())

    def forward(self, tokens: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> TextOutput:
        """Embed ``tokens (B, L)``; real tokens are where ``attention_mask`` is 1 (else ``!= 0``).

        Raises:
            DataError: if the real tokens of a row are not a prefix (GPO ranks positions
                ``0..n-1``, so padding must be on the right).
        """
        mask = (tokens != 0) if attention_mask is None else attention_mask.bool()
        counts = as_lengths(mask.long().sum(1), tokens.shape[0], tokens.shape[1], tokens.device)
        if not torch.equal(mask, length_mask(counts, tokens.shape[1])):
            raise DataError(None, "batch 'attention_mask': real tokens must come first "
                                  "(right padding)")
        hidden = self.backbone(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        pooled, weights = self.gpo(self.proj(hidden), counts)
        return TextOutput(embedding=unit_embedding(pooled), gpo_weights=weights)


def build_text_encoder(cfg: ModelConfig, vocab: Any = None) -> nn.Module:
    """The text encoder ``cfg.text_encoder`` names.

    For ``gru`` the vocabulary size is ``cfg.vocab_size``, or ``len(vocab)`` when that is 0.
    """
    if cfg.text_encoder == "transformer":
        return TransformerTextEncoder(cfg.transformer_path, cfg.embed_size, cfg.gpo_dim)
    if cfg.text_encoder != "gru":
        raise ConfigError("model.text_encoder",
                          f"{cfg.text_encoder!r} is not one of gru, transformer")
    vocab_size = cfg.vocab_size
    if vocab is not None:
        if vocab_size and vocab_size != len(vocab):
            raise ConfigError("model.vocab_size", f"{vocab_size} does not match the vocabulary's "
                                                  f"{len(vocab)} words")
        vocab_size = len(vocab)
    return GRUTextEncoder(vocab_size, cfg.word_dim, cfg.embed_size, glove=cfg.glove, vocab=vocab,
                          dropout=cfg.text_dropout, gpo_dim=cfg.gpo_dim)
