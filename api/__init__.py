"""The public contract that server and client share: the generated stubs of
proto/goodspeed/v1/generation.proto (api/pb), the metadata keys both sides read, and the
speculation mode with its one text spelling. Nothing here imports server/, client/ or engine/.
"""
