"""Table specifications: what a table is, independent of where its rows live.

A `TableSpec` fully determines a table's initial contents and how updates change it, so two
stores built from the same spec hold bit-identical rows whatever their shard count. Specs
travel as plain dicts (msgpack in checkpoints, TOML in store configs, the proto's
`TableSpec` on the wire) using the field names below.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from memstore.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The largest finite value of each storage dtype (bfloat16's: float32's exponent, 7 bits of mantissa).
DTYPE_LARGEST = {"float32": float(np.finfo(np.float32).max),
                 "bfloat16": float(np.uint32(0x7F7F0000).view(np.float32)), "float16": float(np.finfo(np.float16).max)}
OPTIMIZER_KINDS = ("adam", "adagrad", "sgd")
INIT_KINDS = ("normal", "uniform", "zeros")
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32
_NAME = re.compile(r"^[A-Za-z0-9_.\-:/]{1,128}$")


@dataclass(frozen=True)
class OptimizerSpec:
    """The sparse optimizer a shard applies to the rows of each update.

    kind: "adam" (lazy Adam, per-row moments and per-row step count), "adagrad" (row-wise
    Adagrad: one accumulator per row) or "sgd" (optional momentum). The learning rate is not
    here: it travels with every update so the trainer owns the schedule. weight_decay is
    decoupled (AdamW-style, p -= lr * wd * p) and touches only the rows of an update.
    stochastic_rounding: bfloat16 / float16 rows round each updated value to one of its two
    neighbours at random, in proportion to closeness (unbiased: updates smaller than half a
    unit in the last place still move a row on average, where round-to-nearest drops them);
    the noise depends only on (table seed, key, column, the row's update count), so the
    same updates give the same bits with any number of shards. Costs 4 bytes of state a row.
    """

    kind: str = "adam"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    stochastic_rounding: bool = False

    def validate(self) -> None:
        if self.kind not in OPTIMIZER_KINDS:
            raise InvalidArgument(f"optimizer kind {self.kind!r} is not one of {OPTIMIZER_KINDS}")
        if not isinstance(self.stochastic_rounding, bool):
            raise InvalidArgument(f"optimizer stochastic_rounding must be true or false, got {self.stochastic_rounding!r}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise InvalidArgument(f"optimizer betas must lie in [0, 1): {self.beta1}, {self.beta2}")
        # eps and weight_decay meet float32 state and rows: an infinite one (or one that is
        # infinite in float32) makes every updated row Inf or NaN.
        # Below float32's smallest normal value, 1 / eps (Adagrad's step for an all-zero row
        # gradient) overflows and an eps of 1e-46 is 0 there (Adam's 0 / 0): NaN rows.
        if not FLOAT32_TINY <= self.eps <= FLOAT32_MAX:
            raise InvalidArgument(f"optimizer eps must be at least {FLOAT32_TINY:.3g} (float32's smallest normal "
                                  f"value) and finite in float32, got {self.eps}")
        if not 0.0 <= self.momentum < 1.0:
            raise InvalidArgument(f"optimizer momentum must lie in [0, 1), got {self.momentum}")
        if not 0.0 <= self.weight_decay <= FLOAT32_MAX:
            raise InvalidArgument(f"optimizer weight_decay must be >= 0 and finite in float32, got {self.weight_decay}")


@dataclass(frozen=True)
class InitSpec:
    """How rows start: "normal" (mean 0, `std`), "uniform" (in [-bound, bound]) or "zeros".

    The default, N(0, 1), is torch.nn.Embedding's, which the Engram reference uses.
    """

    kind: str = "normal"
    std: float = 1.0
    bound: float = 1.0

    def validate(self, dtype: str = "float32") -> None:
        """Checks the kind, and that rows drawn so stay finite in the storage dtype: a
        uniform bound up to its largest value, a normal std up to 1/8 of it (8 sigma)."""
        if self.kind not in INIT_KINDS:
            raise InvalidArgument(f"init kind {self.kind!r} is not one of {INIT_KINDS}")
        if not (self.std >= 0.0 and self.bound >= 0.0):
            raise InvalidArgument(f"init std and bound must be >= 0: {self.std}, {self.bound}")
        largest = DTYPE_LARGEST.get(dtype, DTYPE_LARGEST["float32"])
        if self.kind == "normal" and not self.std <= largest / 8:
            raise InvalidArgument(f"init std {self.std} would draw rows that are not finite in {dtype} "
                                  f"(at most {largest / 8:.6g})")
        if self.kind == "uniform" and not self.bound <= largest:
            raise InvalidArgument(f"init bound {self.bound} is not finite in {dtype} (at most {largest:.6g})")


@dataclass(frozen=True)
class TableSpec:
    """A table of `num_rows` rows of `dim` values, addressed by keys 0..num_rows-1.

    dtype: how rows are stored; wire_dtype: how rows and gradients travel (defaults to dtype).
    Optimizer state is always float32.
    """

    name: str
    num_rows: int
    dim: int
    dtype: str = "float32"
    wire_dtype: str = ""
    init: InitSpec = field(default_factory=InitSpec)
    seed: int = 0
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)

    def __post_init__(self) -> None:
        if not self.wire_dtype:
            object.__setattr__(self, "wire_dtype", self.dtype)

    def validate(self) -> "TableSpec":
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise InvalidArgument(
                f"table name {self.name!r} must be 1-128 characters of letters, digits and _.-:/"
            )
        if not (isinstance(self.num_rows, int) and 0 < self.num_rows < 2**62):
            raise InvalidArgument(f"table {self.name!r}: num_rows must be a positive integer, got {self.num_rows!r}")
        if not (isinstance(self.dim, int) and 0 < self.dim <= 1 << 16):
            raise InvalidArgument(f"table {self.name!r}: dim must be in 1..65536, got {self.dim!r}")
        for what, value in (("dtype", self.dtype), ("wire_dtype", self.wire_dtype)):
            if value not in DTYPE_BYTES:
                raise InvalidArgument(f"table {self.name!r}: {what} {value!r} is not one of {tuple(DTYPE_BYTES)}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise InvalidArgument(f"table {self.name!r}: seed must be an integer in [0, 2**63), got {self.seed!r}")
        # Rows must be finite where they are stored and where they travel (float32 rows on a float16 wire).
        self.init.validate(min((self.dtype, self.wire_dtype), key=DTYPE_LARGEST.__getitem__))
        self.optimizer.validate()
        if self.optimizer.stochastic_rounding and self.dtype == "float32":
            raise InvalidArgument(f"table {self.name!r}: stochastic_rounding is for bfloat16 or float16 rows; "
                                  "float32 rows hold an update's float32 result as it is")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtypes()[self.dtype]

    @property
    def wire_torch_dtype(self) -> torch.dtype:
        return torch_dtypes()[self.wire_dtype]

    @property
    def row_bytes(self) -> int:
        return self.dim * DTYPE_BYTES[self.dtype]

    @property
    def wire_row_bytes(self) -> int:
        return self.dim * DTYPE_BYTES[self.wire_dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TableSpec":
        """Builds a spec from a dict (TOML, msgpack, JSON); unknown fields are an error."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidArgument(f"table spec has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        if "name" not in d or "num_rows" not in d or "dim" not in d:
            raise InvalidArgument(f"table spec needs name, num_rows and dim, got {sorted(d)}")
        for field, kind in (("optimizer", OptimizerSpec), ("init", InitSpec)):
            value = d.get(field)
            if value is not None and not isinstance(value, (dict, kind)):
                raise InvalidArgument(f"table spec {d.get('name')!r}: {field} must be a table of "
                                      f"{kind.__name__} fields (e.g. {{kind = ...}}), got {value!r}")
        try:
            if isinstance(d.get("optimizer"), dict):
                d["optimizer"] = OptimizerSpec(**d["optimizer"])
            if isinstance(d.get("init"), dict):
                d["init"] = InitSpec(**d["init"])
            return cls(**d).validate()
        except InvalidArgument:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise InvalidArgument(f"table spec {d.get('name')!r}: {e}") from None


def check_learning_rate(lr: Any, spec: "OptimizerSpec | None" = None) -> float:
    """lr as a float, or InvalidArgument: it must be >= 0 and finite in float32, where the
    optimizers compute (1e39 is finite as a Python float and Inf there); with `spec`, the
    decay factor 1 - lr * weight_decay must lie in [0, 1] (below, it flips every updated
    row's sign, and grows it), Adam's first bias-corrected step lr / (1 - beta1) must be
    finite too, and Adagrad's largest scale lr / eps at most half float32's largest."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise InvalidArgument(f"learning rate must be a number, got {lr!r}") from None
    if not 0.0 <= value <= FLOAT32_MAX:
        raise InvalidArgument(f"learning rate must be >= 0 and finite in float32, got {lr}")
    if spec is not None and not value * spec.weight_decay <= 1.0:
        raise InvalidArgument(f"learning rate {lr} times weight_decay {spec.weight_decay} is above 1: the decay "
                              "factor 1 - lr * weight_decay would be negative")
    if spec is not None and spec.kind == "adam" and not value / (1.0 - spec.beta1) <= FLOAT32_MAX:
        raise InvalidArgument(f"learning rate {lr} over 1 - beta1 ({1.0 - spec.beta1:g}), Adam's first step size, "
                              "is not finite in float32")
    # Adagrad scales a row's gradient by lr / (sqrt(acc) + eps), at most lr / eps: an infinite
    # scale makes a row's zero gradients NaN (0 x Inf). Half float32's largest: room for its rounding.
    if spec is not None and spec.kind == "adagrad" and not value / spec.eps <= FLOAT32_MAX / 2:
        raise InvalidArgument(f"learning rate {lr} over eps {spec.eps:g}, Adagrad's largest gradient scale, is "
                              f"beyond {FLOAT32_MAX / 2:.3g} (half float32's largest)")
    return value


def as_key_array(keys: Any) -> np.ndarray:
    """Any integer array, tensor or sequence of keys as a C-contiguous int64 numpy array."""
    torch = sys.modules.get("torch")  # not imported: keys are no tensor (the CLI runs without torch)
    if torch is not None and isinstance(keys, torch.Tensor):
        if keys.is_floating_point() or keys.is_complex() or keys.dtype == torch.bool:
            raise InvalidArgument(f"keys must be integers, got a tensor of {keys.dtype}")
        keys = keys.detach().cpu().numpy()  # as it is: a uint64 key of 2**63 or more is checked below
    arr = np.asarray(keys)
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise _beyond_int64(keys) or InvalidArgument(f"keys must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        first = int(arr.reshape(-1)[np.flatnonzero(arr.reshape(-1) >= 2**63)[0]])
        raise InvalidArgument(f"key {first} is out of range: keys lie in [0, num_rows), num_rows < 2**62")
    return np.asarray(arr, dtype=np.int64, order="C")  # keeps 0-d shapes, unlike ascontiguousarray


def _beyond_int64(keys: Any) -> InvalidArgument | None:
    """Python integers of which some do not fit in int64 make numpy choose float64 or object:
    the error naming the first key out of range (negative, or beyond int64), or None when
    the keys are not all integers. Only on that error path."""
    try:
        flat = np.asarray(keys, dtype=object).reshape(-1)
    except (TypeError, ValueError):
        return None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in flat):
        return None
    bad = np.flatnonzero((flat < 0) | (flat >= 2**63))
    if not len(bad):
        return None
    return InvalidArgument(f"key {flat[bad[0]]} is out of range: keys lie in [0, num_rows), num_rows < 2**62")


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """{storage dtype name: torch dtype}, made on first use: importing this module (as the
    CLI's commands that only talk to a store do) does not import torch."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def __getattr__(name: str):
    if name == "DTYPES":  # torch_dtypes(), for `from memstore.spec import DTYPES`
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
