"""Graph rewrites that make the student's graphs cheaper on a CPU: fewer, larger kernels for the same maths.

The exporter writes the DiT as plain ONNX ops (dit.py spells attention as matmul + softmax, GELU as its tanh
formula), about 500 nodes per student step, and a step then spends a third of its time outside the matrix
multiplies. Two rewrites, each matched on the exact pattern the exporter writes and left alone where it differs:

- GELU (tanh form, eight nodes) -> one `com.microsoft.FastGelu`, taking the preceding bias Add as its bias input;
- multi-head attention (reshape, transposes, two matmuls, scale, softmax, optional additive bias: ten nodes)
  -> one `com.microsoft.MultiHeadAttention` over the projected q, k, v [B, S, D]; an additive bias [B, 1, 1, L]
  is expanded once to the [B, 1, S, L] the operator takes.

Weights stay the initializers they were (the shared weights file deduplicates them and `bench` maps torch
parameters onto them by content). Both runtimes read these operators: onnxruntime natively, OpenVINO through its
ONNX frontend. The parity gate checks the rewritten graph against torch like any other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
GELU_C = 0.044715  # tanh-GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
GELU_K = math.sqrt(2.0 / math.pi)


@dataclass
class _Index:
    """Producer and consumers of every value name, and constant values, of one graph."""

    graph: onnx.GraphProto

    def __post_init__(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node, else None (also for weights stored outside the file)."""
        if name in self.inits:
            init = self.inits[name]
            if init.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(init)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, name: str, value: float, rtol: float = 1e-5) -> bool:
        c = self.const(name)
        return c is not None and c.size == 1 and bool(np.isclose(float(c.reshape(-1)[0]), value, rtol=rtol))

    def is_float_vector(self, name: str) -> bool:
        """An initializer of rank 1 in float32 (a bias)."""
        init = self.inits.get(name)
        return init is not None and len(init.dims) == 1 and init.data_type == onnx.TensorProto.FLOAT

    def only_used_by(self, name: str, nodes: list[onnx.NodeProto]) -> bool:
        ids = {id(n) for n in nodes}
        return name not in self.outputs and all(id(c) in ids for c in self.consumers.get(name, []))

    def by(self, name: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def perm(self, node: onnx.NodeProto) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of a binary node one of whose inputs is `name`."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _single(ix: _Index, name: str, op: str) -> onnx.NodeProto | None:
    cs = ix.consumers.get(name, [])
    return cs[0] if len(cs) == 1 and cs[0].op_type == op and name not in ix.outputs else None


def _match_gelu(ix: _Index, tanh: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto], str] | None:
    """Match x -> Pow 3 -> Mul c -> Add x -> Mul k -> Tanh -> Add 1 -> Mul 0.5 -> Mul x. Returns (x, nodes, y)."""
    m2 = ix.by(tanh.input[0], "Mul")
    if m2 is None:
        return None
    a1_name = next((i for i in m2.input if ix.by(i, "Add") is not None), None)
    if a1_name is None or not ix.scalar(_other(m2, a1_name) or "", GELU_K):
        return None
    a1 = ix.producer[a1_name]
    for x in a1.input:
        m1 = ix.by(_other(a1, x) or "", "Mul")
        if m1 is None:
            continue
        p_name = next((i for i in m1.input if ix.by(i, "Pow") is not None), None)
        if p_name is None or not ix.scalar(_other(m1, p_name) or "", GELU_C):
            continue
        p = ix.producer[p_name]
        if p.input[0] != x or not ix.scalar(p.input[1], 3.0):
            continue
        a2 = _single(ix, tanh.output[0], "Add")
        if a2 is None or not ix.scalar(_other(a2, tanh.output[0]) or "", 1.0):
            continue
        m3 = _single(ix, a2.output[0], "Mul")
        if m3 is None or not ix.scalar(_other(m3, a2.output[0]) or "", 0.5):
            continue
        y = _single(ix, m3.output[0], "Mul")
        if y is None or _other(y, m3.output[0]) != x:
            continue
        chain = [p, m1, a1, m2, tanh, a2, m3, y]
        inner = [p.output[0], m1.output[0], a1.output[0], m2.output[0], tanh.output[0], a2.output[0], m3.output[0]]
        if all(ix.only_used_by(n, chain) for n in inner):
            return x, chain, y.output[0]
    return None


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Replace every tanh-GELU chain by FastGelu; a 1-D constant bias added just before it becomes its bias."""
    ix = _Index(model.graph)
    drop: list[onnx.NodeProto] = []
    new: list[onnx.NodeProto] = []
    for node in list(model.graph.node):
        if node.op_type != "Tanh":
            continue
        m = _match_gelu(ix, node)
        if m is None:
            continue
        x, chain, y = m
        inputs = [x]
        add = ix.by(x, "Add")
        if add is not None and ix.only_used_by(x, chain):
            for i, b in enumerate(add.input):
                if ix.is_float_vector(b) and ix.producer.get(add.input[1 - i]):
                    inputs = [add.input[1 - i], b]
                    chain = [add, *chain]
                    break
        gelu = helper.make_node("FastGelu", inputs, [y], name=f"{y}__fast_gelu", domain=MS_DOMAIN)
        drop += chain
        new.append(gelu)
    _replace(model, drop, new)
    return len(new)


def _reshape_heads(ix: _Index, name: str, perm: list[int]) -> tuple[str, int] | None:
    """name = Transpose(Reshape(x3d, [.., S, h, dh]), perm): returns (x3d, h)."""
    tr = ix.by(name, "Transpose")
    if tr is None or ix.perm(tr) != perm:
        return None
    rs = ix.by(tr.input[0], "Reshape")
    if rs is None:
        return None
    shape = ix.const(rs.input[1])
    if shape is None or shape.size != 4 or shape[2] <= 0 or shape[3] <= 0:
        return None
    return rs.input[0], int(shape[2])


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace matmul-softmax-matmul attention over [B, h, S, dh] heads by MultiHeadAttention on [B, S, D]."""
    ix = _Index(model.graph)
    drop: list[onnx.NodeProto] = []
    new: list[onnx.NodeProto] = []
    expanded: dict[str, str] = {}
    fused = 0
    for sm in list(model.graph.node):
        if sm.op_type != "Softmax" or any(a.name == "axis" and a.i not in (-1, 3) for a in sm.attribute):
            continue
        pv = _single(ix, sm.output[0], "MatMul")
        if pv is None or pv.input[0] != sm.output[0]:
            continue
        out_t = _single(ix, pv.output[0], "Transpose")
        if out_t is None or ix.perm(out_t) != [0, 2, 1, 3]:
            continue
        out_r = _single(ix, out_t.output[0], "Reshape")
        oshape = ix.const(out_r.input[1]) if out_r is not None else None
        if out_r is None or oshape is None or oshape.size != 3:
            continue
        bias = None
        pre = ix.producer.get(sm.input[0])
        add = pre if pre is not None and pre.op_type == "Add" else None
        if add is not None:
            mul = next((ix.producer[i] for i in add.input if ix.by(i, "Mul") is not None), None)
            if mul is None:
                continue
            bias = _other(add, mul.output[0])
        else:
            mul = ix.by(sm.input[0], "Mul")
        if mul is None:
            continue
        qk = next((ix.producer[i] for i in mul.input if ix.by(i, "MatMul") is not None), None)
        if qk is None:
            continue
        scale = ix.const(_other(mul, qk.output[0]) or "")
        if scale is None or scale.size != 1:
            continue
        q = _reshape_heads(ix, qk.input[0], [0, 2, 1, 3])
        k = _reshape_heads(ix, qk.input[1], [0, 2, 3, 1])
        v = _reshape_heads(ix, pv.input[1], [0, 2, 1, 3])
        if q is None or k is None or v is None or not q[1] == k[1] == v[1]:
            continue
        # the head reshapes may be shared (the unrolled steps of a fused graph share the text's k and v): they go
        # when nothing else reads them
        chain = [n for n in (qk, mul, add, sm, pv, out_t) if n is not None] + [out_r]
        if not all(ix.only_used_by(o, chain) for n in chain[:-1] for o in n.output):
            continue
        inputs = [q[0], k[0], v[0], "", "", ""]
        if bias is not None:
            if bias not in expanded:
                expanded[bias], nodes, consts = _expand_bias(bias, q[0], k[0])
                new += nodes
                model.graph.initializer.extend(consts)
            inputs[5] = expanded[bias]
        else:
            inputs = inputs[:3]
        mha = helper.make_node(
            "MultiHeadAttention",
            inputs,
            [out_r.output[0]],
            name=f"{out_r.output[0]}__mha",
            domain=MS_DOMAIN,
            num_heads=q[1],
            scale=float(scale.reshape(-1)[0]),
        )
        drop += chain
        new.append(mha)
        fused += 1
    _replace(model, drop, new)
    return fused


