"""Tests for trainer.engram: the Engram module and the rows it gets from a memstore.

Run from the repository root:
    .venv/bin/python -m pytest tests/test_engram.py -q

The module is held against a per-branch loop written from the reference demo
(engram_demo_v1.py); EngramRows over InProcessStore against the same tables as plain torch
embeddings trained by torch optimizers; InProcessStore against two real shard processes.
Tokenizers are built in the test; nothing is downloaded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, models

from memstore import InProcessStore, MemStoreClient, OptimizerSpec
from trainer.engram import (Engram, EngramConfig, EngramRows, ShortConv, create_tables, table_name,
                            table_specs)
from trainer.hashing import NgramHashMapping, table_sizes

VOCAB = 32


def word_tokenizer(vocab: int = VOCAB) -> Tokenizer:
    return Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))


def tiny_config(**kw) -> EngramConfig:
    base = dict(engram_vocab_size=[211, 223], max_ngram_size=3, n_embed_per_ngram=8, n_head_per_ngram=2,
                layer_ids=[0, 1], pad_id=0, seed=0, kernel_size=4)
    base.update(kw)
    return EngramConfig(**base)


def mapping_for(cfg: EngramConfig) -> NgramHashMapping:
    return NgramHashMapping(cfg.engram_vocab_size, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.layer_ids,
                            cfg.pad_id, cfg.seed, word_tokenizer())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


# ---------------------------------------------------------------------------- config and tables


def test_table_specs_one_table_per_layer_and_head():
    cfg = tiny_config(table_prefix="run1/")
    mapping = mapping_for(cfg)
    specs = table_specs(cfg, mapping)
    sizes = table_sizes(mapping)
    assert [s.name for s in specs] == [f"run1/engram.l{l}.h{h}" for l in (0, 1) for h in range(4)]
    assert [s.num_rows for s in specs] == sizes[0] + sizes[1]
    assert all(s.dim == 4 for s in specs)  # n_embed_per_ngram / n_head_per_ngram
    assert len({s.seed for s in specs}) == len(specs), "each table needs its own init seed"
    assert all(s.optimizer == OptimizerSpec("adam", weight_decay=0.0) for s in specs)
    assert cfg.engram_hidden_size == 16 and cfg.num_heads == 4


def test_config_rejects_bad_head_split():
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(n_embed_per_ngram=10, n_head_per_ngram=3)


# ---------------------------------------------------------------------------- the module


def reference_forward(module: Engram, hidden: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The demo's Engram.forward and ShortConv.forward as written there: a loop over
    branches, nn.RMSNorm modules, symmetric conv padding cut to T."""
    D = hidden.shape[-1]
    gates = []
    for m in range(module.hc_mult):
        key = module.norm1[m](module.key_projs[m](e))
        query = module.norm2[m](hidden[:, :, m, :])
        g = (key * query).sum(dim=-1) / math.sqrt(D)
        g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
        gates.append(g.sigmoid().unsqueeze(-1))
    value = torch.stack(gates, dim=2) * module.value_proj(e).unsqueeze(2)
    sc = module.short_conv
    B, T, G, C = value.shape
    x = torch.cat([sc.norms[i](value[:, :, i, :]) for i in range(G)], dim=-1).transpose(1, 2)
    conv = sc.conv
    y = F.conv1d(x, conv.weight, None, padding=(conv.kernel_size[0] - 1) * conv.dilation[0],
                 dilation=conv.dilation, groups=conv.groups)[..., :T]
    return value + F.silu(y).transpose(1, 2).reshape(B, T, G, C)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_engram_shapes(M):
    cfg = tiny_config()
    module = Engram(cfg, layer_id=0, hidden_size=12, hc_mult=M)
    out = module(torch.randn(2, 7, M, 12), torch.randn(2, 7, cfg.engram_hidden_size))
    assert out.shape == (2, 7, M, 12)


