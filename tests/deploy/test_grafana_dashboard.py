"""deploy/grafana/pagewire-dashboard.json queries only the metrics pagewire exports.

deploy/grafana/metrics.txt is the list of metric names the services promise (vLLM's names with
a ``pagewire:`` prefix); every dashboard query is read token by token, and every metric it names
must be on that list, so a renamed metric cannot leave a silently empty panel behind.
"""

from __future__ import annotations

import json
import re
from typing import Any

from k8s_manifests import REPO

GRAFANA = REPO / "deploy" / "grafana"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# PromQL words that are not metric names: aggregations, functions, operators' keywords.
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "topk", "bottomk", "quantile", "rate", "irate",
    "increase", "delta", "histogram_quantile", "clamp_min", "clamp_max", "abs", "vector",
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset",
}  # fmt: skip


def metric_list() -> list[str]:
    return (GRAFANA / "metrics.txt").read_text().split()


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "pagewire-dashboard.json").read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers,
    ranges, grouping clauses, numbers and function calls are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", expr)
    words = re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr)
    return {w[1] for w in words if w[2] is None and w[1] not in PROMQL_WORDS}


def listed(name: str, allowed: set[str]) -> bool:
    """``name`` is on the list, or is a histogram's series (counters end in _total: no series)."""
    if name in allowed:
        return True
    base = next((name.removesuffix(s) for s in HISTOGRAM_SERIES if name.endswith(s)), None)
    return base is not None and base in allowed and not base.endswith("_total")


def test_metric_list_is_pagewire_names_once_each() -> None:
    names = metric_list()
    assert names and len(names) == len(set(names))
    assert all(re.fullmatch(r"pagewire:[a-z0-9_]+", n) for n in names), names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, worker_id) (rate(pagewire:x_bucket{a=~"$m"}[5m])))'
        " / on (le) group_left sum(up) > bool 1e3"
    )
    assert metric_names(expr) == {"pagewire:x_bucket", "up"}


def test_every_query_uses_only_listed_metrics() -> None:
    allowed = set(metric_list())
    for expr in exprs():
        names = metric_names(expr)
        assert names, f"no metric in {expr}"
        unknown = sorted(n for n in names if not listed(n, allowed))
        assert not unknown, f"{unknown} not in metrics.txt: {expr}"


def test_every_listed_metric_has_a_panel() -> None:
    used = {n for expr in exprs() for n in metric_names(expr)}
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used} | used
    assert sorted(set(metric_list()) - bases) == []


def test_quantiles_are_taken_over_buckets_by_le() -> None:
    for expr in exprs():
        for call in re.findall(r"histogram_quantile\((.*)", expr):
            assert "_bucket" in call and re.search(r"by \(le\b", call), expr


def test_queries_go_to_the_chosen_prometheus() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels():
        sources = [p["datasource"], *(t["datasource"] for t in p["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), p["title"]


def test_every_selector_follows_the_model_variable() -> None:
    for expr in exprs():
        selectors = re.findall(r"pagewire:[a-z0-9_]+(\{[^}]*\})?", expr)
        assert selectors and all('model_name=~"$model_name"' in m for m in selectors), expr


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    every = dashboard()["panels"]
    assert len({p["id"] for p in every}) == len(every)
    cells: set[tuple[int, int]] = set()
    for p in every:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
