"""A version's lineage as a small graph, drawn on the server as SVG.

Nodes: the version, its parents (``--from`` of train, the inputs of compose/merge methods,
recorded in ``lineage.parents``) and theirs, up to :data:`DEPTH` generations and
:data:`MAX_NODES` nodes, and the base at the root. Each stored version links to its page; a
parent that was removed since is drawn, unlinked, as such. Every text is escaped here:
the SVG is inserted into the page as markup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

from markupsafe import Markup, escape

from adaptr.errors import AdaptrError

if TYPE_CHECKING:
    from adaptr.registry import AdapterVersion, Registry

DEPTH = 6
MAX_NODES = 40
W, H, GAP_X, GAP_Y = 170, 34, 30, 56


@dataclass
class Node:
    key: str  # a ref, or "base:NAME"
    label: str
    kind: str  # "self" | "version" | "removed" | "base"
    detail: str = ""
    href: str | None = None
    level: int = 0


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # parent, child, label

    def svg(self) -> Markup:
        return _draw(self)


def version_href(ref: str) -> str:
    return "/v/" + quote(ref, safe="@")


def graph(registry: Registry, v: AdapterVersion) -> Graph:
    g = Graph()
    g.nodes[v.ref] = Node(v.ref, v.ref, "self", _method(v), version_href(v.ref), 0)
    frontier = [v]
    for level in range(1, DEPTH + 1):
        nxt = []
        for child in frontier:
            for parent in _parents(child):
                if parent not in g.nodes:
                    if len(g.nodes) >= MAX_NODES:
                        continue
                    try:
                        pv = registry.get(parent)
                    except AdaptrError:
                        g.nodes[parent] = Node(parent, parent, "removed", "removed", None, level)
                    else:
                        g.nodes[parent] = Node(parent, pv.ref, "version", _method(pv),
                                               version_href(pv.ref), level)  # fmt: skip
                        nxt.append(pv)
                label = _edge_label(child, parent)
                g.edges.append((parent, child.ref, label))
        frontier = nxt
        if not frontier:
            break
    roots = {k for k, n in g.nodes.items() if n.kind in ("self", "version")}
    roots -= {
        child for _, child, _ in g.edges if child in g.nodes and _has_version_parent(g, child)
    }
    if v.base:
        key = f"base:{v.base}"
        top = max(n.level for n in g.nodes.values()) + 1
        g.nodes[key] = Node(key, v.base, "base", "base", None, top)
        for r in sorted(roots):
            g.edges.append((key, r, ""))
    return g


def _has_version_parent(g: Graph, child: str) -> bool:
    return any(c == child and g.nodes[p].kind in ("version", "removed") for p, c, _ in g.edges)


def _parents(v: AdapterVersion) -> list[str]:
    parents = v.lineage.get("parents") or []
    return [str(p) for p in parents if isinstance(p, str)] if isinstance(parents, list) else []


def _method(v: AdapterVersion) -> str:
    lin = v.lineage
    method = (
        lin.get("combination") or lin.get("method") or ("added" if not lin.get("parents") else "")
    )
    return str(method)


def _edge_label(child: AdapterVersion, parent: str) -> str:
    weights = child.lineage.get("weights")
    parents = _parents(child)
    if isinstance(weights, list) and len(weights) == len(parents) and parent in parents:
        w = weights[parents.index(parent)]
        return f"×{w:g}" if isinstance(w, (int, float)) else ""
    return ""


def _clip(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _draw(g: Graph) -> Markup:
    """Levels top-down: the base on top, the version at the bottom; nodes in a row per level."""
    levels: dict[int, list[Node]] = {}
    for n in g.nodes.values():
        levels.setdefault(n.level, []).append(n)
    top = max(levels) if levels else 0
    width = max(len(row) for row in levels.values()) * (W + GAP_X) + GAP_X
    height = (top + 1) * (H + GAP_Y) + GAP_Y // 2
    pos: dict[str, tuple[int, int]] = {}
    for level, row in levels.items():
        row.sort(key=lambda n: n.key)
        offset = (width - len(row) * (W + GAP_X) + GAP_X) // 2
        for i, n in enumerate(row):
            pos[n.key] = (offset + i * (W + GAP_X), GAP_Y // 2 + (top - level) * (H + GAP_Y))
    parts = [
        f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="lineage">'
    ]
    for parent, child, label in g.edges:
        if parent in pos and child in pos:
            (x1, y1), (x2, y2) = pos[parent], pos[child]
            a, b = (x1 + W // 2, y1 + H), (x2 + W // 2, y2)
            parts.append(f'<line class="edge" x1="{a[0]}" y1="{a[1]}" x2="{b[0]}" y2="{b[1]}"/>')
            if label:
                mx, my = (a[0] + b[0]) // 2, (a[1] + b[1]) // 2
                parts.append(f'<text class="edge-label" x="{mx + 4}" y="{my}">{escape(label)}</text>')  # fmt: skip
    for n in g.nodes.values():
        x, y = pos[n.key]
        box = (
            f'<g class="node {n.kind}" data-ref="{escape(n.key)}"><title>{escape(n.key)}</title>'
            f'<rect x="{x}" y="{y}" width="{W}" height="{H}" rx="6"/>'
            f'<text x="{x + 8}" y="{y + 15}">{escape(_clip(n.label))}</text>'
            f'<text class="detail" x="{x + 8}" y="{y + 28}">{escape(_clip(n.detail, 28))}</text></g>'
        )
        if n.href and n.kind != "self":
            box = f'<a href="{escape(n.href)}">{box}</a>'
        parts.append(box)
    parts.append("</svg>")
    return Markup("".join(parts))
