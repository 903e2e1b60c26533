"""Tests for trainer.hashing: the Engram addressing contract (DESIGN.md section 2).

Run from the repository root:
    .venv/bin/python -m pytest tests/test_hashing.py -q

Tokenizers are built in the test (a fixed word-level vocabulary for exact hand-computed
cases, a tiny byte-level BPE trained on a few sentences for realistic ones); nothing is
downloaded. Hash ids are checked against a slow pure-Python loop over positions.
"""

import re
import unicodedata

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.hashing import (CompressedTokenizer, NgramHashMapping, _is_prime,
                             find_next_prime, ngram_hashes, table_sizes)

INT64_MAX = 2**63 - 1

# ---------------------------------------------------------------------------- tokenizers

# id -> token; the expected compressed id of each is worked out by hand in the test below.
WORD_VOCAB = ["<pad>", "The", " the ", "THE", "Café", "cafe", "  \t\n ", "\t", " ",
              "ﬁne", "fine", "ab\ufffd", "Ab", "École", "\u00a0", "x"]


@pytest.fixture(scope="module")
def word_tok():
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(WORD_VOCAB)},
                                     unk_token="<pad>"))
    tok.add_special_tokens(["<PAD>"])  # id 16
    return tok


SENTENCES = [
    "The café is open. THE CAFE IS OPEN!",
    "the  cafe\tis\nopen   today\r\n",
    "Ünïcödé naïve résumé, École, ÉCOLE, école.",
    "¡Hola!  ¿Qué tal?\n\n\tBien.",
    "hello   world Hello World HELLO WORLD",
]


def byte_level(text):
    """The byte-level (GPT-2 alphabet) spelling of `text`, as BPE tokens are stored."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False) \
        .pre_tokenize_str(text)[0][0]


@pytest.fixture(scope="module")
def bpe_tok():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<|bos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    # Tokens whose texts must share or not share a key; stored in byte-level spelling.
    tok.add_tokens([byte_level(t) for t in
                    ["Café", "CAFE", " café ", "ÉCOLE", "école", "  \t\n", "\r\n", "¡"]])
    tok.add_special_tokens(["<PAD>"])
    return tok


def bpe_id(tok, text):
    tid = tok.token_to_id(byte_level(text))
    assert tid is not None, f"{text!r} is not a token"
    return tid


def slow_key(tok, tid):
    """DESIGN.md's key rule with Python's unicodedata/str (equal to `tokenizers` here)."""
    text = tok.decode([tid], skip_special_tokens=False)
    if "\ufffd" in text:
        return tok.id_to_token(tid)
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(c for c in s if unicodedata.category(c) != "Mn").lower()
    s = re.sub(r"[ \t\r\n]+", " ", s)
    s = " " if s == " " else s.strip()
    return s or text


def slow_lookup(tok):
    numbers = {}
    return [numbers.setdefault(slow_key(tok, tid), len(numbers))
            for tid in range(tok.get_vocab_size(with_added_tokens=True))]


class TransformersLike:
    """The slice of a `transformers` tokenizer's API that CompressedTokenizer uses."""

    def __init__(self, tok):
        self._tok = tok

    def __len__(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, tid):
        return self._tok.id_to_token(tid)


# --------------------------------------------------------------------------- compression

def test_compression_hand_computed_word_level(word_tok):
    ct = CompressedTokenizer(word_tok)
    # <pad> The ' the ' THE Café cafe ws \t ' ' ﬁne fine ab� Ab École nbsp x <PAD>
    expected = [0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 7, 3, 8, 0]
    assert ct.lookup_table.dtype == np.int64
    assert ct.lookup_table.tolist() == expected
    assert len(ct) == 9


