"""Data layer: precomputed features (:mod:`.precomp`) and captions / tokenizers (:mod:`.text`)."""
from .precomp import (CAPTIONS_PER_IMAGE, CaptionView, ImageView, PrecompDataset, collate_batch,
                      describe, find_precomp_dir, list_splits, write_precomp_split)
from .text import (SPECIAL_TOKENS, HFTokenizer, Vocabulary, WordTokenizer, augment_words,
                   build_vocab, load_glove_vectors, tokenize_words)
