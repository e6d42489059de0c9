"""Split fused groups at reduce points into stages that share the group's grid.

A map that reads a value computed from a reduce point can only run once every tile has contributed
its partial, so it runs one *phase* later than the map that was reduced. Within a group (one grid)
the phases become consecutive stages; tile ``i`` of a later phase continues from tile ``i`` of the
earlier ones, on the same boxes, so no map crosses between tiles: only the partials do. Whole values
(the squeeze-excitation MLP, sizes) are recomputed by every stage that reads them.

    x -> conv -> X --mean--> [partials] --combine--> fc -> sigmoid = g
                 X ----------------------------------------------> X * g -> conv -> ...
         |------------- stage k (phase p) -------|   |------- stage k+1 (phase p+1) -------|
"""

from __future__ import annotations

from .fusion import Fusion, StageNodes, group_outputs


def levels(fusion: Fusion) -> tuple[dict[str, int], dict[str, int]]:
    """Phase of every map and reduce node, and from which phase each whole value is available."""
    lvl: dict[str, int] = {fusion.input_name: 0}
    avail: dict[str, int] = {}
    for n, s in fusion.specs.items():
        if s.kind == "reduce":
            lvl[n] = lvl[s.inputs[0]]
            avail[n] = lvl[n] + 1
        elif not s.is_map:
            avail[n] = max((avail[g] for g in s.globals_in), default=0)
        else:
            lvl[n] = max([lvl[i] for i in s.inputs] + [avail[g] for g in s.globals_in], default=0)
    return lvl, avail


def _values_needed(fusion: Fusion, nodes: list[str]) -> tuple[set[str], list[str]]:
    """Whole values the nodes read (transitively), and the reduce points among them."""
    need: set[str] = set()
    reduced: list[str] = []
    stack = [g for n in nodes for g in fusion.specs[n].globals_in]
    while stack:
        g = stack.pop()
        if g in need or g in reduced:
            continue
        if fusion.specs[g].kind == "reduce":
            reduced.append(g)
            continue
        need.add(g)
        stack.extend(fusion.specs[g].globals_in)
    order = list(fusion.specs)
    return need, sorted(reduced, key=order.index)


def split_phases(fusion: Fusion, groups: list[StageNodes]) -> list[StageNodes]:
    """Stages in execution order: each group's phases, one stage per phase."""
    lvl, _ = levels(fusion)
    order = {n: i for i, n in enumerate(fusion.specs)}
    stages: list[StageNodes] = []
    for g in groups:
        members = [n for n in g.nodes if fusion.specs[n].is_map or fusion.specs[n].kind == "reduce"]
        for p in sorted({lvl[n] for n in members}):
            nodes = [n for n in members if lvl[n] == p]
            values, reduced = _values_needed(fusion, nodes)
            run = sorted([*nodes, *values], key=order.__getitem__)
            inside = set(nodes)
            inputs: list[str] = []
            for n in nodes:
                inputs += [i for i in fusion.specs[n].inputs if i not in inside and i not in inputs]
            reduces = [n for n in nodes if fusion.specs[n].kind == "reduce"]
            stages.append(StageNodes(run, inputs, [], g.layers, g.group, reduces, reduced))
    made: dict[str, int] = {}
    for k, st in enumerate(stages):
        for n in st.nodes:
            if fusion.specs[n].is_map:
                made[n] = k
    for k, st in enumerate(stages):
        st.outputs = group_outputs(fusion, {n for n in st.nodes if fusion.specs[n].is_map})
        st.pinned = {i: made[i] for i in st.inputs if i in made and stages[made[i]].group == st.group}
    return stages
