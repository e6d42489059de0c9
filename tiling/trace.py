"""Trace a model once, with shapes: ``torch.fx``, then ``torch.export``, then fx with leaves.

``torch.fx`` fails on Python that needs values (iterating over a proxy, a traced size used in
``range``). ``torch.export`` records such models at ATen level, so it is tried next, with H, W and
the batch dynamic so that nothing in the graph is fixed to the example's sizes (tiles run on crops).
When both fail, a submodule whose ``forward`` cannot be traced becomes a leaf (one opaque node, so it
ends fusion and runs in the tail), and fx tracing is retried. Only when the root's own ``forward`` is
untraceable either way do we raise, naming the source line and pointing at ``upto=`` or
``leaf_modules=``.
"""

from __future__ import annotations

import copy
import operator
import traceback
from collections.abc import Iterable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.graph import CodeGen
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceFailure

MAX_LEAF_RETRIES = 32


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str], leaf_types: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def eval_copy(model: nn.Module) -> nn.Module:
    """A private eval-mode copy with in-place activations switched off.

    In-place ops would write through the views that tiles crop out of shared intermediate results;
    switching them off changes no value.
    """
    m = copy.deepcopy(model).eval()
    for sub in m.modules():
        if getattr(sub, "inplace", False) is True:
            sub.inplace = False
    return m


def trace(
    model: nn.Module,
    example: torch.Tensor,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
) -> tuple[fx.GraphModule, list[str]]:
    """Trace ``model`` (already an eval copy) and attach shapes to every node.

    Returns the graph module and the qualified names of submodules that had to become leaves.
    """
    names = {m for m in leaf_modules if isinstance(m, str)}
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    try:
        graph: fx.Graph | None = _LeafTracer(names, types).trace(model)
    except Exception:  # noqa: BLE001 - fx could not trace; try export, then leaves
        graph = None
    why = ""
    if graph is None and not names and not types:
        gm_export, why = export_graph(model, example)
        if gm_export is not None:
            _shape_prop(gm_export, example)
            return gm_export, []
    auto: list[str] = []
    by_id = {id(m): n for n, m in model.named_modules()}
    for _ in range(MAX_LEAF_RETRIES):
        if graph is not None:
            break
        tracer = _LeafTracer(names | set(auto), types)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:  # noqa: BLE001 - any trace failure is handled the same way
            culprit = _innermost_submodule(e, by_id)
            if culprit is None or culprit in auto:
                raise TraceFailure(_trace_message(e, why)) from e
            auto.append(culprit)
    else:
        raise TraceFailure(f"tracing still fails after making {len(auto)} submodules leaves: {auto}")
    assert graph is not None
    _functionalize(graph)
    gm = fx.GraphModule(model, graph)
    _shape_prop(gm, example)
    return gm, auto


def _shape_prop(gm: fx.GraphModule, example: torch.Tensor) -> None:
    try:
        ShapeProp(gm).propagate(example)
    except Exception as e:  # noqa: BLE001
        raise TraceFailure(
            f"running the traced model on the example failed ({type(e).__name__}: {e}); "
            f"check that the example has the shape the model expects"
        ) from e


def export_graph(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule | None, str]:
    """An ATen-level graph of ``model`` from ``torch.export``, sizes kept symbolic; or (None, why).

    The batch is traced at 2 (a batch of 1 would be specialised), H and W as ``Dim.AUTO`` so that a
    size the model reads stays a ``sym_size`` node rather than the example's number. The captured
    module's pytree calling convention is replaced by a plain one so that the graph can be cut
    into stages and a tail like any fx graph.
    """
    from torch.export import Dim, export

    x2 = example.expand(2, *example.shape[1:]).clone()
    dims = {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    try:
        ep = export(model, (x2,), dynamic_shapes=({k: v for k, v in dims.items()},), strict=False)
        gm = ep.module()
    except Exception as e:  # noqa: BLE001 - any export failure is reported the same way
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    assert isinstance(gm, fx.GraphModule)
    _plain_calling_convention(gm)
    return gm, ""


def _plain_calling_convention(gm: fx.GraphModule) -> None:
    """Drop guard and assertion nodes and give the graph fx's own codegen (outputs re-nested)."""
    graph = gm.graph
    out_spec = getattr(graph._codegen, "pytree_info", None)
    for node in list(graph.nodes):
        is_guard = node.op == "call_module" and str(node.target).startswith("_guards")
        is_assert = node.op == "call_function" and "assert" in str(getattr(node.target, "__name__", node.target))
        if (is_guard or is_assert) and not node.users:
            graph.erase_node(node)
    if out_spec is not None and out_spec.out_spec is not None:
        out = next(n for n in graph.nodes if n.op == "output")
        flat = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        out.args = (pytree.tree_unflatten(flat, out_spec.out_spec),)
    graph._codegen = CodeGen()
    for name in [n for n, _ in gm.named_children() if n.startswith("_guards")]:
        delattr(gm, name)
    gm.recompile()


def _innermost_submodule(err: BaseException, by_id: dict[int, str]) -> str | None:
    """Qualified name of the deepest non-root submodule whose ``forward`` is on the failing stack."""
    found: str | None = None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        me = frame.f_locals.get("self")
        if me is not None and frame.f_code.co_name == "forward":
            name = by_id.get(id(me))
            if name:  # '' is the root
                found = name
        tb = tb.tb_next
    return found


def _trace_message(err: BaseException, export_why: str = "") -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "torch/fx" not in f.filename
              and "torch/nn/modules/module.py" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return (
        f"torch.fx cannot trace the model's own forward{where} ({type(err).__name__}: {err}). "
        f"Move the untraceable code into a submodule (it then runs whole in the tail), pass "
        f"leaf_modules=[...] to keep a submodule opaque, or use upto= to stop fusion before it."
        + (f" torch.export could not capture it either ({export_why})." if export_why else "")
    )


def _functionalize(graph: fx.Graph) -> None:
    """Rewrite ``x.relu_()`` as ``y = x.relu()`` and point later readers of ``x`` at ``y``.

    fx records in-place methods as nodes whose mutation is invisible to the graph's edges; tiles
    crop views of shared values, so the mutation must become an explicit edge. Methods on views
    (whose mutation reaches the base tensor) are left alone and end fusion instead.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_method" or not str(node.target).endswith("_") or str(node.target).startswith("__"):
            continue
        base = node.args[0] if node.args else None
        if not isinstance(base, fx.Node) or base.op == "call_function" and base.target is operator.getitem:
            continue
        node.target = str(node.target)[:-1]
        for user in list(base.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(base, node)
