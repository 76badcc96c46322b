"""Generated protobuf and gRPC stubs for goodspeed.v1 (see generate.py)."""