def test_zero_initialised_conv_adds_nothing():
    cfg = tiny_config()
    torch.manual_seed(0)
    module = Engram(cfg, 0, hidden_size=12, hc_mult=2)
    hidden, e = torch.randn(2, 9, 2, 12), torch.randn(2, 9, cfg.engram_hidden_size)
    y = module.gates(hidden, e) * module.value_proj(e).unsqueeze(2)
    assert torch.count_nonzero(module.short_conv.conv.weight) == 0
    assert torch.equal(module(hidden, e), y)  # SiLU(0) == 0: exactly y


def test_module_matches_reference_loop_with_trained_conv():
    cfg = tiny_config()
    torch.manual_seed(1)
    module = Engram(cfg, 0, hidden_size=12, hc_mult=3)
    with torch.no_grad():  # move every parameter off its init so nothing is trivially 0 or 1
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hidden, e = torch.randn(2, 11, 3, 12), torch.randn(2, 11, cfg.engram_hidden_size)
    got, want = module(hidden, e), reference_forward(module, hidden, e)
    # Fused vs per-branch normalisation and matmul: float32 rounding only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{m}\n{max_diff(got, want)}")


def test_gate_formula_by_hand():
    # E = 2, D = 2, M = 2. Branch 0's key projection is I, branch 1's is -I (no bias); all
    # RMSNorm weights are 1. With e = [1, 0] the normalised keys are +-[sqrt2, 0].
    cfg = EngramConfig(engram_vocab_size=[5], max_ngram_size=2, n_embed_per_ngram=2, n_head_per_ngram=1,
                       layer_ids=[0], pad_id=0)
    module = Engram(cfg, 0, hidden_size=2, hc_mult=2)
    with torch.no_grad():
        module.key_projs[0].weight.copy_(torch.eye(2))
        module.key_projs[1].weight.copy_(-torch.eye(2))
        for p in (module.key_projs[0].bias, module.key_projs[1].bias):
            p.zero_()
    e = [1.0, 0.0]
    hidden = [[[1.0, 1.0], [1.0, 1.0]],  # s = +1 and -1
              [[0.0, 1.0], [0.0, 3.0]],  # orthogonal to the keys: s = 0, g = 1/2
              [[-2.0, -2.0], [5.0, 5.0]],  # s = -1 for both
              [[1.0, 0.02], [0.02, 1.0]]]  # |s| well below 1: the sqrt matters
    g = module.gates(torch.tensor([hidden]), torch.tensor([[e] * 4]))[0, :, :, 0]  # (T=4, M=2)

    eps = torch.finfo(torch.float32).eps  # nn.RMSNorm's default, as the demo's norm1/norm2

    def rms_norm(v):
        r = math.sqrt(sum(x * x for x in v) / len(v) + eps)
        return [x / r for x in v]

    def gate(key, h):
        s = sum(a * b for a, b in zip(rms_norm(key), rms_norm(h))) / math.sqrt(2)
        s = math.copysign(math.sqrt(max(abs(s), 1e-6)), s) if s != 0 else 0.0  # sign(0) = 0
        return 1 / (1 + math.exp(-s))

    keys = [[1.0, 0.0], [-1.0, 0.0]]
    want = torch.tensor([[gate(keys[m], hidden[t][m]) for m in range(2)] for t in range(4)])
    torch.testing.assert_close(g, want, rtol=0, atol=1e-6)
    sig = lambda s: 1 / (1 + math.exp(-s))  # noqa: E731
    assert torch.allclose(g[:3], torch.tensor([[sig(1), sig(-1)], [0.5, 0.5], [sig(-1), sig(-1)]]), atol=1e-6)


def test_short_conv_is_causal_and_dilated():
    torch.manual_seed(2)
    conv = ShortConv(hidden_size=4, kernel_size=4, dilation=3, hc_mult=2)
    with torch.no_grad():
        conv.conv.weight.normal_()
    x = torch.randn(1, 20, 2, 4)
    base = conv(x)
    x2 = x.clone()
    x2[:, 10] += 1.0
    changed = (conv(x2) - base).abs().amax(dim=(0, 2, 3)) > 0  # (T,)
    # Position 10 reaches 10, 13, 16, 19 (dilation 3, kernel 4) and nothing else.
    assert changed.nonzero().flatten().tolist() == [10, 13, 16, 19]


