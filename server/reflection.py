"""Server reflection under both protocol versions: `grpc.reflection.v1` (what current tools,
e.g. grpcurl, ask first) and `grpc.reflection.v1alpha`.

grpcio-reflection 1.85 ships only v1alpha. The v1 protocol has the same messages, field for
field and number for number, under another package, so one servicer answers both: v1 is
registered with a generic handler, and a v1 copy of the reflection file (v1alpha's, package
renamed) joins the default descriptor pool, so that reflection can describe v1 itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def v1_file() -> FileDescriptor:
    """The v1 reflection file in the default pool (added on first use)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(_V1_FILE)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto()
        reflection_pb2.DESCRIPTOR.CopyToProto(proto)
        proto.name, proto.package = _V1_FILE, V1_PACKAGE
        proto.ClearField("options")  # v1alpha's Java/Go package names and deprecation
        return pool.Add(proto)


def v1_message_class(name: str) -> type[Message]:
    """A v1 reflection message class, e.g. 'ServerReflectionRequest'."""
    return message_factory.GetMessageClass(v1_file().message_types_by_name[name])


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection (v1 and v1alpha) listing `service_names` and itself."""
    v1_file()
    servicer = reflection.ReflectionServicer(
        (*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME)
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # The v1alpha messages parse and write v1's bytes unchanged (same fields and numbers).
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),)
    )
