"""A byte-pair-encoding tokenizer trained offline on a corpus' training split, cached by config hash.

Launay et al. 2020 (*Direct feedback alignment scales to modern deep learning tasks and
architectures*, arXiv:2006.12878) tokenise WikiText-103 with a 32k BPE (youtokentome). Here the
Hugging Face ``tokenizers`` BPE trainer does the same offline: a byte-level BPE (every byte is in
the base alphabet, so any text round-trips exactly, and no ``<unk>`` is ever produced) with one
special token, ``<eos>``, appended after every line of the corpus (torchtext's WikiText reader,
which Launay et al. use, ends every line with ``<eos>`` too).

The trained tokenizer is written next to the data as ``<cache_dir>/bpe-<hash>.json``, where the
hash covers everything that decides the result: the tokenizer settings (kind, vocabulary size,
minimum pair frequency, special tokens, the format version of this module) and the sha1 of the
training file. An unchanged config reuses the file; a changed one (another vocabulary size,
another training text) trains and writes a new one. The encoded splits are cached the same way
(``<name>.<split>.<hash>.pt``), so WikiText-103's half-gigabyte training file is encoded once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

EOS = "<eos>"
FORMAT_VERSION = 1
MIN_FREQUENCY = 2

# Written by train_tokenizer, read by the tests: how many tokenizers this process has trained.
TRAINED = {"count": 0}


def file_sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_config(vocab_size: int, train_file: str | Path) -> dict:
    """Everything that decides the trained tokenizer (its cache key)."""
    return {"kind": "bpe-bytelevel", "library": "tokenizers", "vocab_size": int(vocab_size),
            "min_frequency": MIN_FREQUENCY, "special_tokens": [EOS], "format": FORMAT_VERSION,
            "train_sha1": file_sha1(train_file)}


def config_hash(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def corpus_lines(path: str | Path):
    """The lines a tokenizer trains on and the loader encodes: every non-blank line, stripped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def train_tokenizer(train_file: str | Path, vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens (``<eos>`` included) trained on ``train_file``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=MIN_FREQUENCY, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(train_file), trainer=trainer)
    TRAINED["count"] += 1
    return tok


def load_or_train(train_file: str | Path, vocab_size: int, cache_dir: str | Path):
    """``(tokenizer, path, config, config_hash)``: the cached tokenizer of this config, trained and
    written (atomically, so concurrent runs never read half a file) when there is none."""
    from tokenizers import Tokenizer

    config = tokenizer_config(vocab_size, train_file)
    digest = config_hash(config)
    path = Path(cache_dir) / f"bpe-{digest}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path)), path, config, digest
    tok = train_tokenizer(train_file, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    (path.with_suffix(".config.json")).write_text(json.dumps(config, indent=1, sort_keys=True))
    return tok, path, config, digest


def encode_file(tok, path: str | Path) -> list[int]:
    """The token stream of a corpus file: each non-blank line's tokens, then ``<eos>``."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    lines = list(corpus_lines(path))
    for start in range(0, len(lines), 4096):
        for enc in tok.encode_batch(lines[start:start + 4096]):
            ids.extend(enc.ids)
            ids.append(eos)
    return ids
