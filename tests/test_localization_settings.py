"""The localization study's settings (benchmarks/localization_study.py) build the worlds and models the
README's table names: every setting resolves, and a setting over a spec file keeps the file's
relations with its own keys on top."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mechedit.world import WorldSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("localization_study", ROOT / "benchmarks" / "localization_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_setting_builds_its_world_and_model(study, tmp_path):
    for name, setting in study.SETTINGS.items():
        world = study.world_for(setting)
        mspec, _ = study.model_for(setting, tmp_path)
        assert world.train_facts and mspec.n_layers >= 2, name


def test_a_spec_file_with_overrides(study, tmp_path):
    setting = study.SETTINGS["first_last_1000_31m"]
    world = study.world_for(setting)
    large = WorldSpec.from_file(ROOT / "analyses" / "worlds" / "large.toml")
    assert world.spec.n_subjects == 1000 != large.n_subjects  # the setting's key over the file's
    assert world.spec.name_scheme == "first_last"
    assert [r.name for r in world.spec.relations] == [r.name for r in large.relations]  # the file's relations
    assert len({s.name.split()[-1] for s in world.subjects if s.kind == "subject"}) < 100  # last names shared
    mspec, tspec = study.model_for(setting, tmp_path)
    assert (mspec.n_layers, mspec.d_model, tspec.bf16) == (6, 256, True)
