"""The shard service's name and the gRPC channel settings both ends use (no torch: the
operator's probes import this, not the server)."""

SERVICE = "memstore.v1.MemStore"
# Largest message either side accepts. The client splits batches well below this.
MAX_MESSAGE_BYTES = 256 << 20
# HTTP/2 flow control sized for multi-MiB replies: with gRPC's defaults (64 KiB initial window,
# window grown by BDP probing, 16 KiB frames) a 4 MiB reply on loopback ran at ~0.5 GB/s;
# with a 16 MiB window and the largest frame, ~1.5-2 GB/s (bench/bench_store.py measures both).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.lookahead_bytes", 16 << 20),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
]
