"""Shapes and activations per node, recorded by running the graph on real data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.fx as fx

from harden.errors import HardenError
from harden.graph.ops import canonical_op, op_spelling
from harden.graph.trace import module_path, output_node


@dataclass(frozen=True)
class NodeInfo:
    name: str
    module_path: str
    op: str | None          # canonical key, None when unknown
    spelling: str
    shape: tuple[int, ...] | None   # per-sample shape (batch dim dropped)
    is_site: bool


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and remembers each node's output shape; a failure names the node."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HardenError(f"running node {n.name!r} ({op_spelling(self.module, n)}) failed: {first}") from exc
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(result.shape[1:])
        return result


def describe(gm: fx.GraphModule, example: torch.Tensor) -> list[NodeInfo]:
    """Every computing node with its canonical op and per-sample output shape."""
    from harden.graph.ops import SITE_OPS

    recorder = _ShapeRecorder(gm)
    with torch.no_grad():
        recorder.run(example)
    infos = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = canonical_op(gm, node)
        infos.append(
            NodeInfo(
                name=node.name,
                module_path=module_path(node),
                op=key,
                spelling=op_spelling(gm, node),
                shape=recorder.shapes.get(node.name),
                is_site=key in SITE_OPS,
            )
        )
    return infos


def check_input_shape(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """A clear error when the data does not fit the model (wrong channels, size, class count)."""
    recorder = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            out = recorder.run(example)
    except HardenError as exc:
        raise HardenError(f"the data's input shape {tuple(example.shape[1:])} does not fit the model: {exc}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise HardenError(f"the model's output must be logits [N, K]; got shape {tuple(getattr(out, 'shape', ()))}")


def feature_extractor(gm: fx.GraphModule, names: Iterable[str]) -> fx.GraphModule:
    """A copy of ``gm`` that returns ``(logits, *activations of names)``; like torchvision's recipe."""
    names = list(names)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            logits = fx.map_arg(node.args[0], lambda n: env[n])
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        by_name[node.name] = env[node]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise HardenError(f"no node named {', '.join(missing)} in the model")
    graph.output((logits, *[by_name[n] for n in names]))
    return fx.GraphModule(gm, graph)


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


@torch.no_grad()
def collect(
    gm: fx.GraphModule,
    names: list[str],
    x: torch.Tensor,
    reduce: Callable[[str, torch.Tensor], torch.Tensor],
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """``reduce(name, activation)`` per batch, concatenated over batches (activations flattened per sample)."""
    extractor = feature_extractor(gm, names)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for chunk in batches(x, batch_size):
        _, *acts = extractor(chunk)
        for name, act in zip(names, acts):
            parts[name].append(reduce(name, act.flatten(1)))
    return {n: torch.cat(p) for n, p in parts.items()}


def output_name(gm: fx.GraphModule) -> str:
    return output_node(gm).args[0].name


_LAST_DIM_READERS = frozenset({"linear", "layer_norm"})


def channels_last(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when the node's features lie along its last dim: every reader (through identities such as eval
    dropout) is a linear layer or a layer norm, which act on the last dim (a transformer's tokens x features,
    ConvNeXt's permuted [N, H, W, C] block).  Methods that pool per channel then pool along the other dims."""
    readers, stack, seen = [], list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if canonical_op(gm, user) == "identity":
            stack.extend(user.users)
        else:
            readers.append(user)
    return bool(readers) and all(canonical_op(gm, r) in _LAST_DIM_READERS for r in readers)
