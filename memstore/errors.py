"""Typed errors shared by every layer of the store.

The engine raises them naming the bad key, table or shard; the gRPC servicer maps each class
to one status code (`memstore.server.STATUS_OF`); the client maps status codes back to these
classes, so a caller sees the same exception whether the table is in process or remote.
"""


class MemStoreError(Exception):
    """Base class of every error the store reports."""


class InvalidArgument(MemStoreError, ValueError):
    """A request that can never succeed as sent: bad key, shape, dtype, value or payload."""


class TableChanged(InvalidArgument):
    """The table was recreated with another dim or dtype since the caller read its spec:
    the caller reads the spec again and retries."""


class TableNotFound(MemStoreError, KeyError):
    """The named table does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TableExists(MemStoreError):
    """A table of that name exists with a different spec."""


class ResourceExhausted(MemStoreError):
    """A shard lacks the memory a request needs (a table larger than its host can hold)."""


class WrongShard(MemStoreError):
    """The request was routed with a shard layout the server does not have."""


class SegmentUnreachable(MemStoreError):
    """A shard cannot map a client's shared-memory segment (another host, PID namespace or
    user): the client sends that shard's rows in replies instead (memstore.segments)."""


class Unavailable(MemStoreError):
    """A shard could not be reached (after retries)."""


class DeadlineExceeded(MemStoreError):
    """A call did not finish within its deadline (after retries)."""


class ClientClosed(MemStoreError, RuntimeError):
    """A call on a client after its close() (raised by the client, never sent)."""


class StoreNotFound(MemStoreError):
    """No store of that name is running (on the Ray cluster asked)."""
