"""Language-modelling data: WikiText-103 / WikiText-2 and an embedded English corpus, one loader.

**Files.** Every corpus is read from the original WikiText layout, three plain-text files
``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens`` (Merity et al. 2016, *Pointer
sentinel mixture models*, arXiv:1609.07843): one paragraph or `` = heading = `` per line, blank
lines between. WikiText is looked for in ``<data.root>/wikitext-103`` (what the original
``wikitext-103-v1.zip`` unzips to; ``wikitext-2`` for WikiText-2), then ``<data.root>`` itself.
It is never downloaded: absent files fail with the usual one line (dataset, where it looked, how to
get it; exit status 3), and a table marks the column ``data unavailable``.

**The embedded corpus** (``data.name=fortunes``) is real English text that ``make setup`` installs
from Debian: the ``fortunes`` package (about 2.5 MB of quotations, jokes, definitions and short
prose under ``/usr/share/games/fortunes``). It was picked because it is the largest plain English
text in Debian main that needs no decoder (the KJV Bible package stores a compressed index the
``bible`` program must read; word lists such as ``wamerican`` are not running text). Its ``art``,
``ascii-art`` (pictures) and ``translate-me`` (not English) files are left out. Each fortune (the
text between two ``%`` lines) becomes one line, whitespace collapsed; fortune k of the sorted files
goes to the validation split when k mod 20 = 0, to the test split when k mod 20 = 1, to training
otherwise (90 / 5 / 5 %, deterministic), and the three splits are written in the WikiText format
under ``<data.root>/fortunes`` once, so the one loader serves both. Tables that use it say it is a
stand-in for WikiText-103.

**Tokens.** A byte-level BPE of ``data.vocab_size`` tokens is trained on the training split
(:mod:`bench.data.tokenizer`, cached next to the data with its config hash). A split's token
stream is every non-blank line's tokens followed by ``<eos>``. The stream is cut into
non-overlapping sequences of ``data.seq_len`` + 1 tokens (the input is the first T, the target
the last T, shifted by one), so sample i covers stream[i·T : i·T + T + 1]; the tail that does not
fill a sequence is dropped. Sequences are held in memory as ``(N, T)`` int64 tensors and served by
:class:`~bench.data.loader.InMemoryLoader` like the small image sets: training shuffles sequences
per epoch from (seed, epoch), and under DDP each rank takes its slice of every global batch, so 2
ranks × batch b see what 1 process × batch 2b sees. ``data.train_subset`` keeps the first N
training sequences (small budgets); validation and test are always whole.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig

from bench.data.base import DATASETS, DataUnavailable, InMemoryDataModule, absolute
from bench.data.tokenizer import EOS, config_hash, encode_file, load_or_train

SPLITS = ("train", "valid", "test")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_LEFT_OUT = ("art", "ascii-art", "translate-me")
HOW_WIKITEXT = ("unzip the original {zip} (Merity et al. 2016, the Salesforce WikiText release) into data.root, "
                "so that <data.root>/{folder}/wiki.train.tokens exists")
HOW_FORTUNES = "apt-get install fortunes (make setup does), or put wiki.{train,valid,test}.tokens under <data.root>/fortunes"


def split_files(folder: Path) -> dict[str, Path] | None:
    files = {s: folder / f"wiki.{s}.tokens" for s in SPLITS}
    return files if all(p.is_file() for p in files.values()) else None


def find_wikitext(root: Path, folder: str) -> dict[str, Path] | None:
    for candidate in (root / folder, root):
        found = split_files(candidate)
        if found:
            return found
    return None


def read_fortunes(source: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune of the package's English files, in sorted-file order, one string each."""
    texts: list[str] = []
    for path in sorted(source.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file() or path.name in FORTUNES_LEFT_OUT:
            continue  # .dat indexes, .u8 links, pictures, non-English
        raw = path.read_bytes().decode("utf-8", errors="replace")
        for chunk in re.split(r"^%\s*$", raw, flags=re.M):
            text = " ".join(chunk.split())
            if text:
                texts.append(text)
    return texts


def write_fortunes_corpus(target: Path, source: Path = FORTUNES_DIR) -> dict[str, Path]:
    """Split the fortunes deterministically and write them as wiki.{train,valid,test}.tokens."""
    texts = read_fortunes(source)
    if not texts:
        raise DataUnavailable("fortunes", [absolute(source)], HOW_FORTUNES, reason="no fortune files found")
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for k, text in enumerate(texts):
        parts["valid" if k % 20 == 0 else "test" if k % 20 == 1 else "train"].append(text)
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, lines in parts.items():
        path = target / f"wiki.{split}.tokens"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(" = fortunes = \n\n" + "\n\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
        files[split] = path
    return files


def find_corpus(cfg: DictConfig) -> dict[str, Path]:
    """The three split files of ``cfg.name``, or :class:`DataUnavailable` naming where it looked."""
    root = Path(cfg.root)
    if cfg.name in ("wikitext103", "wikitext2"):
        folder, zipname = ("wikitext-103", "wikitext-103-v1.zip") if cfg.name == "wikitext103" else ("wikitext-2", "wikitext-2-v1.zip")
        found = find_wikitext(root, folder)
        if found is None:
            raise DataUnavailable(cfg.name, [absolute(root / folder), absolute(root)],
                                  HOW_WIKITEXT.format(zip=zipname, folder=folder), reason="no wiki.{train,valid,test}.tokens")
        return found
    if cfg.name == "fortunes":
        target = root / "fortunes"
        found = split_files(target)
        if found is None:
            if not FORTUNES_DIR.is_dir():
                raise DataUnavailable("fortunes", [absolute(target), FORTUNES_DIR], HOW_FORTUNES)
            found = write_fortunes_corpus(target)
        return found
    raise ValueError(f"data.name={cfg.name!r} is not a text corpus")


def token_stream(files: dict[str, Path], vocab_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Every split's token stream (int64) and the tokenizer's record (kind, vocabulary, hash, path).

    The tokenizer and the encoded splits are cached in ``<corpus folder>/.tokenizer-cache``."""
    cache = files["train"].parent / ".tokenizer-cache"
    tok, path, config, digest = load_or_train(files["train"], vocab_size, cache)
    streams = {}
    for split, file in files.items():
        key = config_hash({"tokenizer": digest, "file_sha1": _quick_id(file)})
        cached = cache / f"{file.name}.{key}.pt"
        if cached.is_file():
            streams[split] = torch.load(cached, weights_only=True)
            continue
        ids = torch.tensor(encode_file(tok, file), dtype=torch.long)
        tmp = cached.with_suffix(".pt.tmp")
        torch.save(ids, tmp)
        tmp.replace(cached)
        streams[split] = ids
    record = {"tokenizer": f"{config['library']} {config['kind']}", "vocab_size": tok.get_vocab_size(),
              "tokenizer_hash": digest, "tokenizer_file": str(path), "eos_id": tok.token_to_id(EOS)}
    return streams, record


def _quick_id(path: Path) -> str:
    """Size and modification time: enough to notice a rewritten split file without hashing it."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def sequences(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) pairs: x_i = stream[iT : iT+T], y_i = stream[iT+1 : iT+T+1]."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"a split of {len(stream)} tokens holds no sequence of data.seq_len={seq_len} (+1) tokens")
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1: n * seq_len + 1].view(n, seq_len)
    return x.contiguous(), y.contiguous()


class TextDataModule(InMemoryDataModule):
    """Token sequences of a corpus in memory; ``input_shape = (T,)``, ``num_classes`` = vocabulary."""

    def __init__(self, cfg: DictConfig, seed: int):
        super().__init__(cfg, seed, load=None)  # type: ignore[arg-type]
        self._streams: dict[str, torch.Tensor] | None = None
        self.tokenizer: dict = {}

    def prepare_data(self) -> None:
        if self._streams is None:
            self._streams, self.tokenizer = token_stream(find_corpus(self.cfg), int(self.cfg.vocab_size))

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        self.prepare_data()
        T = int(self.cfg.seq_len)
        x, y = sequences(self._streams["train"], T)
        if self.cfg.train_subset is not None:
            x, y = x[: int(self.cfg.train_subset)], y[: int(self.cfg.train_subset)]
        self.train = (x, y)
        self.val = sequences(self._streams["valid"], T)
        self.test = sequences(self._streams["test"], T)
        self._streams = None
        self.input_shape, self.num_classes = (T,), int(self.tokenizer["vocab_size"])

    def tokens(self, split: str = "train") -> int:
        """Target tokens in a split as served (for tokens/s and 'tokens seen')."""
        return int({"train": self.train, "valid": self.val, "test": self.test}[split][1].numel())


@DATASETS.register("wikitext103")
def wikitext103(cfg: DictConfig, seed: int) -> TextDataModule:
    return TextDataModule(cfg, seed)


@DATASETS.register("wikitext2")
def wikitext2(cfg: DictConfig, seed: int) -> TextDataModule:
    return TextDataModule(cfg, seed)


@DATASETS.register("fortunes")
def fortunes(cfg: DictConfig, seed: int) -> TextDataModule:
    return TextDataModule(cfg, seed)
