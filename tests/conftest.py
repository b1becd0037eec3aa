"""Shared test fixtures: where ../shared is, and skipping when it is absent."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BPNET_SHARED", REPO.parent / "shared"))
COCO_TINY = SHARED / "data" / "coco_tiny"
COCO_VAL_ANN = SHARED / "data" / "coco_val_annotations" / "person_keypoints_val2017_part_a.json"
TFPOSE_PB = SHARED / "models" / "tfpose_mobilenet_thin" / "graph_opt.pb"
SHARED_IMAGES = SHARED / "data" / "images"
DEMO_VIDEO = SHARED / "data" / "video" / "demo.mp4"


def need(path: Path):
    """Skip the calling test unless ``path`` (something under ../shared) exists."""
    if not path.exists():
        pytest.skip(f"needs {path} (the ../shared folder beside the checkout is absent)")
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
