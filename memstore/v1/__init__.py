"""Generated from protos/memstore/v1/ by `python -m memstore.protogen`; do not edit."""
