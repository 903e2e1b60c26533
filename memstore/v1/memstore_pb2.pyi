from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType

class OptimizerSpec(_message.Message):
    __slots__ = ("kind", "beta1", "beta2", "eps", "momentum", "weight_decay", "stochastic_rounding")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    STOCHASTIC_ROUNDING_FIELD_NUMBER: _ClassVar[int]
    kind: str
    beta1: float
    beta2: float
    eps: float
    momentum: float
    weight_decay: float
    stochastic_rounding: bool
    def __init__(self, kind: _Optional[str] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., stochastic_rounding: _Optional[bool] = ...) -> None: ...

class InitSpec(_message.Message):
    __slots__ = ("kind", "std", "bound")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    std: float
    bound: float
    def __init__(self, kind: _Optional[str] = ..., std: _Optional[float] = ..., bound: _Optional[float] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "num_rows", "dim", "dtype", "wire_dtype", "init", "seed", "optimizer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    dim: int
    dtype: DType
    wire_dtype: DType
    init: InitSpec
    seed: int
    optimizer: OptimizerSpec
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., init: _Optional[_Union[InitSpec, _Mapping]] = ..., seed: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("shard_index", "num_shards")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("spec", "route")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    route: Route
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

class TableRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("spec", "shard_index", "num_shards", "local_rows", "version", "row_bytes", "state_bytes", "created")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    shard_index: int
    num_shards: int
    local_rows: int
    version: int
    row_bytes: int
    state_bytes: int
    created: bool
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., local_rows: _Optional[int] = ..., version: _Optional[int] = ..., row_bytes: _Optional[int] = ..., state_bytes: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class DropTableRequest(_message.Message):
    __slots__ = ("name", "drop_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DROP_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    drop_id: str
    def __init__(self, name: _Optional[str] = ..., drop_id: _Optional[str] = ...) -> None: ...

class DropTableResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("pid", "fd", "size", "token")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    size: int
    token: bytes
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., size: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("segment", "keys_offset", "rows_offset", "first", "dim", "dtype")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    KEYS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROWS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    segment: Segment
    keys_offset: int
    rows_offset: int
    first: int
    dim: int
    dtype: DType
    def __init__(self, segment: _Optional[_Union[Segment, _Mapping]] = ..., keys_offset: _Optional[int] = ..., rows_offset: _Optional[int] = ..., first: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "route", "num_keys", "delivery")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    table: str
    route: Route
    num_keys: int
    delivery: Delivery
    def __init__(self, table: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ..., num_keys: _Optional[int] = ..., delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_keys", "dim", "dtype", "version", "delivered")
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    num_keys: int
    dim: int
    dtype: DType
    version: int
    delivered: bool
    def __init__(self, num_keys: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., version: _Optional[int] = ..., delivered: _Optional[bool] = ...) -> None: ...

class ReleaseSegmentsRequest(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseSegmentsResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("table", "route", "num_keys", "dim", "dtype", "lr", "update_id", "group", "parts", "num_read_keys", "num_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    NUM_READ_KEYS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    route: Route
    num_keys: int
    dim: int
    dtype: DType
    lr: float
    update_id: str
    group: str
    parts: int
    num_read_keys: int
    num_rows: int
    def __init__(self, table: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ..., num_keys: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., lr: _Optional[float] = ..., update_id: _Optional[str] = ..., group: _Optional[str] = ..., parts: _Optional[int] = ..., num_read_keys: _Optional[int] = ..., num_rows: _Optional[int] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("version", "duplicate", "num_rows", "dim", "dtype")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    version: int
    duplicate: bool
    num_rows: int
    dim: int
    dtype: DType
    def __init__(self, version: _Optional[int] = ..., duplicate: _Optional[bool] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LookupManyRequest(_message.Message):
    __slots__ = ("route", "parts")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    route: Route
    parts: _containers.RepeatedCompositeFieldContainer[LookupRequest]
    def __init__(self, route: _Optional[_Union[Route, _Mapping]] = ..., parts: _Optional[_Iterable[_Union[LookupRequest, _Mapping]]] = ...) -> None: ...

class LookupManyResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[LookupResponse]
    def __init__(self, parts: _Optional[_Iterable[_Union[LookupResponse, _Mapping]]] = ...) -> None: ...

class UpdateManyRequest(_message.Message):
    __slots__ = ("route", "parts", "tables")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    route: Route
    parts: _containers.RepeatedCompositeFieldContainer[UpdateRequest]
    tables: _containers.RepeatedCompositeFieldContainer[TableShape]
    def __init__(self, route: _Optional[_Union[Route, _Mapping]] = ..., parts: _Optional[_Iterable[_Union[UpdateRequest, _Mapping]]] = ..., tables: _Optional[_Iterable[_Union[TableShape, _Mapping]]] = ...) -> None: ...

class TableShape(_message.Message):
    __slots__ = ("table", "num_rows", "dim")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    table: str
    num_rows: int
    dim: int
    def __init__(self, table: _Optional[str] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ...) -> None: ...

class UpdateManyResponse(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[UpdateResponse]
    def __init__(self, parts: _Optional[_Iterable[_Union[UpdateResponse, _Mapping]]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("table", "route", "num_keys", "dim", "dtype", "keep_optimizer_state", "update_id", "group", "parts", "num_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEEP_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    route: Route
    num_keys: int
    dim: int
    dtype: DType
    keep_optimizer_state: bool
    update_id: str
    group: str
    parts: int
    num_rows: int
    def __init__(self, table: _Optional[str] = ..., route: _Optional[_Union[Route, _Mapping]] = ..., num_keys: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., keep_optimizer_state: _Optional[bool] = ..., update_id: _Optional[str] = ..., group: _Optional[str] = ..., parts: _Optional[int] = ..., num_rows: _Optional[int] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("version", "duplicate")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    version: int
    duplicate: bool
    def __init__(self, version: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodStats(_message.Message):
    __slots__ = ("method", "calls", "errors", "rows", "bytes_in", "bytes_out", "rate_per_s", "p50_ms", "p99_ms", "window_s", "bytes_delivered")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    method: str
    calls: int
    errors: int
    rows: int
    bytes_in: int
    bytes_out: int
    rate_per_s: float
    p50_ms: float
    p99_ms: float
    window_s: float
    bytes_delivered: int
    def __init__(self, method: _Optional[str] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., rows: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., rate_per_s: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., window_s: _Optional[float] = ..., bytes_delivered: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_index", "num_shards", "tables", "methods", "uptime_s", "rss_bytes", "mapped_segments", "mapped_segment_bytes", "log", "available_bytes")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    MAPPED_SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    methods: _containers.RepeatedCompositeFieldContainer[MethodStats]
    uptime_s: float
    rss_bytes: int
    mapped_segments: int
    mapped_segment_bytes: int
    log: LogState
    available_bytes: int
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., methods: _Optional[_Iterable[_Union[MethodStats, _Mapping]]] = ..., uptime_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., mapped_segments: _Optional[int] = ..., mapped_segment_bytes: _Optional[int] = ..., log: _Optional[_Union[LogState, _Mapping]] = ..., available_bytes: _Optional[int] = ...) -> None: ...

class LogState(_message.Message):
    __slots__ = ("bytes", "failed", "compactions", "last_compaction_age_s", "last_compaction_s", "last_held_s", "compaction_error")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    COMPACTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPACTION_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_COMPACTION_S_FIELD_NUMBER: _ClassVar[int]
    LAST_HELD_S_FIELD_NUMBER: _ClassVar[int]
    COMPACTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    failed: str
    compactions: int
    last_compaction_age_s: float
    last_compaction_s: float
    last_held_s: float
    compaction_error: str
    def __init__(self, bytes: _Optional[int] = ..., failed: _Optional[str] = ..., compactions: _Optional[int] = ..., last_compaction_age_s: _Optional[float] = ..., last_compaction_s: _Optional[float] = ..., last_held_s: _Optional[float] = ..., compaction_error: _Optional[str] = ...) -> None: ...

class TableStatsRequest(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tables: _Optional[_Iterable[str]] = ...) -> None: ...

class TableTelemetry(_message.Message):
    __slots__ = ("table", "num_rows", "local_rows", "lookups", "lookup_keys", "updates", "update_keys", "rows_touched", "hot_counts", "hot_keys")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_KEYS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_KEYS_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOUCHED_FIELD_NUMBER: _ClassVar[int]
    HOT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    HOT_KEYS_FIELD_NUMBER: _ClassVar[int]
    table: str
    num_rows: int
    local_rows: int
    lookups: int
    lookup_keys: int
    updates: int
    update_keys: int
    rows_touched: int
    hot_counts: _containers.RepeatedScalarFieldContainer[int]
    hot_keys: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, table: _Optional[str] = ..., num_rows: _Optional[int] = ..., local_rows: _Optional[int] = ..., lookups: _Optional[int] = ..., lookup_keys: _Optional[int] = ..., updates: _Optional[int] = ..., update_keys: _Optional[int] = ..., rows_touched: _Optional[int] = ..., hot_counts: _Optional[_Iterable[int]] = ..., hot_keys: _Optional[_Iterable[int]] = ...) -> None: ...

class TableStatsResponse(_message.Message):
    __slots__ = ("shard_index", "num_shards", "tables")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    tables: _containers.RepeatedCompositeFieldContainer[TableTelemetry]
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableTelemetry, _Mapping]]] = ...) -> None: ...
