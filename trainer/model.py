"""A decoder-only MoE language model with Engram layers and hyper-connections.

The backbone the Engram paper trains (arXiv 2601.07372), small enough to read in one go:
- token embedding -> blocks -> RMSNorm -> output head; rotary positions; causal self-attention
  through torch's scaled_dot_product_attention; no biases outside Engram;
- FFN: DeepSeekMoE (shared experts + fine-grained routed experts, top-k), or a SwiGLU MLP
  (moe=False, and the first n_dense_layers blocks when moe=True);
- routing: DeepSeek-V3's auxiliary-loss-free balancing. Affinities are sigmoid(x W_r)
  (router_score="sigmoid", V3) or softmax (V2); a per-expert bias is added to the affinities
  to choose the top-k experts only; the gate weights are the unbiased affinities of the chosen
  experts, normalised to sum 1 for sigmoid, times route_scale. After each optimizer step
  `update_router_biases()` moves every bias by bias_update_rate against the sign of its
  expert's load error (overloaded: down, underloaded: up), with the loads summed over
  data-parallel ranks. V3's small sequence-wise auxiliary loss is left out.
- dispatch is batched: the (token, expert) pairs are sorted by expert, packed into an
  (E, C, D) buffer (C = the largest load of the batch), run through the experts with three
  bmm calls, and scattered back with index_add_ — no Python loop over tokens or experts;
- hyper-connections (Zhu et al., arXiv 2409.19606, static variant) with hc_mult = M
  branches: per sublayer, learnable width weights A_m (M) form the sublayer input, A_r (M, M)
  mixes the branches and depth weights B (M) spread the output. Init A_m = e_(k mod M) for
  sublayer k, A_r = I, B = 1: the model starts as M copies of the residual stream (and
  computes what the M=1 model does, up to the final RMSNorm's eps) and learns to mix them.
  M=1 is a plain residual stream with no mixing parameters. The branches are summed before
  the final norm;
- Engram at the blocks in engram.layer_ids (0-based), consuming all M branches and added to
  every branch before attention, as in the reference demo. The model never talks to the
  store: the caller fetches the rows (`trainer.engram.EngramRows`) and passes them in, so
  forward is a pure function of (input_ids, rows).

Relies on torch only (and trainer.engram for the Engram module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from memstore.spec import TableSpec
from trainer.engram import Engram, EngramConfig, table_params


@dataclass
class ModelConfig:
    vocab_size: int = 32768
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256  # longest sequence (rotary tables are built for it)
    hc_mult: int = 1  # hyper-connection branches M; 1 = a plain residual stream
    d_ff: int | None = None  # SwiGLU hidden of the dense FFN; None = 4 * d_model
    # MoE
    moe: bool = True  # False: every FFN is a dense SwiGLU MLP
    n_dense_layers: int = 0  # with moe, the first blocks keep a dense FFN (V3: 3)
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    top_k: int = 2
    d_expert: int = 256  # hidden size of one expert (shared experts too)
    router_score: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 1.0  # multiplies the routed experts' gate weights
    bias_update_rate: float = 1e-3  # V3's gamma: step of the balancing bias per update
    # Engram
    engram: EngramConfig | None = None  # None: the no-Engram baseline
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if self.hc_mult < 1:
            raise ValueError(f"hc_mult must be >= 1, got {self.hc_mult}")
        if self.moe and not 1 <= self.top_k <= self.n_routed_experts:
            raise ValueError(f"top_k must lie in 1..n_routed_experts={self.n_routed_experts}, got {self.top_k}")
        if self.router_score not in ("sigmoid", "softmax"):
            raise ValueError(f"router_score must be 'sigmoid' or 'softmax', got {self.router_score!r}")
        if self.engram is not None:
            if self.engram.hc_mult is not None and self.engram.hc_mult != self.hc_mult:
                raise ValueError(f"engram.hc_mult={self.engram.hc_mult} differs from hc_mult={self.hc_mult}")
            bad = [l for l in self.engram.layer_ids if not 0 <= l < self.n_layers]
            if bad:
                raise ValueError(f"Engram layer ids {bad} are outside 0..{self.n_layers - 1}")

    @property
    def ffn_hidden(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


# ---------------------------------------------------------------------------- attention


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd); rotates the pairs (x[:hd/2], x[hd/2:])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads)  # (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


# ---------------------------------------------------------------------------- feed-forward


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Shared experts (one SwiGLU of n_shared * d_expert) + top-k of n_routed routed experts.

    Buffers: `expert_bias` (E) the balancing bias; `tokens_per_expert` (E) routed tokens
    counted in training forwards since the last bias update; `last_tokens_per_expert` (E)
    the last forward's counts, training or not.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fh = cfg.n_routed_experts, cfg.d_model, cfg.d_expert
        self.top_k = cfg.top_k
        self.score = cfg.router_score
        self.route_scale = cfg.route_scale
        self.bias_update_rate = cfg.bias_update_rate
        self.shared = SwiGLU(D, cfg.n_shared_experts * Fh) if cfg.n_shared_experts else None
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))  # routed experts, stacked
        self.w3 = nn.Parameter(torch.empty(E, D, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("tokens_per_expert", torch.zeros(E))
        self.register_buffer("last_tokens_per_expert", torch.zeros(E), persistent=False)

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> chosen experts (N, k) and their gate weights (N, k)."""
        logits = self.router(x).float()  # (N, E)
        scores = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)
        # The bias only chooses the experts; the weights are the unbiased scores.
        idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, idx)
        if self.score == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, (weights * self.route_scale).type_as(x)

    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(x): (N, D)."""
        N, D = x.shape
        flat = idx.reshape(-1)  # (N*k,) expert of each (token, slot)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        expert = flat[order]
        counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(flat), device=x.device) - starts[expert]  # place within its expert
        token = order // self.top_k
        packed = x.new_zeros(self.n_experts, int(counts.max()), D)  # (E, C, D)
        packed[expert, rank] = x[token]
        h = F.silu(torch.bmm(packed, self.w1)) * torch.bmm(packed, self.w3)  # (E, C, Fh)
        out = torch.bmm(h, self.w2)[expert, rank]  # (N*k, D) in sorted order
        out = out * weights.reshape(-1)[order].unsqueeze(1)
        return out.new_zeros(N, D).index_add_(0, token, out)  # out's dtype: bf16 under autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        idx, weights = self.route(flat)
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts).to(self.tokens_per_expert.dtype)
            self.last_tokens_per_expert.copy_(counts)
            if self.training:
                self.tokens_per_expert.add_(counts)
        y = self.experts(flat, idx, weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, D)

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += rate * sign(mean load - load), then the counts restart."""
        load = self.tokens_per_expert.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank applies the same update
        if load.sum() > 0:
            self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        self.tokens_per_expert.zero_()


