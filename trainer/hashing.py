"""Engram N-gram hashing: the ids that address rows of the Engram tables.

Tables trained with memstore must be readable by DeepSeek's reference demo
(`engram_demo_v1.py` in deepseek-ai/Engram), so this module is a compatibility contract:
for the same tokenizer and configuration it produces bit for bit the reference's compressed
ids, multipliers, table sizes (primes) and hash ids. DESIGN.md section 2 states the
algorithm; the names (`CompressedTokenizer`, `NgramHashMapping`, `vocab_size_across_layers`)
are the reference's.

Pipeline: token ids -> compressed ids (tokens whose text differs only by case, accents or
whitespace share one id) -> for each layer, order n and head, `mix mod prime` where `mix`
XORs the last n compressed ids, each times a per-layer odd multiplier, in wrapping int64.

Relies on:
- numpy for all arithmetic (int64, wrapping multiply, XOR, non-negative `%`) and for the
  multipliers (`numpy.random.default_rng`; its stream is part of the contract);
- the `tokenizers` package for the text normalizer, the same one the reference uses (its
  Unicode lowercasing, accent stripping and whitespace rules differ from Python's `str`
  methods in corner cases, so a Python re-implementation would not be bit-exact);
- a base tokenizer, duck-typed: a `tokenizers.Tokenizer` or a `transformers` tokenizer.
It does not import torch; torch tensors of ids are accepted and copied to numpy.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from tokenizers import Regex, normalizers

# A private-use character stands in for a token that is exactly one space while `Strip`
# runs, so such tokens keep a key of their own instead of falling back to their raw text.
_SENTINEL = "\uE000"
_REPLACEMENT_CHAR = "\uFFFD"
# Multipliers of layer l are drawn from default_rng(seed + _LAYER_SEED_STRIDE * l).
_LAYER_SEED_STRIDE = 10007
# Miller-Rabin with these bases is exact below 3.18e23, the least strong pseudoprime to all
# of them (Sorenson & Webster 2015); far above any int64 table size.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
_MR_EXACT_LIMIT = 318_665_857_834_031_151_167_461


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def _as_int64_array(input_ids: Any) -> np.ndarray:
    """Token ids as an int64 numpy array (may share memory); torch tensors on any device."""
    if hasattr(input_ids, "detach") and hasattr(input_ids, "cpu"):  # a torch.Tensor
        input_ids = input_ids.detach().cpu().numpy()
    return np.asarray(input_ids, dtype=np.int64)


class CompressedTokenizer:
    """Maps base-tokenizer ids to compressed ids: one id per normalized token text.

    `lookup_table[id]` is the compressed id of base id `id`; keys are numbered in order of
    first appearance over ids 0..V-1. A token whose lone decoding contains U+FFFD (a
    partial UTF-8 sequence) is keyed by its raw token string instead.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.normalizer = _normalizer()
        self.lookup_table, self.num_new_token = self._build_lookup_table()

    def __len__(self) -> int:
        return self.num_new_token

    @property
    def base_vocab_size(self) -> int:
        return len(self.lookup_table)

    def _vocab_size(self) -> int:
        # transformers tokenizers: len() counts added tokens; tokenizers.Tokenizer has no len().
        if hasattr(self.tokenizer, "__len__"):
            return len(self.tokenizer)
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _raw_token(self, tid: int) -> str:
        if hasattr(self.tokenizer, "convert_ids_to_tokens"):
            return self.tokenizer.convert_ids_to_tokens(tid)
        return self.tokenizer.id_to_token(tid)

    def _key(self, tid: int) -> str:
        text = self.tokenizer.decode([tid], skip_special_tokens=False)
        if _REPLACEMENT_CHAR in text:
            return self._raw_token(tid)
        norm = self.normalizer.normalize_str(text)
        return norm if norm else text

    def _build_lookup_table(self) -> tuple[np.ndarray, int]:
        key_to_new: dict[str, int] = {}
        # One decode per vocabulary entry, at construction only; batches never loop in Python.
        lookup = np.array(
            [key_to_new.setdefault(self._key(tid), len(key_to_new))
             for tid in range(self._vocab_size())],
            dtype=np.int64,
        )
        return lookup, len(key_to_new)

    def compress(self, input_ids: Any) -> np.ndarray:
        """Compressed ids, same shape, int64. Negative ids (padding markers) pass through."""
        arr = _as_int64_array(input_ids)
        out = arr.copy()
        valid = arr >= 0
        ids = arr[valid]
        too_big = ids >= len(self.lookup_table)
        if too_big.any():
            raise IndexError(
                f"token ids {np.unique(ids[too_big])[:8].tolist()} are outside the base "
                f"vocabulary of {len(self.lookup_table)} ids")
        out[valid] = self.lookup_table[ids]
        return out

    __call__ = compress


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin; gives the same answer as sympy.isprime (the reference's)."""
    if n >= _MR_EXACT_LIMIT:  # a check, not an assert: it must hold under python -O too
        raise ValueError(f"{n} is too large for deterministic Miller-Rabin")
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def find_next_prime(start: int, seen_primes: set[int]) -> int:
    """Smallest prime strictly greater than `start` that is not in `seen_primes`."""
    candidate = start + 1
    while candidate in seen_primes or not _is_prime(candidate):
        candidate += 1
    return candidate


def ngram_hashes(x: np.ndarray, multipliers: np.ndarray, head_primes: Sequence[Sequence[int]],
                 pad_id: int) -> np.ndarray:
    """Hash ids of one layer: (B, T) compressed ids -> (B, T, H), heads ordered by n then head.

    `head_primes[n - 2]` are the table sizes of order n; `multipliers[k]` weighs the token k
    positions back. Positions before the start of a sequence read `pad_id`.
    """
    B, T = x.shape
    n_heads = sum(len(primes) for primes in head_primes)
    out = np.empty((B, T, n_heads), dtype=np.int64)  # (B, T, H)
    mix = np.zeros((B, T), dtype=np.int64)
    shifted = np.empty_like(x)
    head = 0
    # int64 products wrap by design (the reference relies on numpy's silent wrap-around).
    with np.errstate(over="ignore"):
        for k in range(len(head_primes) + 1):  # k = how many positions back
            shifted[:, :k] = pad_id
            shifted[:, k:] = x[:, :T - k] if k < T else x[:, :0]
            np.bitwise_xor(mix, shifted * multipliers[k], out=mix)
            if k == 0:
                continue  # orders start at n = 2: mix now covers tokens t-k .. t
            for prime in head_primes[k - 1]:
                out[:, :, head] = mix % np.int64(prime)  # numpy `%` is non-negative here
                head += 1
    return out


class NgramHashMapping:
    """Hash ids of every Engram layer, plus the multipliers and prime table sizes behind them.

    `tokenizer` is the base tokenizer, or an already built CompressedTokenizer to share one
    lookup table between mappings. `pad_id` is a base token id; after construction
    `pad_id` holds its compressed id (as in the reference) and `raw_pad_id` the base id.
    Unlike the reference, `n_embed_per_ngram` is not taken: hashing does not use it.
    """

    def __init__(self, engram_vocab_size: Sequence[int], max_ngram_size: int,
                 n_head_per_ngram: int, layer_ids: Sequence[int], pad_id: int, seed: int,
                 tokenizer: Any):
        if max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {max_ngram_size}")
        if len(engram_vocab_size) < max_ngram_size - 1:
            raise ValueError(f"engram_vocab_size needs one size per order 2..{max_ngram_size}, "
                             f"got {list(engram_vocab_size)}")
        if n_head_per_ngram < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {n_head_per_ngram}")
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layer_ids must be distinct, got {list(layer_ids)}")
        self.vocab_size_per_ngram = [int(v) for v in engram_vocab_size]
        self.max_ngram_size = int(max_ngram_size)
        self.n_head_per_ngram = int(n_head_per_ngram)
        self.layer_ids = list(layer_ids)
        self.seed = int(seed)

        self.compressed_tokenizer = (tokenizer if isinstance(tokenizer, CompressedTokenizer)
                                     else CompressedTokenizer(tokenizer))
        self.tokenizer_vocab_size = len(self.compressed_tokenizer)
        base_vocab = self.compressed_tokenizer.base_vocab_size
        if not 0 <= pad_id < base_vocab:
            # The reference would index the lookup with it (a negative id silently wraps).
            raise ValueError(f"pad_id must be a base token id in [0, {base_vocab}), got {pad_id}")
        self.raw_pad_id = int(pad_id)
        self.pad_id = int(self.compressed_tokenizer.lookup_table[pad_id])

        self.layer_multipliers = {l: self._multipliers(l) for l in self.layer_ids}
        self.vocab_size_across_layers = self.calculate_vocab_size_across_layers()

    def _multipliers(self, layer_id: int) -> np.ndarray:
        # Bounded so that (compressed id) * multiplier fits in int64 for valid ids.
        half_bound = max(1, (np.iinfo(np.int64).max // self.tokenizer_vocab_size) // 2)
        rng = np.random.default_rng(self.seed + _LAYER_SEED_STRIDE * int(layer_id))
        r = rng.integers(low=0, high=half_bound, size=(self.max_ngram_size,), dtype=np.int64)
        return r * 2 + 1  # odd

    def calculate_vocab_size_across_layers(self) -> dict[int, list[list[int]]]:
        """{layer_id: [[prime per head] per order n]}, every prime distinct over all of them."""
        seen: set[int] = set()
        sizes: dict[int, list[list[int]]] = {}
        for layer_id in self.layer_ids:
            per_order = []
            for n in range(2, self.max_ngram_size + 1):
                start = self.vocab_size_per_ngram[n - 2] - 1
                primes = []
                for _ in range(self.n_head_per_ngram):
                    start = find_next_prime(start, seen)
                    seen.add(start)
                    primes.append(start)
                per_order.append(primes)
            sizes[layer_id] = per_order
        return sizes

    def hash(self, input_ids: Any) -> dict[int, np.ndarray]:
        """(B, T) base token ids (numpy or torch) -> {layer_id: (B, T, H) int64 hash ids}."""
        x = self.compressed_tokenizer(input_ids)
        if x.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(x.shape)}")
        return {l: ngram_hashes(x, self.layer_multipliers[l], self.vocab_size_across_layers[l],
                                self.pad_id)
                for l in self.layer_ids}


def table_sizes(mapping: NgramHashMapping) -> dict[int, list[int]]:
    """{layer_id: [rows of head h]} with heads in hash-output order (n, then head)."""
    return {l: [p for primes in per_order for p in primes]
            for l, per_order in mapping.vocab_size_across_layers.items()}