def _expand_bias(bias: str, q: str, k: str) -> tuple[str, list[onnx.NodeProto], list[onnx.TensorProto]]:
    """An additive attention bias [B, 1, 1, L] broadcast to [B, 1, S, L] (S from q [B, S, D], L from k)."""
    name = f"{bias}__bnsl"
    shape_q, shape_k, s, ln, target = (f"{name}__{x}" for x in ("q_shape", "k_shape", "s", "l", "shape"))
    one, two = f"{name}__1", f"{name}__2"
    consts = [
        numpy_helper.from_array(np.array([1], np.int64), one),
        numpy_helper.from_array(np.array([2], np.int64), two),
    ]
    nodes = [
        helper.make_node("Shape", [q], [shape_q], name=f"{shape_q}__node"),
        helper.make_node("Shape", [k], [shape_k], name=f"{shape_k}__node"),
        helper.make_node("Slice", [shape_q, one, two], [s], name=f"{s}__node"),
        helper.make_node("Slice", [shape_k, one, two], [ln], name=f"{ln}__node"),
        helper.make_node("Concat", [one, one, s, ln], [target], name=f"{target}__node", axis=0),
        helper.make_node("Expand", [bias, target], [name], name=f"{name}__node"),
    ]
    return name, nodes, consts


def _replace(model: onnx.ModelProto, drop: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
    """Remove `drop` (nodes named by their first output), add `new`, and put the graph back in topological order."""
    if not new:
        return
    gone = {n.output[0] for n in drop}
    nodes = _live([n for n in model.graph.node if n.output[0] not in gone] + new, model.graph)
    del model.graph.node[:]
    model.graph.node.extend(_topological(model.graph, nodes))
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unused_initializers(model)


def _live(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes whose outputs something reads (repeatedly: a dead node's inputs may die with it)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in read for o in n.output)]
        if len(live) == len(nodes):
            return nodes
        nodes = live


def _topological(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's order, stable: among ready nodes the earliest in `nodes` goes first."""
    import heapq

    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting: dict[int, int] = {}
    users: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {producer[i] for i in n.input if i not in available and i in producer}
        waiting[k] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(k)
    ready = [k for k, w in waiting.items() if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for u in users.get(k, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("graph rewrite left a cycle or a dangling input")
    return order


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def fuse_for_cpu(model: onnx.ModelProto) -> dict[str, int]:
    """Apply every rewrite in place; returns how many of each were made."""
    return {"gelu": fuse_gelu(model), "attention": fuse_attention(model)}


def fused_for_cpu(graph: str) -> bool:
    """The bundle graphs the export rewrites: the student's (one step, and the fused γ-sampling loops)."""
    return graph == "student_step" or graph.startswith("fused_")


def fuse_file(path: Path) -> dict[str, int]:
    """Rewrite the model file at `path` in place (weights inside it or beside it); returns the counts."""
    model = onnx.load(str(path), load_external_data=False)
    counts = fuse_for_cpu(model)
    onnx.save_model(model, str(path))
    log.info("%s: fused %s", path.name, counts)
    return counts
