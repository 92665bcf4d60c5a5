"""The external-data scan the bundle loader runs on every graph: it must find a reference wherever
ONNX lets a tensor sit, agree with onnx.proto's field numbers, and never crash on hostile bytes."""

import numpy as np
import pytest

from imunet.runtime.contract.onnx_refs import (
    ATTRIBUTE,
    CHILDREN,
    FUNCTION,
    GRAPH,
    MODEL,
    NODE,
    SPARSE,
    TENSOR_DATA_LOCATION,
    TENSOR_EXTERNAL_DATA,
    TENSOR_NAME,
    TRAINING,
    MalformedGraph,
    external_data_refs,
)

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

PROTOS = {MODEL: "ModelProto", GRAPH: "GraphProto", NODE: "NodeProto", ATTRIBUTE: "AttributeProto",
          SPARSE: "SparseTensorProto", TRAINING: "TrainingInfoProto", FUNCTION: "FunctionProto"}  # fmt: skip


def test_field_numbers_are_onnx_protos():
    for kind, fields in CHILDREN.items():
        if kind not in PROTOS:
            continue
        desc = getattr(onnx, PROTOS[kind]).DESCRIPTOR
        holders = {f.number: f.message_type.name for f in desc.fields if f.message_type is not None}
        wanted = {n: t for n, t in holders.items() if t in (*PROTOS.values(), "TensorProto")}
        assert {n: t for n, t in wanted.items()} == {n: (PROTOS.get(c) or "TensorProto") for n, c in fields.items()}
    tensor = onnx.TensorProto.DESCRIPTOR.fields_by_name
    assert tensor["name"].number == TENSOR_NAME
    assert tensor["external_data"].number == TENSOR_EXTERNAL_DATA
    assert tensor["data_location"].number == TENSOR_DATA_LOCATION


def external(name="w", location="secret.bin"):
    t = numpy_helper.from_array(np.ones(4, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


def graph_with(nodes=(), initializer=(), sparse=(), name="g"):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    nodes = list(nodes) or [helper.make_node("Identity", ["x"], ["y"])]
    return helper.make_graph(nodes, name, [x], [y], initializer=list(initializer), sparse_initializer=list(sparse))


def model_bytes(graph, **kw):
    return helper.make_model(graph, **kw).SerializeToString()


def test_a_plain_graph_has_no_references():
    inline = numpy_helper.from_array(np.ones(4, np.float32), "w")
    assert external_data_refs(model_bytes(graph_with(initializer=[inline]))) == []


def test_found_wherever_a_tensor_can_sit():
    const = helper.make_node("Constant", [], ["c"], value=external("in_attribute"))
    sub = graph_with([helper.make_node("Identity", ["x"], ["y"])], initializer=[external("in_subgraph")], name="s")
    branch = helper.make_node("If", ["cond"], ["y"], then_branch=sub, else_branch=graph_with(name="e"))
    sparse = helper.make_sparse_tensor(external("values"), external("indices"), [8])
    func = helper.make_function("local", "f", ["a"], ["b"], [const], [helper.make_opsetid("", 17)])
    cases = {
        "initializer": model_bytes(graph_with(initializer=[external("init", "a/../b.bin")])),
        "attribute": model_bytes(graph_with([const])),
        "subgraph": model_bytes(graph_with([branch])),
        "sparse": model_bytes(graph_with(sparse=[sparse])),
        "function": model_bytes(graph_with(), functions=[func], opset_imports=[helper.make_opsetid("", 17)]),
    }
    for where, data in cases.items():
        refs = external_data_refs(data)
        assert refs and "reads '" in refs[0], where
    assert external_data_refs(cases["initializer"]) == ["tensor 'init' reads 'a/../b.bin'"]


def test_a_location_flag_without_a_file_name_still_counts():
    t = numpy_helper.from_array(np.ones(4, np.float32), "w")
    t.data_location = onnx.TensorProto.EXTERNAL
    assert external_data_refs(model_bytes(graph_with(initializer=[t]))) == ["tensor 'w' has external data"]


def _len(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_deeply_nested_subgraphs_neither_recurse_nor_hide_a_reference():
    """Graph -> node -> attribute -> graph ... 20,000 levels deep, a reference at the bottom."""
    inner = onnx.GraphProto(initializer=[external("deep")]).SerializeToString()
    levels = 20_000
    tags = [(0x0A, 0x2A, 0x32)]  # node (1), attribute (5), g (6): each length-delimited
    prefixes, size = [], len(inner)
    for _ in range(levels):
        for tag in reversed(tags[0]):
            prefix = bytes([tag]) + _len(size)
            prefixes.append(prefix)
            size += len(prefix)
    model = b"\x3a" + _len(size) + b"".join(reversed(prefixes)) + inner  # ModelProto.graph (7)
    assert external_data_refs(model) == ["tensor 'deep' reads 'secret.bin'"]


OVERLONG_VARINT = b"\x3a" + b"\x80" * 10 + b"\x01"


@pytest.mark.parametrize("data", [b"\x3a\xff", b"\x3a\x05ab", b"\x0f", OVERLONG_VARINT])
def test_malformed_bytes_are_an_error_not_a_crash(data):
    with pytest.raises(MalformedGraph):
        external_data_refs(data)
