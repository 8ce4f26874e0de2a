"""Find the string field that holds invalid UTF-8 in a serialized protobuf message.

protobuf refuses to parse a message whose ``string`` field is not UTF-8, and says only that some
field was bad; gRPC then answers UNKNOWN. The router wants INVALID_ARGUMENT naming the field
(``text``, ``chat.messages[1].content``, ``sampling.stop[0]``), so on a parse failure it walks the
wire format with the message's descriptor and reports the first string that does not decode.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def find_invalid_utf8(descriptor: Descriptor, data: bytes) -> str | None:
    """Path of the first string field in ``data`` that is not UTF-8; None if none (or malformed)."""
    try:
        return _walk(descriptor, memoryview(data), "")
    except IndexError:  # truncated or otherwise malformed: nothing more precise to say
        return None


def _walk(descriptor: Descriptor, data: memoryview, prefix: str) -> str | None:
    seen: dict[int, int] = {}  # field number -> occurrences so far (index of repeated elements)
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise IndexError("length past the end")
            chunk, pos = data[pos : pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            path = prefix + field.name
            if field.is_repeated:
                path += f"[{seen.get(number, 0)}]"
                seen[number] = seen.get(number, 0) + 1
            found = _check(field, chunk, path)
            if found is not None:
                return found
        else:  # groups (deprecated, unused by pagewire's protos)
            return None
    return None


def _check(field: FieldDescriptor, chunk: memoryview, path: str) -> str | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            str(chunk, "utf-8")
        except UnicodeDecodeError:
            return path
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        return _walk(field.message_type, chunk, path + ".")
    return None


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
