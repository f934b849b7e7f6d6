"""What every InfluenceService RPC shares: request parsing that cannot fail, request ids,
and error statuses carrying google.rpc details.

The service is registered with parsers that never raise: a request larger than its method's
byte limit is refused before it is parsed (parsing and decoding 16 MB would hold the GIL for
tens of milliseconds, stalling every other request), and one that does not parse (e.g. a
string field holding invalid UTF-8, which gRPC would otherwise answer with INTERNAL and a
traceback) is named down to the field. Either way the servicer gets a RejectedRequest and
answers INVALID_ARGUMENT. Errors carry a `google.rpc.Status` in the trailers: BadRequest field
violations for INVALID_ARGUMENT, RetryInfo for RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from indexer.errors import InvalidInputError
from server.auth import HANDLER_FACTORIES
from server.logs import REQUEST_ID_KEY, request_scope

_LENGTH_DELIMITED = 2


class FieldError(InvalidInputError):
    """Bad input in one request field; `field` is its path, e.g. `queries[1].top_k`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RejectedRequest:
    """Stands in for a request refused before it was parsed; the servicer rejects it."""

    field: str  # path of the offending field; '' for the request as a whole
    message: str

    def error(self) -> FieldError:
        return FieldError(self.field, self.message)


def service_handler(
    service: ServiceDescriptor, servicer: object, max_request_bytes: Mapping[str, int]
) -> grpc.GenericRpcHandler:
    """The service's handlers (servicer methods by RPC name), with parsers that never raise.
    `max_request_bytes`: the largest request each named method takes (others: any)."""
    handlers = {}
    for method in service.methods:
        factory = HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        parser = _tolerant_parser(method.input_type, max_request_bytes.get(method.name))
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=parser,
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _tolerant_parser(
    descriptor: Descriptor, max_bytes: int | None
) -> Callable[[bytes], Message | RejectedRequest]:
    message_class = message_factory.GetMessageClass(descriptor)

    def parse(data: bytes) -> Message | RejectedRequest:
        if max_bytes is not None and len(data) > max_bytes:
            return RejectedRequest(
                "",
                f"the request is {len(data)} bytes, more than the {max_bytes} this server "
                "takes (--max-query-mb)",
            )
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            field = _invalid_utf8_field(descriptor, data)
            if field is not None:
                return RejectedRequest(field, f"{field} is not valid UTF-8")
            return RejectedRequest("", f"the request is not a valid {descriptor.full_name}: {exc}")

    return parse


def _invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first string field (nested messages included) whose bytes are not
    UTF-8; None if there is none or `data` is not even well-formed protobuf."""
    try:
        fields = UnknownFieldSet(Empty.FromString(data))
    except DecodeError:
        return None
    seen: dict[int, int] = {}
    for item in fields:
        field = descriptor.fields_by_number.get(item.field_number)
        if field is None or item.wire_type != _LENGTH_DELIMITED:
            continue
        index = seen.get(field.number, 0)
        seen[field.number] = index + 1
        path = prefix + field.name + (f"[{index}]" if field.is_repeated else "")
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                item.data.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = _invalid_utf8_field(field.message_type, item.data, path + ".")
            if found is not None:
                return found
    return None


@contextmanager
def rpc_scope(context: grpc.ServicerContext) -> Iterator[str]:
    """Run an RPC under its request id (the caller's x-request-id, or a new one), which the
    trailing metadata returns."""
    offered = dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY)
    with request_scope(offered) as request_id:
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        yield request_id


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    error: BaseException,
    *,
    request_id: str,
    retry_delay_s: float,
) -> NoReturn:
    """End the RPC with `code` and `message`, a google.rpc.Status with the details that fit
    the code in the trailers, and the request id. `retry_delay_s`: seconds, for RetryInfo."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = error.field if isinstance(error, FieldError) else ""
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_delay_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    rich = rpc_status.to_status(status)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id), *rich.trailing_metadata))
    context.abort(rich.code, rich.details)
