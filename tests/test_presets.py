"""Every preset in configs/ builds a valid config, and every arch has one."""

from pathlib import Path

import pytest

from saelab import config as C
from saelab import fields as F
from saelab.archs import ARCHS, TRAINABLE

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_builds(path):
    cls = C.HarvestConfig if path.stem.startswith("harvest") else C.TrainConfig
    cfg = F.build(cls, path, {})
    if cls is C.TrainConfig:
        for s in cfg.sweep or [cfg.sae]:
            assert s.arch in ARCHS


def test_every_trainable_arch_has_a_preset():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(TRAINABLE)
