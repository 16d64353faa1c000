"""Shared fixtures: a tiny seeded world and a tiny model trained on it once per test session."""
from __future__ import annotations

import os

# Tiny models gain nothing from a second thread, and on a loaded 2-core machine two OpenMP threads per
# process spin against each other (100x slower). Subprocesses (CLI tests) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from mechedit.model.checkpoint import load_checkpoint  # noqa: E402
from mechedit.model.pipeline import train_checkpoint
from mechedit.model.spec import PRESETS, TRAIN_PRESETS, with_overrides
from mechedit.world import generate_world, tiny_world_spec


@pytest.fixture(scope="session")
def tiny_world():
    return generate_world(tiny_world_spec())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_world):
    """Path of a checkpoint: 2-layer d_model 32 model trained to recall the tiny world."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    tspec = with_overrides(TRAIN_PRESETS["tiny"], max_epochs=150, target_recall=0.99)
    train_checkpoint(tiny_world, PRESETS["tiny"], tspec, out)
    return out


@pytest.fixture()
def tiny_bundle(tiny_checkpoint):
    """A fresh load of the tiny checkpoint (tests may edit it freely)."""
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_forget(tiny_world):
    """The forget target of the tests that need a retrained reference: every fact of the first trained subject."""
    from mechedit.unlearn import parse_forget

    subj = [s for s in tiny_world.subjects if s.kind == "subject" and not s.heldout][0]
    return parse_forget(tiny_world, f"subject:{subj.name}")


@pytest.fixture(scope="session")
def tiny_retrained(tiny_checkpoint, tiny_forget):
    """The tiny model retrained without `tiny_forget` (the real rule: same schedule, same stop epoch),
    cached beside the tiny checkpoint where every suite and CLI command of the session finds it."""
    from mechedit.diagnose.reference import retrained_reference

    return retrained_reference(load_checkpoint(tiny_checkpoint), tiny_forget)


def need(module: str):
    """Import an optional dependency; skip without it locally, but FAIL in CI (env CI set), where the
    test command installs every extra: a missing dependency must not turn a test into a silent skip."""
    import importlib
    import os as _os

    try:
        return importlib.import_module(module)
    except ImportError:
        if _os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI installs every extra (make test)")
        pytest.skip(f"{module} not installed")
