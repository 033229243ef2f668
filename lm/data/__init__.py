"""Data: corpora, tokenizers and exactly resumable batches.

  corpus.py      where the text comes from (stdlib, files, globs, .bin) and the train/val split
  tokenizers.py  sentencepiece, byte and char tokenizers; saving and loading them
  cache.py       atomic, content-keyed storage of tokenized corpora and trained tokenizers
  batches.py     pure batch functions of (seed, step), evaluation windows, prefetching
  chat.py        chat templates and JSONL examples: conversations -> ids with a response mask
  examples.py    SFT examples and preference pairs (data.format=sft|preference) and their batches
  pipeline.py    prepare(config, workdir) -> Data, tying the above together
"""

from lm.data.batches import Batch
from lm.data.pipeline import Data
from lm.data.pipeline import prepare
from lm.data.pipeline import tokenizer_vocab_size
from lm.data.tokenizers import ByteTokenizer
from lm.data.tokenizers import CharTokenizer
from lm.data.tokenizers import load_tokenizer
from lm.data.tokenizers import SentencePieceTokenizer
from lm.data.tokenizers import Tokenizer

__all__ = [
    'Batch', 'ByteTokenizer', 'CharTokenizer', 'Data', 'SentencePieceTokenizer', 'Tokenizer',
    'load_tokenizer', 'prepare', 'tokenizer_vocab_size',
]