def test_compression_matches_slow_rule_on_bpe(bpe_tok):
    ct = CompressedTokenizer(bpe_tok)
    assert ct.lookup_table.tolist() == slow_lookup(bpe_tok)
    # First-appearance numbering: each new number is one more than the largest so far.
    lut = ct.lookup_table
    assert lut[0] == 0
    assert np.all(lut[1:] <= np.maximum.accumulate(lut)[:-1] + 1)
    assert len(ct) == lut.max() + 1 == len(np.unique(lut))


def test_compression_bpe_cases(bpe_tok):
    lut = CompressedTokenizer(bpe_tok).lookup_table
    ids = {t: bpe_id(bpe_tok, t) for t in ["Café", "CAFE", " café ", "ÉCOLE", "école",
                                           "  \t\n", "\r\n", " ", "\n", "¡"]}
    assert lut[ids["Café"]] == lut[ids["CAFE"]] == lut[ids[" café "]]
    assert lut[ids["ÉCOLE"]] == lut[ids["école"]] != lut[ids["Café"]]
    assert lut[ids["  \t\n"]] == lut[ids["\r\n"]] == lut[ids[" "]] == lut[ids["\n"]]
    assert lut[bpe_tok.token_to_id("<PAD>")] == lut[bpe_tok.token_to_id("<pad>")]
    # Lone bytes of a UTF-8 sequence decode to U+FFFD: keyed by their raw token string, so
    # 0xC3 ("Ã") and 0xE9 ("é") stay apart from each other and from "e".
    raw_c3, raw_e9 = bpe_tok.token_to_id("Ã"), bpe_tok.token_to_id("é")
    assert "\ufffd" in bpe_tok.decode([raw_c3]) and "\ufffd" in bpe_tok.decode([raw_e9])
    assert len({lut[raw_c3], lut[raw_e9], lut[bpe_tok.token_to_id("e")]}) == 3
    # Raw-string keys share the key space: lone byte 0xA1 is spelled "¡", the text of "¡".
    assert lut[bpe_tok.token_to_id("¡")] == lut[ids["¡"]]


def test_transformers_like_tokenizer_gives_same_lookup(bpe_tok):
    a = CompressedTokenizer(bpe_tok).lookup_table
    b = CompressedTokenizer(TransformersLike(bpe_tok)).lookup_table
    assert np.array_equal(a, b)


def test_compress_passes_negatives_and_rejects_unknown_ids(word_tok):
    ct = CompressedTokenizer(word_tok)
    ids = np.array([[-1, 3, 4, -100], [10, 9, 0, 16]])
    assert ct(ids).tolist() == [[-1, 1, 2, -100], [4, 4, 0, 0]]
    assert np.array_equal(ct.compress(torch.tensor(ids)), ct(ids))
    with pytest.raises(IndexError, match=r"\[17\]"):
        ct(np.array([1, 17]))


# --------------------------------------------------------------------- multipliers, primes

