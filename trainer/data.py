"""Training data: a corpus, a byte-level BPE tokenizer trained on it, and a reproducible sampler.

- Corpus. With no path, the Python standard library's own `.py` files (nothing to download):
  every file under `sysconfig.get_paths()["stdlib"]` except site-/dist-packages, in sorted
  order of relative path, read until `max_bytes` of text. A path may be a text file, a folder
  (recursively *.txt, *.md, *.py, *.jsonl, sorted) or a JSONL file (one document per line, in
  its "text" field). A text file is one document; a JSONL line is one.
- Tokenizer. A byte-level BPE (Hugging Face `tokenizers`; GPT-2's byte alphabet, so any text
  encodes) with `vocab_size` ids, `<|pad|>` = 0 and `<|endoftext|>` = 1 first.
- Cache. The tokenizer and the token stream (`tokens.npy`: documents each followed by
  `<|endoftext|>`; `doc_starts.npy`) live in `cache_dir/data/<key>/`, keyed by a hash of the
  files read (path, size, mtime), max_bytes and vocab_size; a second run loads them.
- Split. The held-out split is the documents after the first document boundary at which at
  least `1 - heldout_fraction` of the tokens lie before it (about the last 5 % of the tokens,
  never sharing a document with training); a corpus of one document is cut inside it.
- Sampler. `batch(split, B, T, seed, step)` draws B windows of T + 1 tokens at positions fixed
  by numpy's `default_rng([seed, split, step])`: the stream is a pure function of (seed, step),
  so a resumed run continues it exactly.

Relies on numpy, torch and `tokenizers`; no store, no model.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN]  # ids 0 and 1
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
SPLITS = {"train": 0, "heldout": 1}  # the split's word in the sampler's seed
_CACHE_FORMAT = 1  # bump when the cached files change meaning


@dataclass
class DataConfig:
    corpus: str | None = None  # None: the standard library's .py files
    max_bytes: int = 8 << 20  # text read from the corpus, at most
    vocab_size: int = 4096
    cache_dir: str = "~/.cache/memstore"
    heldout_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must exceed the 256 bytes and {len(SPECIAL_TOKENS)} special "
                             f"tokens, got {self.vocab_size}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")


# ---------------------------------------------------------------------------- the corpus


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def corpus_files(corpus: str | None) -> list[Path]:
    """The files of a corpus, in reading order."""
    if corpus is None:
        return stdlib_files()
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"corpus folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if path.is_file():
        return [path]
    raise ValueError(f"corpus {path} is neither a file nor a folder")


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: a JSONL corpus needs one object with a \"text\" field per line") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: \"text\" must be a string, got {type(text).__name__}")
            yield text


def read_documents(files: list[Path], max_bytes: int) -> tuple[list[str], list[Path]]:
    """Documents in reading order, up to max_bytes of UTF-8 text (the last one cut), and the
    files they came from. Undecodable bytes become U+FFFD."""
    docs: list[str] = []
    used: list[Path] = []
    budget = max_bytes
    for path in files:
        if budget <= 0:
            break
        used.append(path)
        texts = (_jsonl_documents(path) if path.suffix == ".jsonl"
                 else [path.read_bytes()[:budget].decode("utf-8", errors="replace")])
        for text in texts:
            size = len(text.encode("utf-8"))
            if size > budget:
                text = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
                size = budget
            if text:
                docs.append(text)
            budget -= size
            if budget <= 0:
                break
    if not docs:
        raise ValueError(f"the corpus ({len(files)} files) holds no text")
    return docs, used


def _files_to_read(files: list[Path], max_bytes: int) -> list[Path]:
    """The prefix of `files` that reading max_bytes touches, from their sizes alone."""
    total, out = 0, []
    for p in files:
        if total >= max_bytes:
            break
        out.append(p)
        total += p.stat().st_size
    return out


def cache_key(cfg: DataConfig, files: list[Path]) -> str:
    """A hash of what the tokenizer and tokens depend on: files read (path, size, mtime)."""
    stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    doc = {"format": _CACHE_FORMAT, "files": stats, "max_bytes": cfg.max_bytes,
           "vocab_size": cfg.vocab_size, "special_tokens": SPECIAL_TOKENS}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the special tokens first (pad = 0, end of text = 1)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def tokenizer_digest(tok: Tokenizer) -> str:
    """Identifies a tokenizer by its serialised form (a checkpoint records it)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:20]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    _atomic_write(path, write)


