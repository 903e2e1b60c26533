"""memstore.optim's sparse optimizers against plain references and torch.optim.

Run: python -m pytest tests/test_optim.py -q

Two kinds of reference: a per-row, per-step loop in float64 that is the definition of each
update (lazy semantics: only the rows of a step change), and torch.optim itself where the
two coincide (every step touching the same rows). Tables are small and chunks are forced to
a few rows so that chunk boundaries and uneven last chunks are exercised.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import memstore.optim as optim
from memstore.errors import InvalidArgument
from memstore.optim import make_optimizer
from memstore.spec import OptimizerSpec, TableSpec

NUM_ROWS, DIM, STEPS = 48, 12, 6

SPECS = {
    "sgd": OptimizerSpec("sgd"),
    "sgd_wd": OptimizerSpec("sgd", weight_decay=0.1),
    "sgd_momentum": OptimizerSpec("sgd", momentum=0.9),
    "sgd_momentum_wd": OptimizerSpec("sgd", momentum=0.9, weight_decay=0.1),
    "adagrad": OptimizerSpec("adagrad"),
    "adagrad_wd": OptimizerSpec("adagrad", weight_decay=0.1),
    "adam": OptimizerSpec("adam"),
    "adam_wd": OptimizerSpec("adam", beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """7 rows per chunk at DIM 12: several chunks per step, the last one short."""
    monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", 7 * DIM)


def close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """Element-wise |actual - expected| <= atol + rtol * |expected|; reports max and mean diff."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs()
    ok = diff <= atol + rtol * e.abs()
    assert bool(ok.all()), (
        f"{what}: {int((~ok).sum())} of {ok.numel()} differ; max abs diff {diff.max():.3g}, "
        f"mean abs diff {diff.mean():.3g} (atol {atol}, rtol {rtol})"
    )


