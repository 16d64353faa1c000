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


def _trained_tiny(tmp_path_factory, world, name: str, max_epochs: int):
    """Path of the tiny model trained on `world` (to recall 0.99, at most `max_epochs`)."""
    out = tmp_path_factory.mktemp("ckpt") / name
    tspec = with_overrides(TRAIN_PRESETS["tiny"], max_epochs=max_epochs, target_recall=0.99)
    train_checkpoint(world, PRESETS["tiny"], tspec, out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_world):
    """Path of a checkpoint: 2-layer d_model 32 model trained to recall the tiny world."""
    return _trained_tiny(tmp_path_factory, tiny_world, "tiny", 150)


@pytest.fixture()
def tiny_bundle(tiny_checkpoint):
    """A fresh load of the tiny checkpoint (tests may edit it freely)."""
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture()
def one_thread():
    """Torch on one thread for the test (tiny models run far faster so, especially on a shared 2-core
    machine), whatever OMP_NUM_THREADS says; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_bpe_world_spec():
    """The tiny world with a BPE tokenizer small enough that names and objects split into pieces."""
    import dataclasses

    return dataclasses.replace(tiny_world_spec(), tokenizer="bpe", bpe_vocab_size=150)


@pytest.fixture(scope="session")
def tiny_bpe_world():
    return generate_world(tiny_bpe_world_spec())


@pytest.fixture(scope="session")
def tiny_bpe_checkpoint(tmp_path_factory, tiny_bpe_world):
    """Path of a checkpoint: the tiny model trained on the tiny BPE world (several tokens per name)."""
    return _trained_tiny(tmp_path_factory, tiny_bpe_world, "tiny_bpe", 200)


@pytest.fixture()
def tiny_bpe_bundle(tiny_bpe_checkpoint):
    return load_checkpoint(tiny_bpe_checkpoint)


def render_in_chromium(index, tmp_path) -> dict | None:
    """Open a report in headless Chromium: {"errors": [...], "images": n, "broken": n, "shrunk": [...]}
    (figures shown smaller than their own size in a 1400 px window, every <details> open), or None without Chromium
    (on CI, where `make test` installs it, a missing Chromium fails the calling test)."""
    import json
    import shutil
    import subprocess

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: the test command installs it (make test)")
        return None
    probe = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e.target && e.target.src)); }, true);
var _ce = console.error; console.error = function () { window.__errors.push(Array.from(arguments).join(' ')); _ce.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.querySelectorAll('details').forEach(function (d) { d.open = true; });
  var shrunk = imgs.filter(function (i) { return i.getBoundingClientRect().width < i.naturalWidth - 1; })
                   .map(function (i) { return i.alt + ' ' + i.naturalWidth; });
  document.title = 'RESULT ' + JSON.stringify({errors: window.__errors, images: imgs.length, broken: bad, shrunk: shrunk});
});
</script>"""
    page = tmp_path / "probe.html"
    page.write_text(index.read_text().replace("<head>", "<head>" + probe, 1))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--window-size=1400,2000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    start = out.stdout.find("<title>RESULT ")
    assert start >= 0, out.stderr[-2000:]
    return json.loads(out.stdout[start + 14 : out.stdout.find("</title>", start)].replace("&quot;", '"'))


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
