"""Tissue contours as GeoJSON (level-0 polygons with holes) that QuPath imports."""

from __future__ import annotations

import json

from shapely.affinity import scale
from shapely.geometry import Polygon, mapping


def tissue_geojson(polygons: list[Polygon], dx: float, dy: float, slide_id: str) -> dict:
    """FeatureCollection of level-0 polygons, classified as 'Tissue' for QuPath."""
    features = []
    for i, p in enumerate(polygons):
        p0 = scale(p, xfact=dx, yfact=dy, origin=(0, 0))
        features.append(
            {
                "type": "Feature",
                "id": f"{slide_id}-tissue-{i}",
                "geometry": mapping(p0),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [0, 160, 0]},
                    "slide_id": slide_id,
                    "area_px_level0": round(p0.area, 1),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def dumps(collection: dict) -> bytes:
    return json.dumps(collection, separators=(",", ":")).encode()