# ---------------------------------------------------------------------------- the data set


@dataclass
class TokenData:
    """A tokenised corpus: `tokens` (N,) ids, documents at `doc_starts`; train = tokens[:split]."""

    tokenizer: Tokenizer
    tokens: np.ndarray
    doc_starts: np.ndarray
    split_at: int
    directory: Path  # the cache entry
    cache_hit: bool  # the tokenizer and tokens were loaded, not built
    num_files: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_to_id(PAD_TOKEN)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(EOS_TOKEN)

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {name!r}")
        return self.tokens[:self.split_at] if name == "train" else self.tokens[self.split_at:]

    def batch(self, split: str, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets), int64 (B, T): B windows of `split`, fixed by (seed, step)."""
        tokens = self.split(split)
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             f"use a larger corpus or a shorter sequence")
        rng = np.random.default_rng([seed, SPLITS[split], step])
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # (B,)
        window = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def batches(self, split: str, batch_size: int, seq_len: int, seed: int,
                start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """batch(...) for steps start_step, start_step + 1, ... (endless)."""
        step = start_step
        while True:
            yield self.batch(split, batch_size, seq_len, seed, step)
            step += 1


def _split_point(doc_starts: np.ndarray, n_tokens: int, heldout_fraction: float) -> int:
    target = int(np.ceil(n_tokens * (1.0 - heldout_fraction)))
    later = doc_starts[doc_starts >= target]
    if len(later):
        return int(later[0])
    return min(target, n_tokens - 1)  # no boundary after the target: cut inside the last document


def load_data(cfg: DataConfig) -> TokenData:
    """The tokenised corpus of `cfg`, from the cache when it holds it, else built and cached."""
    all_files = corpus_files(cfg.corpus)
    files = _files_to_read(all_files, cfg.max_bytes)
    directory = Path(cfg.cache_dir).expanduser() / "data" / cache_key(cfg, files)
    paths = {name: directory / name for name in ("tokenizer.json", "tokens.npy", "doc_starts.npy")}
    hit = all(p.exists() for p in paths.values())
    if hit:
        tok = Tokenizer.from_file(str(paths["tokenizer.json"]))
        tokens = np.load(paths["tokens.npy"])
        doc_starts = np.load(paths["doc_starts.npy"])
    else:
        docs, _ = read_documents(files, cfg.max_bytes)
        tok = train_tokenizer(docs, cfg.vocab_size)
        eos = tok.token_to_id(EOS_TOKEN)
        encoded = [e.ids + [eos] for e in tok.encode_batch(docs)]
        lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        dtype = np.uint16 if tok.get_vocab_size(with_added_tokens=True) <= 1 << 16 else np.int32
        tokens = np.fromiter((t for ids in encoded for t in ids), dtype=dtype, count=int(lengths.sum()))
        directory.mkdir(parents=True, exist_ok=True)
        _save_npy(paths["tokens.npy"], tokens)
        _save_npy(paths["doc_starts.npy"], doc_starts)
        _atomic_write(paths["tokenizer.json"], tok.save)  # last: its presence marks a whole entry
        (directory / "files.txt").write_text("".join(f"{p}\n" for p in files))
    split_at = _split_point(doc_starts, len(tokens), cfg.heldout_fraction)
    return TokenData(tokenizer=tok, tokens=tokens, doc_starts=doc_starts, split_at=split_at,
                     directory=directory, cache_hit=hit, num_files=len(files))
