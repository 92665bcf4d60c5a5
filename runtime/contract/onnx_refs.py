"""Which files outside itself an ONNX graph would make a runtime read: its external-data references.

An ONNX tensor may keep its values in *external data*, a file the graph names by a relative path.
onnxruntime and OpenVINO resolve that path against the working folder when a graph is loaded from
bytes, so a signed bundle whose graph names ``secret.bin`` would run weights that nobody signed.
imunet's graphs are far below protobuf's 2 GB limit and never need external data, so a bundle
refuses every graph that has any (:func:`external_data_refs`, called by the bundle loader).

The scan reads the protobuf wire format directly (the lean runtime has no ``onnx`` package) and
walks every place a tensor can sit: initializers, sparse initializers, node attributes (``t``,
``tensors``, ``sparse_tensor(s)``), subgraphs of control-flow nodes, model-local functions and
training graphs. It walks with an explicit stack, so a deeply nested graph cannot exhaust Python's
recursion limit, and stops at the first reference.
"""

from __future__ import annotations

# Field numbers of onnx.proto (checked against the onnx package's descriptors by a test): for each
# message, the fields that hold a message in which a tensor can sit, and that message's type.
MODEL, GRAPH, NODE, ATTRIBUTE, TENSOR, SPARSE, TRAINING, FUNCTION = range(8)
CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TRAINING: {1: GRAPH, 2: GRAPH},
    FUNCTION: {7: NODE, 11: ATTRIBUTE},
    TENSOR: {},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
DATA_LOCATION_EXTERNAL = 1
ENTRY_KEY, ENTRY_VALUE = 1, 2


class MalformedGraph(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedGraph("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """``(field number, wire type, value or (start, end))`` of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise MalformedGraph("a field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise MalformedGraph("a fixed-width field runs past the end of its message")
        else:  # groups (3, 4) are not used by onnx.proto; anything else is not protobuf
            raise MalformedGraph(f"unexpected wire type {wire}")


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8", "replace")


def _tensor_ref(buf: memoryview, start: int, end: int) -> str | None:
    """The external location a TensorProto names, or None when its data is inside the graph."""
    name, location, external = "", None, False
    for number, wire, value in _fields(buf, start, end):
        if number == TENSOR_NAME and wire == 2:
            name = _text(buf, value)
        elif number == TENSOR_DATA_LOCATION and wire == 0 and value == DATA_LOCATION_EXTERNAL:
            external = True
        elif number == TENSOR_EXTERNAL_DATA and wire == 2:
            external = True
            key, val = "", ""
            for n, w, v in _fields(buf, *value):
                if w == 2 and n == ENTRY_KEY:
                    key = _text(buf, v)
                elif w == 2 and n == ENTRY_VALUE:
                    val = _text(buf, v)
            if key == "location":
                location = val
    if not external:
        return None
    return f"tensor {name or '(unnamed)'!r} reads {location!r}" if location else f"tensor {name!r} has external data"


def external_data_refs(data: bytes, limit: int = 3) -> list[str]:
    """Up to ``limit`` descriptions of tensors in ONNX model bytes whose values live in another file.

    Raises :class:`MalformedGraph` for bytes that are not a protobuf message.
    """
    buf = memoryview(data)
    found: list[str] = []
    stack = [(MODEL, 0, len(buf))]
    while stack and len(found) < limit:
        kind, start, end = stack.pop()
        if kind == TENSOR:
            ref = _tensor_ref(buf, start, end)
            if ref:
                found.append(ref)
            continue
        children = CHILDREN[kind]
        for number, wire, value in _fields(buf, start, end):
            child = children.get(number)
            if child is not None and wire == 2:
                stack.append((child, *value))
    return found