# ---------------------------------------------------------------------------- hyper-connections


class HyperConnection(nn.Module):
    """Wraps one sublayer f: H (B, T, M, D) -> A_r^T H + B (x) f(A_m^T H) (static HC).

    M=1: H + f(H), no parameters.
    """

    def __init__(self, hc_mult: int, sublayer_index: int):
        super().__init__()
        self.hc_mult = hc_mult
        if hc_mult > 1:
            self.width_in = nn.Parameter(F.one_hot(torch.tensor(sublayer_index % hc_mult), hc_mult).float())  # A_m (M,)
            self.width_res = nn.Parameter(torch.eye(hc_mult))  # A_r (M, M)
            self.depth = nn.Parameter(torch.ones(hc_mult))  # B (M,)

    def forward(self, H: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.hc_mult == 1:
            return H + f(H[:, :, 0]).unsqueeze(2)
        x = torch.einsum("btmd,m->btd", H, self.width_in.to(H.dtype))  # (B, T, D)
        out = f(x)  # (B, T, D)
        mixed = torch.einsum("btmd,mn->btnd", H, self.width_res.to(H.dtype))  # (B, T, M, D)
        return mixed + out.unsqueeze(2) * self.depth.to(H.dtype)[:, None]


# ---------------------------------------------------------------------------- the model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.engram = None
        if cfg.engram is not None and layer_id in cfg.engram.layer_ids:
            self.engram = Engram(cfg.engram, layer_id, cfg.d_model, cfg.hc_mult)
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.attn_hc = HyperConnection(cfg.hc_mult, 2 * layer_id)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        use_moe = cfg.moe and layer_id >= cfg.n_dense_layers
        self.ffn = MoE(cfg) if use_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.ffn_hc = HyperConnection(cfg.hc_mult, 2 * layer_id + 1)

    def forward(self, H: torch.Tensor, rows: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.engram is not None:
            H = H + self.engram(H, rows)  # (B, T, M, D), every branch, before attention
        H = self.attn_hc(H, lambda x: self.attn(self.attn_norm(x), cos, sin))
        return self.ffn_hc(H, lambda x: self.ffn(self.ffn_norm(x)))


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_backbone()

    def _init_backbone(self) -> None:
        """N(0, init_std) for the backbone's matrices, output projections scaled down by
        sqrt(2 * n_layers) (GPT-2). Engram keeps the reference's init (torch defaults)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if ".engram." in f".{name}" or p.dim() < 2 or "_hc." in name:
                continue
            scale = math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "w2.weight", ".w2")) else 1.0
            nn.init.normal_(p, std=std / scale)

    @property
    def engram_layer_ids(self) -> list[int]:
        return [b.layer_id for b in self.blocks if b.engram is not None]

    @property
    def moe_layers(self) -> dict[int, MoE]:
        return {b.layer_id: b.ffn for b in self.blocks if isinstance(b.ffn, MoE)}

    def forward(self, input_ids: torch.Tensor, engram_rows: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids (B, T); engram_rows {layer id: (B, T, engram_hidden_size)} -> logits (B, T, V)."""
        B, T = input_ids.shape
        engram_rows = engram_rows or {}
        if set(engram_rows) != set(self.engram_layer_ids):
            raise ValueError(f"engram_rows has layers {sorted(engram_rows)}, the model's Engram "
                             f"layers are {self.engram_layer_ids}")
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.cfg.seq_len}")
        x = self.embed(input_ids)  # (B, T, D)
        H = x.unsqueeze(2).expand(B, T, self.cfg.hc_mult, x.shape[-1])  # (B, T, M, D) copies
        for block in self.blocks:
            H = block(H, engram_rows.get(block.layer_id), self.rope_cos, self.rope_sin)
        return self.head(self.norm(H.sum(dim=2)))  # (B, T, V)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor,
             engram_rows: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy; targets (B, T), -1 = ignored."""
        logits = self(input_ids, engram_rows)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def update_router_biases(self) -> None:
        """After each optimizer step: the auxiliary-loss-free balancing update of every MoE."""
        for moe in self.moe_layers.values():
            moe.update_bias()

    def routing_stats(self) -> dict[int, torch.Tensor]:
        """{layer id: tokens routed to each expert by the last forward} (E,)."""
        return {l: m.last_tokens_per_expert.clone() for l, m in self.moe_layers.items()}

    def param_counts(self, table_specs: Sequence[TableSpec] | None = None) -> "ParamCounts":
        return count_params(self, table_specs)


# ---------------------------------------------------------------------------- parameter counts


@dataclass
class ParamCounts:
    """total: every parameter the trainer holds (Engram tables live in the store, not here);
    activated: those one token uses (total minus the routed experts it does not choose);
    tables / tables_activated: Engram table values held / read per token."""

    total: int
    activated: int
    embedding: int
    routed_experts: int
    engram_dense: int
    tables: int
    tables_activated: int


def count_params(model: Model, table_specs: Sequence[TableSpec] | None = None) -> ParamCounts:
    """Parameter counts. Without table_specs (`trainer.engram.table_specs`), table sizes are
    estimated from engram_vocab_size (each head's prime is a few rows larger)."""
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    routed = inactive = 0
    for moe in model.moe_layers.values():
        per_expert = (moe.w1.numel() + moe.w2.numel() + moe.w3.numel()) // moe.n_experts
        routed += per_expert * moe.n_experts
        inactive += per_expert * (moe.n_experts - moe.top_k)
    engram_dense = sum(p.numel() for b in model.blocks if b.engram is not None for p in b.engram.parameters())
    tables = tables_activated = 0
    if cfg.engram is not None:
        ec = cfg.engram
        if table_specs is not None:
            tables = table_params(table_specs)
        else:
            per_layer = sum(ec.engram_vocab_size[n - 2] * ec.n_head_per_ngram * ec.head_dim
                            for n in range(2, ec.max_ngram_size + 1))
            tables = per_layer * len(ec.layer_ids)
        tables_activated = ec.engram_hidden_size * len(ec.layer_ids)
    return ParamCounts(total=total, activated=total - inactive, embedding=model.embed.weight.numel(),
                       routed_experts=routed, engram_dense=engram_dense, tables=tables,
                       tables_activated=tables_activated)