def test_gradient_reaches_rows_and_projections():
    cfg = tiny_config()
    torch.manual_seed(3)
    module = Engram(cfg, 0, hidden_size=12, hc_mult=2)
    e = torch.randn(2, 5, cfg.engram_hidden_size, requires_grad=True)
    module(torch.randn(2, 5, 2, 12), e).square().sum().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    for p in [module.value_proj.weight, *(k.weight for k in module.key_projs)]:
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- rows from the store


def hashed_batch(mapping: NgramHashMapping, seed: int, B: int = 3, T: int = 10) -> dict[int, np.ndarray]:
    """Tokens from a few ids only, so N-grams (and hence keys) repeat within the batch."""
    ids = np.random.default_rng(seed).integers(0, 4, size=(B, T))
    return mapping.hash(ids)


def train_engram_from_store(store, cfg, mapping, batches, lr):
    """fetch -> Engram forward -> backward -> push, for each batch; returns the losses.
    Only the tables learn (the module is fixed), so the rows are all that differs."""
    torch.manual_seed(4)
    module = Engram(cfg, 0, hidden_size=6, hc_mult=2)
    create_tables(store, cfg, mapping)
    rows = {l: EngramRows(store, cfg, l) for l in cfg.layer_ids}
    losses = []
    for step, hashes in enumerate(batches):
        g = torch.Generator().manual_seed(step)
        hidden, target = torch.randn(3, 10, 2, 6, generator=g), torch.randn(3, 10, 2, 6, generator=g)
        loss = sum(F.mse_loss(module(hidden, rows[l].fetch(hashes[l])), target) for l in cfg.layer_ids)
        module.zero_grad()
        loss.backward()
        for r in rows.values():
            r.push(lr)
        losses.append(loss.item())
    return losses


def train_engram_reference(store, cfg, mapping, batches, make_optimizer):
    """The same steps on plain nn.Embedding tables (one per head) that start from the
    store's initial rows and are trained by a torch optimizer."""
    torch.manual_seed(4)
    module = Engram(cfg, 0, hidden_size=6, hc_mult=2)
    tables = {}
    for spec in create_tables(store, cfg, mapping):
        emb = nn.Embedding(spec.num_rows, spec.dim)
        with torch.no_grad():
            emb.weight.copy_(store.lookup(spec.name, np.arange(spec.num_rows), as_tensor=True))
        tables[spec.name] = emb
    opt = make_optimizer([t.weight for t in tables.values()])
    losses = []
    for step, hashes in enumerate(batches):
        g = torch.Generator().manual_seed(step)
        hidden, target = torch.randn(3, 10, 2, 6, generator=g), torch.randn(3, 10, 2, 6, generator=g)
        loss = 0
        for l in cfg.layer_ids:
            ids = torch.from_numpy(hashes[l])
            e = torch.cat([tables[table_name(cfg, l, h)](ids[..., h]) for h in range(cfg.num_heads)], dim=-1)
            loss = loss + F.mse_loss(module(hidden, e), target)
        opt.zero_grad()
        module.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {name: t.weight.detach() for name, t in tables.items()}


def store_rows(store, cfg, mapping):
    return {s.name: store.lookup(s.name, np.arange(s.num_rows), as_tensor=True) for s in table_specs(cfg, mapping)}


def test_rows_match_torch_embedding_with_sgd():
    cfg = tiny_config(table_optimizer=OptimizerSpec("sgd"), table_lr_multiplier=5.0)
    mapping = mapping_for(cfg)
    batches = [hashed_batch(mapping, s) for s in range(5)]
    lr = 0.1
    with InProcessStore() as store:
        losses = train_engram_from_store(store, cfg, mapping, batches, lr)
        got = store_rows(store, cfg, mapping)
    with InProcessStore() as fresh:
        ref_losses, want = train_engram_reference(fresh, cfg, mapping, batches,
                                                  lambda ps: torch.optim.SGD(ps, lr=lr * 5.0))
    # Exact: duplicate keys' gradients are summed in batch order both by the store's
    # index_add_ and by embedding backward on CPU, and the store's SGD is torch's p - lr * g.
    assert losses == ref_losses
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: {max_diff(got[name], want[name])}"
    with InProcessStore() as untrained:
        create_tables(untrained, cfg, mapping)
        initial = store_rows(untrained, cfg, mapping)
    assert all(not torch.equal(got[n], initial[n]) for n in got), "every table should have learned"


