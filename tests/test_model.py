"""Tests for trainer.model: the MoE + Engram + hyper-connection language model.

Run from the repository root:
    .venv/bin/python -m pytest tests/test_model.py -q

Engram rows come from an InProcessStore through EngramRows, as in training; the tokenizer is
a word-level one built in the test (nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models

from memstore import InProcessStore
from trainer.engram import EngramConfig, EngramRows, create_tables, table_specs
from trainer.hashing import NgramHashMapping
from trainer.model import MoE, Model, ModelConfig, count_params

VOCAB = 32


def tiny_engram(**kw) -> EngramConfig:
    base = dict(engram_vocab_size=[211, 223], max_ngram_size=3, n_embed_per_ngram=8, n_head_per_ngram=2,
                layer_ids=[1], pad_id=0, seed=0)
    base.update(kw)
    return EngramConfig(**base)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, seq_len=16, hc_mult=1, moe=True,
                n_shared_experts=1, n_routed_experts=4, top_k=2, d_expert=16, d_ff=64, engram=None)
    base.update(kw)
    return ModelConfig(**base)


class EngramSource:
    """Hashing + an in-process store + EngramRows per layer: what a training loop wires up."""

    def __init__(self, cfg: EngramConfig):
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
        self.mapping = NgramHashMapping(cfg.engram_vocab_size, cfg.max_ngram_size, cfg.n_head_per_ngram,
                                        cfg.layer_ids, cfg.pad_id, cfg.seed, tok)
        self.store = InProcessStore()
        create_tables(self.store, cfg, self.mapping)
        self.rows = {l: EngramRows(self.store, cfg, l) for l in cfg.layer_ids}

    def fetch(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        hashes = self.mapping.hash(input_ids)
        return {l: r.fetch(hashes[l]) for l, r in self.rows.items()}

    def discard(self) -> None:
        for r in self.rows.values():
            r.discard()

    def push(self, lr: float) -> None:
        for r in self.rows.values():
            r.push(lr)


def batch(seed: int = 0, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("with_engram", [True, False])
def test_forward_shapes(M, moe, with_engram):
    cfg = tiny_config(hc_mult=M, moe=moe, engram=tiny_engram() if with_engram else None)
    torch.manual_seed(0)
    model = Model(cfg)
    ids = batch()
    rows = EngramSource(cfg.engram).fetch(ids) if with_engram else None
    logits = model(ids, rows)
    assert logits.shape == (2, 12, VOCAB)
    assert torch.isfinite(logits).all()
    assert model.engram_layer_ids == ([1] if with_engram else [])
    assert len(model.moe_layers) == (2 if moe else 0)


def test_engram_rows_must_match_the_engram_layers():
    cfg = tiny_config(engram=tiny_engram())
    model = Model(cfg)
    with pytest.raises(ValueError, match="engram_rows"):
        model(batch())
    with pytest.raises(ValueError, match="hc_mult"):
        tiny_config(hc_mult=2, engram=tiny_engram(hc_mult=4))


@pytest.mark.parametrize("M", [1, 2])
def test_causal(M):
    cfg = tiny_config(hc_mult=M, engram=tiny_engram(layer_ids=[0, 1]))
    torch.manual_seed(1)
    model = Model(cfg)
    source = EngramSource(cfg.engram)
    ids = batch(2)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 5) % VOCAB
    with torch.no_grad():
        a = model(ids, source.fetch(ids))
        source.discard()
        b = model(changed, source.fetch(changed))
        source.discard()
    # Positions before 7 see the same tokens (N-gram hashes look back only); the MoE packs
    # tokens differently, so allow float32 rounding.
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
    assert (a[:, 7] - b[:, 7]).abs().max() > 1e-3


@pytest.mark.parametrize("M,with_engram", [(1, False), (2, True)])
def test_loss_decreases_on_a_repeated_sequence(M, with_engram):
    cfg = tiny_config(hc_mult=M, engram=tiny_engram(layer_ids=[0]) if with_engram else None)
    torch.manual_seed(2)
    model = Model(cfg)
    source = EngramSource(cfg.engram) if with_engram else None
    seq = batch(3, B=4, T=13)
    ids, targets = seq[:, :-1], seq[:, 1:]
    lr = 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(30):
        rows = source.fetch(ids) if source else None
        loss = model.loss(ids, targets, rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if source:
            source.push(lr)
        model.update_router_biases()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------- MoE routing


def naive_moe(moe: MoE, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed experts token by token, slot by slot."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            h = F.silu(x[n] @ moe.w1[e]) * (x[n] @ moe.w3[e])
            out[n] += weights[n, j] * (h @ moe.w2[e])
    return out


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_every_token_gets_top_k_distinct_experts_and_dispatch_is_exact(score):
    cfg = tiny_config(n_routed_experts=6, top_k=3, router_score=score)
    torch.manual_seed(3)
    moe = Model(cfg).blocks[0].ffn
    x = torch.randn(40, cfg.d_model)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(6))  # the bias must change choices, not weights
    idx, weights = moe.route(x)
    assert idx.shape == (40, 3)
    assert all(len(set(row.tolist())) == 3 for row in idx)
    scores = moe.router(x).sigmoid() if score == "sigmoid" else moe.router(x).softmax(-1)
    want_idx = torch.topk(scores + moe.expert_bias, 3).indices
    assert torch.equal(idx, want_idx)
    want_w = scores.gather(1, idx)
    if score == "sigmoid":
        want_w = want_w / want_w.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, want_w)
    torch.testing.assert_close(moe.experts(x, idx, weights), naive_moe(moe, x, idx, weights), rtol=1e-5, atol=1e-6)
    moe.train()
    moe(x.view(4, 10, -1))
    assert moe.last_tokens_per_expert.sum().item() == 40 * 3
    assert torch.equal(moe.last_tokens_per_expert, torch.bincount(idx.flatten(), minlength=6).float())


def test_bias_update_moves_load_toward_balance():
    cfg = tiny_config(n_routed_experts=8, top_k=2, bias_update_rate=0.01)
    torch.manual_seed(4)
    moe = Model(cfg).blocks[0].ffn.train()
    # Skewed input: every token leans towards the router rows of experts 0 and 1 (varied
    # enough that a bias step moves some tokens, not all of them at once).
    w = moe.router.weight.detach()
    direction = (w[0] + w[1]) / ((w[0] + w[1]).norm() * w[0].norm())
    x = torch.randn(4, 64, cfg.d_model) + 2.0 * direction

    def imbalance() -> float:  # max load / mean load; 1 is perfect balance
        with torch.no_grad():
            moe(x)
        load = moe.last_tokens_per_expert
        return (load.max() / load.mean()).item()

    before = imbalance()
    moe.tokens_per_expert.zero_()
    for _ in range(200):
        with torch.no_grad():
            moe(x)
        moe.update_bias()
    after = imbalance()
    assert before > 3.0, before  # the input really is skewed
    assert after < 0.5 * before, (before, after)
    assert moe.expert_bias[:2].max() < 0 < moe.expert_bias[2:].min() + 0.05  # overloaded went down


def test_router_counts_only_in_training_and_reset_on_update():
    cfg = tiny_config()
    model = Model(cfg).eval()
    with torch.no_grad():
        model(batch())
    moe = model.moe_layers[0]
    assert moe.tokens_per_expert.sum() == 0 and moe.last_tokens_per_expert.sum() == 24 * cfg.top_k
    model.train()
    with torch.no_grad():
        model(batch())
    assert moe.tokens_per_expert.sum() == 24 * cfg.top_k
    assert {l: s.sum().item() for l, s in model.routing_stats().items()} == {0: 48, 1: 48}
    model.update_router_biases()
    assert moe.tokens_per_expert.sum() == 0 and moe.expert_bias.abs().sum() > 0


# ---------------------------------------------------------------------------- hyper-connections


def test_plain_residual_has_no_mixing_parameters():
    names = [n for n, _ in Model(tiny_config(hc_mult=1)).named_parameters()]
    assert not any("_hc." in n for n in names)
    names = [n for n, _ in Model(tiny_config(hc_mult=3)).named_parameters()]
    assert {n.rsplit(".", 1)[1] for n in names if "_hc." in n} == {"width_in", "width_res", "depth"}


def test_hyper_connections_start_as_copies_and_learn_to_mix():
    torch.manual_seed(5)
    wide = Model(tiny_config(hc_mult=2))
    narrow = Model(tiny_config(hc_mult=1))
    backbone = {k: v for k, v in wide.state_dict().items() if "_hc." not in k}
    narrow.load_state_dict(backbone)
    ids = batch(6)
    # At init every branch carries what the plain residual stream carries.
    def last_hidden(model: Model) -> torch.Tensor:  # (B, T, M, D) leaving the last block
        seen = []
        hook = model.blocks[-1].register_forward_hook(lambda mod, inp, out: seen.append(out))
        with torch.no_grad():
            model(ids)
        hook.remove()
        return seen[0]

    plain = last_hidden(narrow)[:, :, 0]
    start = last_hidden(wide)
    for m in range(2):
        torch.testing.assert_close(start[:, :, m], plain, rtol=1e-5, atol=1e-6)

    seq = batch(7, B=4, T=13)
    opt = torch.optim.AdamW(wide.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(20):
        loss = wide.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in wide.named_parameters():
                if "_hc." in name:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
        opt.step()

    # The symmetry breaks slowly (only A_m starts unequal across branches): after 20 steps
    # the branches differ by ~5 % of the stream.
    H = last_hidden(wide)
    assert (H[:, :, 0] - H[:, :, 1]).norm() > 0.01 * H.norm(), "branches are still copies"
    with torch.no_grad():
        trained = wide(ids)
    narrow.load_state_dict({k: v for k, v in wide.state_dict().items() if "_hc." not in k})
    with torch.no_grad():
        assert (trained - narrow(ids)).abs().max() > 0.05, "M=2 still computes what M=1 does"


# ---------------------------------------------------------------------------- parameter counts


def test_param_counts():
    ecfg = tiny_engram(layer_ids=[0, 1])
    cfg = tiny_config(engram=ecfg, n_routed_experts=4, top_k=2, d_expert=16, d_model=32)
    model = Model(cfg)
    counts = count_params(model)
    per_expert = 3 * 32 * 16
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.routed_experts == 2 * 4 * per_expert
    assert counts.activated == counts.total - 2 * (4 - 2) * per_expert
    assert counts.embedding == VOCAB * 32
    assert counts.tables_activated == 2 * ecfg.engram_hidden_size
    specs = table_specs(ecfg, EngramSource(ecfg).mapping)
    exact = model.param_counts(specs)
    assert exact.tables == sum(s.num_rows * s.dim for s in specs)
    # The estimate counts engram_vocab_size rows per head; each head's prime lies above the
    # last one found (primes are distinct across heads and layers): ~7 % more at this size.
    assert counts.tables < exact.tables < 1.1 * counts.tables
    dense = count_params(Model(tiny_config(moe=False)))
    assert dense.activated == dense.total and dense.routed_experts == 0
