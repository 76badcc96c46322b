"""Server reflection under both of its names: `grpc.reflection.v1`, which newer tools ask for
first, and `grpc.reflection.v1alpha`, the only one grpcio-reflection ships.

The two are the same protocol: v1 is v1alpha's messages, field for field, under another package.
So one servicer answers both, the v1 service reading and writing v1alpha messages (the same
bytes on the wire), and v1's file descriptor, derived from v1alpha's, is added to the
descriptor pool so that v1 can be described and listed like any other service.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"


def v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """reflection.proto as v1: v1alpha's messages and service under the v1 package."""
    alpha_package = reflection_pb2.DESCRIPTOR.package
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)

    def renamed(type_name: str) -> str:
        return type_name.replace(f".{alpha_package}.", f".{V1_PACKAGE}.")

    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's deprecation and language packages
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        service.ClearField("options")
        for method in service.method:
            method.ClearField("options")
            method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    return proto


def add_v1_to_pool(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.Add(v1_file_descriptor())


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Reflection of service_names (and of both reflection services) on server, as v1 and v1alpha."""
    add_v1_to_pool(descriptor_pool.Default())
    servicer = ReflectionServicer((*service_names, V1_SERVICE_NAME, reflection.SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1_info}),)
    )