def test_multipliers_recomputed_from_default_rng(bpe_tok):
    m = NgramHashMapping([1000, 2000, 3000], 4, 2, [1, 15], pad_id=0, seed=7, tokenizer=bpe_tok)
    v = m.tokenizer_vocab_size
    assert v == len(m.compressed_tokenizer)
    half_bound = max(1, (INT64_MAX // v) // 2)
    for layer in (1, 15):
        rng = np.random.default_rng(7 + 10007 * layer)
        r = rng.integers(0, half_bound, size=4, dtype=np.int64)
        mult = m.layer_multipliers[layer]
        assert mult.dtype == np.int64 and mult.shape == (4,)
        assert mult.tolist() == [2 * int(x) + 1 for x in r]
        assert all(x % 2 == 1 and 0 < x < 2 * half_bound + 1 for x in mult.tolist())
        # Valid compressed ids never overflow a product; wrapping only concerns negatives.
        assert (v - 1) * max(mult.tolist()) <= INT64_MAX
    assert m.layer_multipliers[1].tolist() != m.layer_multipliers[15].tolist()


def test_multipliers_golden(word_tok):
    # Pinned numpy Generator output (PCG64 + integers): if this changes, tables trained
    # before can no longer be addressed by the reference, so treat a failure as a break.
    m = NgramHashMapping([10, 10], 3, 1, [1, 2], pad_id=0, seed=0, tokenizer=word_tok)
    assert m.tokenizer_vocab_size == 9
    assert {k: v.tolist() for k, v in m.layer_multipliers.items()} == GOLDEN_MULTIPLIERS


GOLDEN_MULTIPLIERS = {1: [843736406823848137, 53288111315402585, 395923983274329303],
                      2: [842364243392531929, 408455079919679463, 249352747664710995]}


def slow_is_prime(n):
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def test_is_prime_against_trial_division_and_pseudoprimes():
    assert [n for n in range(3000) if _is_prime(n)] == [n for n in range(3000)
                                                         if slow_is_prime(n)]
    # Carmichael numbers and strong pseudoprimes to the first prime bases.
    for n in (561, 41041, 3215031751, 2152302898747, 3474749660383, 341550071728321,
              3825123056546413051):
        assert not _is_prime(n), n
    with pytest.raises(ValueError, match="too large"):  # strong pseudoprime to all bases used: refused
        _is_prime(318665857834031151167461)
    for p in (2_147_483_647, 2_305_843_009_213_693_951, 2**61 - 1, 1_000_000_007):
        assert _is_prime(p), p


def test_is_prime_against_sympy():
    sympy = pytest.importorskip("sympy")  # the reference's isprime
    rng = np.random.default_rng(0)
    for n in rng.integers(0, 2**62, size=2000).tolist() + list(range(646_000, 648_000)):
        assert _is_prime(n) == sympy.isprime(n), n


def test_primes_hand_computed(word_tok):
    m = NgramHashMapping([11, 7], 3, 2, [1, 15], pad_id=0, seed=0, tokenizer=word_tok)
    # Layer 1: n=2 from 10 -> 11, 13; n=3 from 6 -> 7, then 11 and 13 are taken -> 17.
    # Layer 15: n=2 from 10 -> 11, 13, 17 taken -> 19, 23; n=3 from 6 -> 29, 31.
    assert m.vocab_size_across_layers == {1: [[11, 13], [7, 17]], 15: [[19, 23], [29, 31]]}
    assert table_sizes(m) == {1: [11, 13, 7, 17], 15: [19, 23, 29, 31]}


def test_primes_ordering_rule_at_paper_scale(word_tok):
    vocab = [129280 * 5, 129280 * 5, 129280 * 3]
    m = NgramHashMapping(vocab, 4, 8, [1, 15, 3], pad_id=0, seed=0, tokenizer=word_tok)
    seen = set()
    for layer in (1, 15, 3):  # configured order, not sorted
        for n, primes in enumerate(m.vocab_size_across_layers[layer], start=2):
            start = vocab[n - 2] - 1
            assert len(primes) == 8
            for p in primes:
                assert p > start and slow_is_prime(p) and p not in seen
                # smallest such prime: nothing in between qualifies
                assert not any(slow_is_prime(c) and c not in seen for c in range(start + 1, p))
                seen.add(p)
                start = p
    flat = [p for sizes in table_sizes(m).values() for p in sizes]
    assert len(flat) == len(set(flat)) == 3 * 3 * 8
    assert find_next_prime(10, {11, 13}) == 17


# -------------------------------------------------------------------------------- hashing

def wrap64(v):
    return (v + 2**63) % 2**64 - 2**63


def slow_hashes(x, multipliers, head_primes, pad):
    """DESIGN.md's hash, one position at a time, in Python integers."""
    out = []
    for row in x:
        out_row = []
        for t in range(len(row)):
            ids_t = []
            for n, primes in enumerate(head_primes, start=2):
                mix = 0
                for k in range(n):
                    tok = row[t - k] if t - k >= 0 else pad
                    mix ^= wrap64(tok * multipliers[k])
                ids_t += [mix % p for p in primes]
            out_row.append(ids_t)
        out.append(out_row)
    return out


def test_hash_hand_computed_small_case():
    x = np.array([[1, 2, 3]])
    got = ngram_hashes(x, np.array([3, 5, 7]), [[11], [13]], pad_id=4)
    # t=0: n2 = 1*3 ^ 4*5 = 3^20 = 23 -> 23%11 = 1;  n3 = 23 ^ 4*7 = 23^28 = 11 -> 11%13 = 11
    # t=1: n2 = 2*3 ^ 1*5 = 6^5 = 3 -> 3;            n3 = 3 ^ 4*7 = 31 -> 31%13 = 5
    # t=2: n2 = 3*3 ^ 2*5 = 9^10 = 3 -> 3;           n3 = 3 ^ 1*7 = 4 -> 4
    assert got.tolist() == [[[1, 11], [3, 5], [3, 4]]]


def test_hash_matches_slow_loop_with_wraparound(bpe_tok):
    m = NgramHashMapping([500, 300, 200], 4, 3, [2, 9], pad_id=bpe_tok.token_to_id("<PAD>"),
                         seed=3, tokenizer=bpe_tok)
    rng = np.random.default_rng(1)
    base_vocab = bpe_tok.get_vocab_size(with_added_tokens=True)
    ids = rng.integers(0, base_vocab, size=(3, 17))
    ids[0, 5] = ids[2, 0] = -1  # negative ids pass through and hash like any value
    # Multipliers over the whole int64 range force products to wrap.
    m.layer_multipliers[9] = rng.integers(-2**63, INT64_MAX, size=4, dtype=np.int64) | 1
    x = m.compressed_tokenizer(ids).tolist()
    assert any(wrap64(t * mk) != t * mk for row in x for t in row
               for mk in m.layer_multipliers[9].tolist())
    got = m.hash(ids)
    assert set(got) == {2, 9}
    for layer in (2, 9):
        expected = slow_hashes(x, m.layer_multipliers[layer].tolist(),
                               m.vocab_size_across_layers[layer], m.pad_id)
        assert got[layer].dtype == np.int64 and got[layer].shape == (3, 17, 9)
        assert got[layer].tolist() == expected
        primes = np.array(table_sizes(m)[layer])
        assert np.all(got[layer] >= 0) and np.all(got[layer] < primes)  # per head


def test_hash_pad_fills_sequence_start(bpe_tok):
    pad = bpe_tok.token_to_id("<pad>")
    m = NgramHashMapping([100, 100], 3, 2, [1], pad_id=pad, seed=0, tokenizer=bpe_tok)
    ids = np.random.default_rng(2).integers(0, 300, size=(2, 9))
    # Positions before the start read the (compressed) pad id, so spelling the pads out
    # explicitly, even as "<PAD>" which compresses to the same id, changes nothing.
    padded = np.concatenate([np.full((2, 2), bpe_tok.token_to_id("<PAD>")), ids], axis=1)
    assert np.array_equal(m.hash(padded)[1][:, 2:], m.hash(ids)[1])
    assert m.raw_pad_id == pad and m.pad_id == m.compressed_tokenizer.lookup_table[pad]


def test_hash_inputs_short_torch_and_bad_shapes(word_tok):
    m = NgramHashMapping([20, 30], 3, 2, [1, 2], pad_id=16, seed=0, tokenizer=word_tok)
    ids = np.array([[1, 5, 9, 2, 15]])
    expected = m.hash(ids)
    got = m.hash(torch.tensor(ids))
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert m.hash(ids[:, :1])[1].shape == (1, 1, 4)  # T shorter than the N-gram
    assert m.hash(ids[:, :0])[2].shape == (1, 0, 4)
    with pytest.raises(ValueError, match="B, T"):
        m.hash(ids[0])
    with pytest.raises(ValueError, match="pad_id"):
        NgramHashMapping([20, 30], 3, 2, [1], pad_id=-1, seed=0, tokenizer=word_tok)