def test_rows_match_torch_adam_when_every_step_touches_the_same_rows():
    # Lazy per-row Adam equals dense Adam when every row that ever gets a gradient gets one
    # at every step (untouched rows: zero moments, zero update) -- so: the same batch 4 times.
    cfg = tiny_config(table_lr_multiplier=5.0)
    mapping = mapping_for(cfg)
    batches = [hashed_batch(mapping, 0)] * 4
    lr = 1e-3
    with InProcessStore() as store:
        losses = train_engram_from_store(store, cfg, mapping, batches, lr)
        got = store_rows(store, cfg, mapping)
    with InProcessStore() as fresh:
        ref_losses, want = train_engram_reference(
            fresh, cfg, mapping, batches, lambda ps: torch.optim.Adam(ps, lr=lr * 5.0, foreach=False))
    # Exact too: the store's Adam follows torch Adam's (single-tensor) operation order.
    assert losses == ref_losses
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: {max_diff(got[name], want[name])}"


def test_in_process_and_two_shards_train_bit_identically(shards_2):
    cfg = tiny_config(table_prefix="engram-test/")
    mapping = mapping_for(cfg)
    batches = [hashed_batch(mapping, s) for s in range(4)]
    with InProcessStore() as local:
        local_losses = train_engram_from_store(local, cfg, mapping, batches, lr=1e-2)
        local_rows = store_rows(local, cfg, mapping)
    with MemStoreClient(shards_2.addresses) as client:
        remote_losses = train_engram_from_store(client, cfg, mapping, batches, lr=1e-2)
        remote_rows = store_rows(client, cfg, mapping)
        for spec in table_specs(cfg, mapping):
            client.drop_table(spec.name)
    assert local_losses == remote_losses
    for name in local_rows:
        got, want = remote_rows[name], local_rows[name]
        assert torch.equal(got, want), f"{name}: {max_diff(got, want)}"


def test_fetch_returns_a_leaf_and_accepts_prefetched_rows():
    cfg = tiny_config()
    mapping = mapping_for(cfg)
    hashes = hashed_batch(mapping, 0)[0]
    with InProcessStore() as store:
        create_tables(store, cfg, mapping)
        rows = EngramRows(store, cfg, 0)
        e = rows.fetch(hashes)
        assert e.is_leaf and e.requires_grad and e.shape == (3, 10, cfg.engram_hidden_size)
        rows.discard()
        prefetched = rows.issue(hashes)
        prefetched[table_name(cfg, 0, 1)] = prefetched[table_name(cfg, 0, 1)].result()  # a tensor works too
        del prefetched[table_name(cfg, 0, 3)]  # and a missing head is looked up now
        assert torch.equal(rows.fetch(hashes, prefetched=prefetched), e)


def test_push_and_fetch_misuse_is_refused():
    cfg = tiny_config()
    mapping = mapping_for(cfg)
    hashes = hashed_batch(mapping, 0)[1]
    with InProcessStore() as store:
        create_tables(store, cfg, mapping)
        rows = EngramRows(store, cfg, 1)
        with pytest.raises(RuntimeError, match="without a fetch"):
            rows.push(0.1)
        rows.fetch(hashes)
        with pytest.raises(RuntimeError, match="before push"):
            rows.fetch(hashes)
        with pytest.raises(RuntimeError, match="no gradient"):
            rows.push(0.1)
        with pytest.raises(ValueError, match="hash_ids"):
            EngramRows(store, cfg, 1).fetch(hashes[..., :2])
