"""What an annotation carries, in Label Studio's result format: the labels people gave, and the
regions of Lookalike's own controls (queries and replies, never labels)."""

from __future__ import annotations

from typing import Any

OWN_CONTROL_PREFIX = "lookalike_"  # Lookalike's own controls in plugin_config.xml


def annotation_labels(annotation: dict[str, Any]) -> list[str]:
    """Every label an annotation's result carries (*labels / choices), but Lookalike's own."""
    labels: list[str] = []
    for region in annotation.get("result") or []:
        if str(region.get("from_name", "")).startswith(OWN_CONTROL_PREFIX):
            continue  # our own "find similar" tools are queries, not labels
        value = region.get("value") or {}
        for name, content in value.items():
            if (name.endswith("labels") or name == "choices") and isinstance(content, list):
                labels.extend(str(v) for v in content)
    return labels


def own_region_ids(result: list[dict[str, Any]]) -> set[str]:
    """Ids of the regions drawn with Lookalike's tools (and its reply), in an annotation."""
    return {
        str(item.get("id"))
        for item in result
        if isinstance(item, dict) and str(item.get("from_name", "")).startswith(OWN_CONTROL_PREFIX)
    }


def without_own_regions(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The annotation's result minus Lookalike's regions, including a user's label that was
    selected while a query box was drawn (it rides on the query's region id)."""
    own = own_region_ids(result)
    return [item for item in result if isinstance(item, dict) and str(item.get("id")) not in own]
