"""``edgemeta site onboard``: a site that joins after training, with one command.

The command runs as the site would run it: its store is made from Omniglot's meta-test split
(classes no training site held), its model is made from the run's latest meta-model and written
to the run folder, Serve starts on an embedded node that advertises the site, and the first
request is answered at the site's own way in (the replica's server on the site's node).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from helpers import train_tiny_run

from experiments.cli import main as cli_main
from metalearn.data.store import load_store
from metalearn.site_models import site_model_path
from serve.store import ModelStore

pytestmark = pytest.mark.long


def test_onboard_makes_serves_and_times_a_new_sites_model(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run = train_tiny_run(tmp_path / "runs", "omni", "omniglot")
    store = tmp_path / "site-new-store"
    assert cli_main(["site", "onboard", str(run), "--site", "site-new", "--store",
                     str(store)]) == 2  # no store, and none asked for
    err = capsys.readouterr().err
    assert "no site store at" in err and "--shard test" in err
    assert cli_main(["site", "onboard", str(run), "--site", "site-new", "--store", str(store),
                     "--shard", "test", "--steps", "3", "--episodes", "4", "--port", "8651",
                     "--exit-after-first"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("onboarded omni@site-site-new"))
    first = float(line.split("first answer ")[1].split(" s")[0])
    written = float(line.split("model written at ")[1].split(" s")[0])
    assert 0 < written < first
    # answered at the site's own way in: the replica's server, not the head's port
    site_url = out.split("serving omni@site-site-new at ")[1].split()[0]
    assert site_url.startswith("http://127.0.0.1:") and not site_url.endswith(":8651")
    assert load_store(store).manifest.num_classes == 423  # the meta-test split, whole

    saved = torch.load(site_model_path(run, "site-new").path, weights_only=False)
    assert saved["onboarded"] and saved["round"] == 2 and saved["steps"] == 3
    scores = saved["scores"]
    assert {"before_accuracy", "after_accuracy", "site_before_accuracy",
            "site_after_accuracy"} <= set(scores)
    models = ModelStore([run], cache_size=0)
    site, meta = models.get("omni@site-site-new"), models.get("omni@2")
    assert any(not torch.equal(site.params[k], meta.params[k]) for k in meta.params)
    # the command stopped what it started: nothing listens at its port any more
    with pytest.raises(httpx.ConnectError):
        httpx.get("http://127.0.0.1:8651/healthz", timeout=5)
