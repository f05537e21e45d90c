"""Byte-level BPE tokenizer (HF `tokenizers`): train, save, load, stream-decode.

Byte-level means every UTF-8 string round-trips exactly and no input is unknown.
Special tokens: <|bos|> = 0, <|eos|> = 1 (also separates documents), <|pad|> = 2.
There is no fallback: a missing tokenizer file is an error, never random ids.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
TOKENIZER_FILE = "tokenizer.json"


class HMSTTokenizer:
    def __init__(self, tok: Tokenizer):
        self.tok = tok
        for s in SPECIAL_TOKENS:
            if tok.token_to_id(s) is None:
                raise ValueError(f"tokenizer lacks the special token {s}")
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        self.pad_id = tok.token_to_id(PAD)

    # -- construction -------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "HMSTTokenizer":
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {vocab_size} < 259 (256 bytes + 3 specials)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "HMSTTokenizer":
        """`path` is a tokenizer.json or a directory holding one (e.g. a checkpoint)."""
        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer not found: {file}")
        try:
            tok = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises bare Exception on a bad file
            raise ValueError(f"corrupt tokenizer file {file}: {e}") from None
        return cls(tok)

    def save(self, path: str) -> str:
        """Save to `path` (a directory gets tokenizer.json inside). Atomic."""
        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        tmp = file + ".tmp"
        self.tok.save(tmp)
        os.replace(tmp, file)
        return file

    # -- use ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Parallel (Rust threads) encoding of many texts."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token id stands for (0 for special tokens): the denominator
        of bits-per-byte. Byte-level BPE maps one vocabulary character to one byte."""
        lengths = [0] * self.vocab_size
        specials = set(SPECIAL_TOKENS)
        for token, i in self.tok.get_vocab().items():
            lengths[i] = 0 if token in specials else len(token)
        return lengths

    def hash(self) -> str:
        """Stable content hash (first 16 hex of sha256 of the serialised tokenizer)."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


class StreamDecoder:
    """Incremental, UTF-8-safe decoding: `step(id)` returns the new text, or "" while a
    multi-byte character is still incomplete (no U+FFFD mid-character)."""

    def __init__(self, tokenizer: HMSTTokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer.tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, int(token_id)) or ""

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            piece = self.step(i)
            if piece:
                yield piece