class RowLoopReference:
    """Each update applied row by row in float64, rounded to the storage dtype after each step.

    This is the definition of the optimizers, written for reading rather than speed.
    """

    def __init__(self, spec: OptimizerSpec, rows: torch.Tensor):
        self.spec, self.dtype = spec, rows.dtype
        self.rows = rows.double()
        self.buf = torch.zeros_like(self.rows)  # sgd momentum buffer / adam exp_avg
        self.sq = torch.zeros_like(self.rows)  # adam exp_avg_sq
        self.acc = torch.zeros(rows.shape[0], dtype=torch.float64)  # adagrad accumulator
        self.step_count = torch.zeros(rows.shape[0], dtype=torch.int64)

    def step(self, idx: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
        s = self.spec
        for r, g in zip(idx.tolist(), grads.double()):
            p = self.rows[r] * (1.0 - lr * s.weight_decay)
            if s.kind == "sgd":
                self.buf[r] = s.momentum * self.buf[r] + g
                p = p - lr * (self.buf[r] if s.momentum else g)
            elif s.kind == "adagrad":
                self.acc[r] += float((g * g).mean())
                p = p - lr * g / (math.sqrt(self.acc[r]) + s.eps)
            else:
                self.step_count[r] += 1
                t = int(self.step_count[r])
                self.buf[r] = s.beta1 * self.buf[r] + (1 - s.beta1) * g
                self.sq[r] = s.beta2 * self.sq[r] + (1 - s.beta2) * g * g
                m_hat = self.buf[r] / (1 - s.beta1**t)
                v_hat = self.sq[r] / (1 - s.beta2**t)
                p = p - lr * m_hat / (v_hat.sqrt() + s.eps)
            self.rows[r] = p.to(self.dtype).double()

    def state(self) -> dict[str, torch.Tensor]:
        """The reference's state under memstore's state names."""
        s = self.spec
        if s.kind == "sgd":
            return {"momentum_buffer": self.buf} if s.momentum else {}
        if s.kind == "adagrad":
            return {"momentum1": self.acc}
        return {"exp_avg": self.buf, "exp_avg_sq": self.sq, "step": self.step_count}


def random_steps(gen: torch.Generator, num_rows: int, dim: int, steps: int, never_touched: int = 4):
    """(idx, grads, lr) per step: unique rows in random order, sets of varying size that overlap.

    The last `never_touched` rows are in no set.
    """
    out = []
    for _ in range(steps):
        n = int(torch.randint(num_rows // 4, num_rows * 3 // 4, (1,), generator=gen))
        idx = torch.randperm(num_rows - never_touched, generator=gen)[:n]
        grads = torch.randn(n, dim, generator=gen)
        lr = float(torch.empty(()).uniform_(0.01, 0.1, generator=gen))
        out.append((idx, grads, lr))
    return out


def run_and_check_laziness(opt, rows, state, steps) -> None:
    """Applies the steps, checking after each that rows and state outside idx are bit-identical."""
    for idx, grads, lr in steps:
        untouched = torch.ones(rows.shape[0], dtype=torch.bool)
        untouched[idx] = False
        rows_before = rows.clone()
        state_before = {k: v.clone() for k, v in state.items()}
        opt.step(rows, state, idx, grads, lr)
        assert torch.equal(rows[untouched], rows_before[untouched]), "a row outside idx changed"
        for name, t in state.items():
            assert torch.equal(t[untouched], state_before[name][untouched]), f"state {name!r} outside idx changed"


@pytest.mark.parametrize("name", list(SPECS))
def test_float32_matches_row_loop_reference(name):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(NUM_ROWS, DIM, generator=gen)
    ref = RowLoopReference(spec, rows)
    opt = make_optimizer(spec)
    state = opt.init_state(NUM_ROWS, DIM)
    steps = random_steps(gen, NUM_ROWS, DIM, STEPS)
    run_and_check_laziness(opt, rows, state, steps)
    for idx, grads, lr in steps:
        ref.step(idx, grads, lr)
    # float32 against float64 arithmetic over a few steps of size <= 0.1: a few float32 ulps.
    close(rows, ref.rows, atol=1e-6, rtol=1e-5, what=f"{name} rows")
    ref_state = ref.state()
    assert set(state) == set(ref_state) == set(opt.state_names)
    for key, t in state.items():
        close(t, ref_state[key], atol=1e-7, rtol=1e-5, what=f"{name} state {key}")
    for key, t in state.items():  # random_steps leaves the last rows alone
        assert not t[-4:].any(), f"state {key!r} of never-touched rows is not zero"


# Low-precision storage: the reference rounds each row to the storage dtype after each step,
# as the shard does, but its float64 arithmetic can land on the other side of a rounding
# boundary than our float32 arithmetic, so rows may differ by an ulp of the storage dtype
# (relative 2**-8 for bfloat16, 2**-11 for float16); allow two.
LOW_PRECISION = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adagrad_wd", "adam", "adam_wd"])
def test_low_precision_rows_match_reference(name, dtype):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(NUM_ROWS, DIM, generator=gen).to(dtype)
    ref = RowLoopReference(spec, rows)
    opt = make_optimizer(spec)
    state = opt.init_state(NUM_ROWS, DIM)
    steps = random_steps(gen, NUM_ROWS, DIM, STEPS)
    run_and_check_laziness(opt, rows, state, steps)
    for idx, grads, lr in steps:
        ref.step(idx, grads, lr)
    assert rows.dtype == dtype
    close(rows, ref.rows, atol=1e-6, rtol=LOW_PRECISION[dtype], what=f"{name} {dtype} rows")
    for key, t in state.items():
        assert t.dtype in (torch.float32, torch.int64), f"state {key!r} is {t.dtype}"
        # State is float32 whatever the rows and depends on the gradients alone, not on the
        # rounded rows, so it stays as close as in float32.
        close(t, ref.state()[key], atol=1e-7, rtol=1e-5, what=f"{name} {dtype} state {key}")


def dense_steps(gen: torch.Generator, num_rows: int, dim: int, steps: int):
    """(idx, grads, lr) per step, every step touching every row, in a different order each time."""
    return [
        (torch.randperm(num_rows, generator=gen), torch.randn(num_rows, dim, generator=gen), 0.01 * (i + 1))
        for i in range(steps)
    ]


def run_against_torch(spec, torch_opt_factory, num_rows=NUM_ROWS, dim=DIM, steps=STEPS, subset=None, scale=1.0):
    """Runs memstore's optimizer and a torch.optim one on the same table; returns both tables.

    subset: if given, every step touches these rows only (torch gets sparse gradients).
    scale: of the gradients (small ones make eps matter).
    """
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(num_rows, dim, generator=gen)
    param = torch.nn.Parameter(rows.clone())
    torch_opt = torch_opt_factory([param])
    opt = make_optimizer(spec)
    state = opt.init_state(num_rows, dim)
    for idx, grads, lr in dense_steps(gen, num_rows, dim, steps):
        grads = grads * scale
        if subset is not None:
            idx, grads = subset[torch.randperm(len(subset), generator=gen)], grads[: len(subset)]
            param.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), grads, (num_rows, dim), check_invariants=True)
        else:
            param.grad = torch.zeros_like(rows).index_copy_(0, idx, grads)
        for group in torch_opt.param_groups:  # constructed with a placeholder lr
            group["lr"] = lr
        torch_opt.step()
        opt.step(rows, state, idx, grads, lr)
    return rows, param.detach()


# Same float32 formulas as torch.optim, evaluated with per-row tensors instead of Python
# scalars; only float reassociation may differ. (Measured with torch 2.13: Adam and AdamW
# agree bit for bit, SGD and Adagrad within 2.4e-7 absolute.)
TORCH_ATOL, TORCH_RTOL = 1e-6, 1e-6


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_equals_torch_sgd(momentum):
    ours, theirs = run_against_torch(
        OptimizerSpec("sgd", momentum=momentum), lambda p: torch.optim.SGD(p, lr=1.0, momentum=momentum)
    )
    close(ours, theirs, atol=TORCH_ATOL, rtol=TORCH_RTOL, what=f"sgd momentum {momentum}")


@pytest.mark.parametrize("scale", [1.0, 1e-8])  # 1e-8: gradients as small as eps, where its place shows
def test_adam_equals_torch_adam(scale):
    ours, theirs = run_against_torch(OptimizerSpec("adam"), lambda p: torch.optim.Adam(p, lr=1.0), scale=scale)
    close(ours, theirs, atol=TORCH_ATOL, rtol=TORCH_RTOL, what="adam vs torch Adam")


def test_adam_weight_decay_equals_torch_adamw():
    spec = OptimizerSpec("adam", beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    ours, theirs = run_against_torch(
        spec, lambda p: torch.optim.AdamW(p, lr=1.0, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    )
    close(ours, theirs, atol=TORCH_ATOL, rtol=TORCH_RTOL, what="adam wd vs torch AdamW")


def test_adam_equals_torch_sparse_adam_on_a_fixed_subset():
    subset = torch.randperm(NUM_ROWS, generator=torch.Generator().manual_seed(4))[: NUM_ROWS // 3]
    ours, theirs = run_against_torch(OptimizerSpec("adam"), lambda p: torch.optim.SparseAdam(p, lr=1.0), subset=subset)
    # Our Adam is torch Adam's, row by row (exact, above). SparseAdam puts eps elsewhere:
    # lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps), where Adam has lr / bc1 * m / (sqrt(v) /
    # sqrt(bc2) + eps). With gradients far above eps the two agree to float tolerance; with
    # gradients near eps they differ (SparseAdam's effective eps is eps / sqrt(bc2)).
    close(ours, theirs, atol=1e-5, rtol=1e-5, what="adam vs torch SparseAdam")


def test_rowwise_adagrad_with_one_value_per_row_equals_torch_adagrad():
    # With dim 1 the row mean of g**2 is g**2, so row-wise Adagrad is torch's Adagrad.
    ours, theirs = run_against_torch(OptimizerSpec("adagrad"), lambda p: torch.optim.Adagrad(p, lr=1.0, eps=1e-8), dim=1)
    close(ours, theirs, atol=TORCH_ATOL, rtol=TORCH_RTOL, what="row-wise adagrad vs torch Adagrad, dim 1")


def trained(spec: OptimizerSpec, rows0: torch.Tensor, steps, order=None) -> tuple[torch.Tensor, dict]:
    """(rows, state) after applying `steps` to a copy of rows0; order(n) permutes each step's rows."""
    opt, rows = make_optimizer(spec), rows0.clone()
    state = opt.init_state(*rows0.shape)
    for idx, grads, lr in steps:
        perm = order(len(idx)) if order else torch.arange(len(idx))
        opt.step(rows, state, idx[perm], grads[perm], lr)
    return rows, state


def random_problem(name: str, seed: int):
    """(spec, generator, initial rows, steps) for the bit-identity tests below."""
    gen = torch.Generator().manual_seed(seed)
    rows0 = torch.randn(NUM_ROWS, DIM, generator=gen)
    return SPECS[name], gen, rows0, random_steps(gen, NUM_ROWS, DIM, STEPS)


def assert_identical(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("name", ["sgd_momentum", "adagrad", "adam_wd"])
def test_result_does_not_depend_on_row_order_or_chunking(name, monkeypatch):
    spec, gen, rows0, steps = random_problem(name, seed=5)
    results = []
    for chunk_elements, shuffle in ((7 * DIM, False), (7 * DIM, True), (1 << 18, True)):
        monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", chunk_elements)
        order = (lambda n: torch.randperm(n, generator=gen)) if shuffle else None
        results.append(trained(spec, rows0, steps, order))
    for result in results[1:]:
        assert_identical(result, results[0])


@pytest.mark.parametrize("name", ["sgd_momentum", "adagrad", "adam_wd"])
def test_chunks_side_by_side_equal_chunks_in_turn(name, monkeypatch):
    # A shard runs one torch thread, and then a large update's chunks run on a thread pool
    # (optim._chunk_pool): the same bits as applying them one after another.
    spec, _, rows0, steps = random_problem(name, seed=6)
    monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", 5 * DIM)  # many chunks per step
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert (optim._chunk_pool() is not None) == (n == 1 and optim._cores() > 1)
            results.append(trained(spec, rows0, steps))
    finally:
        torch.set_num_threads(threads)
    assert_identical(*results)


def test_init_state_layout():
    assert make_optimizer(OptimizerSpec("sgd")).init_state(5, 3) == {}
    (buf,) = make_optimizer(OptimizerSpec("sgd", momentum=0.5)).init_state(5, 3).values()
    assert buf.shape == (5, 3) and buf.dtype == torch.float32
    acc = make_optimizer(OptimizerSpec("adagrad")).init_state(5, 3)["momentum1"]
    assert acc.shape == (5,) and acc.dtype == torch.float32
    adam = make_optimizer(OptimizerSpec("adam"))
    state = adam.init_state(5, 3)
    assert tuple(state) == adam.state_names
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (5, 3)
    assert state["step"].shape == (5,) and state["step"].dtype == torch.int64
    assert all(not t.any() for t in state.values())


def test_empty_update_changes_nothing():
    opt = make_optimizer(OptimizerSpec("adam"))
    rows = torch.randn(4, 3)
    state = opt.init_state(4, 3)
    before = rows.clone()
    opt.step(rows, state, torch.empty(0, dtype=torch.int64), torch.empty(0, 3), 0.1)
    assert torch.equal(rows, before) and not state["step"].any()


def test_bad_spec_and_learning_rate_raise_invalid_argument():
    with pytest.raises(InvalidArgument, match="kind"):
        make_optimizer(OptimizerSpec("lamb"))
    with pytest.raises(InvalidArgument, match="momentum"):
        make_optimizer(OptimizerSpec("sgd", momentum=1.5))
    opt = make_optimizer(OptimizerSpec("sgd"))
    rows = torch.zeros(4, 3)
    for lr in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="learning rate"):
            opt.step(rows, {}, torch.tensor([1]), torch.ones(1, 3), lr)
    assert not rows.any()


def test_a_chunk_that_fails_lets_no_other_chunk_write_after_the_step_raises(monkeypatch):
    """A large update's chunks run side by side (one torch thread, as in a shard process):
    when one fails, step() raises only once every other chunk has ended, so none changes rows
    after the caller let the table's lock go."""
    import time

    if optim._cores() < 2:
        pytest.skip("the chunk pool needs two cores")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", 1000 * 64)  # ten chunks
        opt = make_optimizer(OptimizerSpec("sgd"))
        rows = torch.zeros(10_000, 64)
        idx = torch.arange(10_000)
        real = optim.SparseSGD._delta

        def delta(self, state, ix, g, lr, per_row):
            if int(ix[0]) == 0:
                raise MemoryError("the first chunk's temporaries")
            time.sleep(0.05)  # the others are still running when the first fails
            return real(self, state, ix, g, lr, per_row)

        monkeypatch.setattr(optim.SparseSGD, "_delta", delta)
        with pytest.raises(MemoryError):
            opt.step(rows, {}, idx, torch.ones(10_000, 64), lr=1.0)
        changed = int((rows != 0).any(dim=1).sum())
        time.sleep(0.3)
        assert int((rows != 0).any(dim=1).sum()) == changed
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased_over_its_noise(dtype):
    """Over all 2^16 noise values, each float32 value rounds to one of its two neighbours in
    the dtype, as often up as its distance from the lower one says: the mean is the value
    itself (to 2^-16 of a step where float16's fixed step below 2^-14 applies)."""
    from memstore import rounding

    gen = torch.Generator().manual_seed(7)
    tiny = torch.finfo(torch.float16).smallest_normal
    values = torch.cat([torch.randn(40, generator=gen) * s for s in (1e-3, 1.0, 300.0)]
                       + [torch.rand(40, generator=gen) * tiny * 2 - tiny])  # float16's subnormal range too
    values = values[values.to(dtype).float() != values]  # exactly representable ones have nothing to round
    u = torch.arange(1 << 16, dtype=torch.int32)
    out = rounding.round_to(values.repeat(len(u), 1), u.unsqueeze(1).expand(-1, len(values)), dtype).float()
    near = values.to(dtype).float()
    other = torch.where(near < values, torch.nextafter(near.to(dtype), torch.tensor(math.inf, dtype=dtype)),
                        torch.nextafter(near.to(dtype), torch.tensor(-math.inf, dtype=dtype))).float()
    lo, hi = torch.minimum(near, other), torch.maximum(near, other)
    assert bool(((out == lo) | (out == hi)).all()), "a value rounded to something other than its neighbours"
    mean = out.double().mean(0)
    assert bool(((mean - values.double()).abs() <= (hi - lo).double() * 2.0 ** -16 * 1.01).all()), (
        f"biased: worst {((mean - values.double()).abs() / (hi - lo).double()).max():.3g} of a step")


def test_stochastic_rounding_clamps_at_the_largest_finite_value():
    from memstore import rounding

    top = torch.finfo(torch.float16).max
    out = rounding.round_to(torch.tensor([[top + 8.0, -top - 8.0]]), torch.full((1, 2), 65535, dtype=torch.int32),
                            torch.float16)
    assert out.tolist() == [[top, -top]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_lets_updates_below_half_a_step_accumulate(dtype, monkeypatch):
    """Adam at lr 1e-4 on rows near 1: round-to-nearest leaves 16-bit rows where they
    were; stochastic rounding follows the float32 rows' drift (mean over many values)."""
    monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", 1 << 18)  # one chunk a step
    n, dim, steps = 256, 16, 200
    start = (1.0 + torch.rand(n, dim, generator=torch.Generator().manual_seed(1))).to(dtype)
    grads = torch.full((n, dim), 0.5)
    moved = {}
    for name, sr, rows_dtype in (("float32", False, torch.float32), ("nearest", False, dtype), ("stochastic", True, dtype)):
        opt = make_optimizer(OptimizerSpec("adam", stochastic_rounding=sr))
        rows = start.to(rows_dtype).clone()
        state = opt.init_state(n, dim)
        for _ in range(steps):
            opt.step(rows, state, torch.arange(n), grads, 1e-4, seed=9)
        moved[name] = float((rows.float() - start.float()).mean())
    assert moved["float32"] == pytest.approx(-steps * 1e-4, rel=0.01)
    assert abs(moved["nearest"]) < 0.1 * abs(moved["float32"]), moved  # the problem this solves
    assert moved["stochastic"] == pytest.approx(moved["float32"], rel=0.1), moved


def test_stochastic_rounding_is_deterministic_and_counts_each_rows_updates():
    """The same updates give the same bits whatever the chunking (the autouse fixture's
    7-row chunks against one chunk); rows of an update count it in their rounds, others not."""
    spec = OptimizerSpec("sgd", momentum=0.9, stochastic_rounding=True)
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(NUM_ROWS, DIM, generator=gen).to(torch.bfloat16)
    updates = [(torch.randperm(NUM_ROWS, generator=gen)[:20], torch.randn(20, DIM, generator=gen) * 1e-3) for _ in range(4)]
    results = []
    for chunk_elements in (7 * DIM, 1 << 20):
        optim.CPU_CHUNK_ELEMENTS = chunk_elements  # the fixture restores it
        opt = make_optimizer(spec)
        rows, state = start.clone(), opt.init_state(NUM_ROWS, DIM)
        for idx, g in updates:
            opt.step(rows, state, idx, g, 0.1, seed=4, shard=(1, 3))
        results.append((rows, state))
    (a, sa), (b, sb) = results
    assert torch.equal(a.view(torch.int16), b.view(torch.int16)) and torch.equal(sa["rounds"], sb["rounds"])
    counts = torch.zeros(NUM_ROWS, dtype=torch.int32)
    for idx, _ in updates:
        counts[idx] += 1
    assert torch.equal(sa["rounds"], counts)
    assert not torch.equal(a, start)


def test_stochastic_rounding_of_float32_rows_is_refused():
    with pytest.raises(InvalidArgument, match="stochastic_rounding is for bfloat16 or float16"):
        TableSpec("t", 10, 4, optimizer=OptimizerSpec("adam", stochastic_rounding=True)).validate()
    with pytest.raises(InvalidArgument, match="true or false"):
        OptimizerSpec("adam", stochastic_rounding=1).validate()
    TableSpec("t", 10, 4, dtype="bfloat16", optimizer=OptimizerSpec("adam", stochastic_rounding=True)).validate()


def test_row_wise_adagrad_gives_the_same_bits_on_any_thread_count():
    """A lone wide row (dim > 32,768): torch would split its sum of squares over threads, so
    a shard (one thread) and an in-process store (several) would disagree in the last bits."""
    if optim._cores() < 2:
        pytest.skip("needs two cores to run torch on two threads")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for seed in range(8):
                g = torch.randn(1, 50_001, generator=torch.Generator().manual_seed(seed)) * 3
                opt = make_optimizer(OptimizerSpec("adagrad"))
                rows, state = torch.zeros(2, 50_001), opt.init_state(2, 50_001)
                opt.step(rows, state, torch.tensor([1]), g, 0.1)
                results.append((n, seed, rows, state["momentum1"]))
    finally:
        torch.set_num_threads(threads)
    one, two = results[:8], results[8:]
    for (_, seed, r1, a1), (_, _, r2, a2) in zip(one, two):
        assert torch.equal(a1, a2) and torch.equal(r1, r2), f"seed {seed}: 1 and 2 threads differ"


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_rows_saturate_instead_of_overflowing_to_inf(dtype, stochastic):
    """An update past the dtype's largest value (float16 65,504, bfloat16 3.39e38) leaves the
    row there, not at Inf (which would turn every later lookup of it, and the loss, into Inf
    or NaN). bfloat16's step from 3.0e38 overflows float32's sum itself."""
    top = torch.finfo(dtype).max
    opt = make_optimizer(OptimizerSpec("sgd", stochastic_rounding=stochastic))
    rows = torch.tensor([[0.9 * top, -0.9 * top, 1.0]]).to(dtype)
    lr = 10_000.0 if dtype == torch.float16 else 1e30
    opt.step(rows, opt.init_state(1, 3), torch.tensor([0]), torch.tensor([[-top / lr, top / lr, 0.0]]), lr)
    assert rows.float().tolist() == [[top, -top, 1.0]]


@pytest.mark.parametrize("dim", [1, 100, 1000, 65_536])
def test_the_largest_gradient_the_store_accepts_keeps_adagrads_accumulator_finite(dim):
    """check_gradient_scale's bound leaves room for float32's rounding of the squares and of
    their sum: a row of values just below it still gives a finite accumulator and row."""
    import numpy as np

    from memstore.keys import check_gradient_scale
    from memstore.spec import FLOAT32_MAX

    below = float(np.nextafter(np.float32(0.5 * math.sqrt(FLOAT32_MAX / dim)), np.float32(0)))
    grads = torch.full((1, dim), below)
    check_gradient_scale(grads, 1e-3, np.array([0]), "t")  # accepted
    with pytest.raises(InvalidArgument, match="summed over the row"):
        check_gradient_scale(grads * 1.001, 1e-3, np.array([0]), "t")
    opt = make_optimizer(OptimizerSpec("adagrad"))
    rows, state = torch.zeros(1, dim), opt.init_state(1, dim)
    opt.step(rows, state, torch.tensor([0]), grads, 1e-3)
    assert bool(torch.isfinite(state["momentum1"]).all() and torch.isfinite(rows).all())


def test_stochastic_rounding_noise_is_uniform_and_independent_across_columns():
    """Each column's noise over many rows is uniform on [0, 2^16) (mean, variance), and no
    two columns of a row move together (correlations at the sampling noise's level)."""
    from memstore import rounding

    n = 100_000
    u = rounding.noise(rounding.row_words(3, torch.arange(n), torch.ones(n, dtype=torch.int32)), 64).double()
    assert int(u.min()) >= 0 and int(u.max()) < 1 << 16
    assert torch.allclose(u.mean(0), torch.full((64,), 32767.5, dtype=torch.float64), rtol=0.01)
    assert torch.allclose(u.var(0), torch.full((64,), (2.0**32 - 1) / 12, dtype=torch.float64), rtol=0.02)
    corr = torch.corrcoef(u.T)
    corr.fill_diagonal_(0)
    assert float(corr.abs().max()) < 6 / math.sqrt(n), f"columns correlated: {float(corr.abs().max()):.4f}"
    rows_again = rounding.noise(rounding.row_words(3, torch.arange(n), torch.full((n,), 2, dtype=torch.int32)), 64)
    assert float((rows_again.double() == u).double().mean()) < 1e-3  # the next update draws afresh
