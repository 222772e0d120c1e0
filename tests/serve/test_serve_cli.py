"""`bayprano serve` as an operator runs it: a subprocess that joins a running Ray cluster (the test
session's) with --address, serves, and is stopped with SIGTERM; its config validation; and the application
builder that `serve deploy` imports."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from bayprano.cli import main
from bayprano.serve.registry import Registry

from serving_fixtures import free_port, good, png
from test_cli_data import BAYPRANO

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, checkpoint, make_site_model):
    reg, admin = Registry.init(tmp_path_factory.mktemp("serve-cli") / "registry", checkpoint=checkpoint)
    token = reg.add_site("plant-a")
    model = make_site_model("wood", 3)
    reg.publish("plant-a", model)
    return reg, token, model


def test_serve_refuses_bad_settings_before_starting_ray(tmp_path, registry, capsys):
    reg = registry[0]
    assert main(["serve", "--registry", str(tmp_path / "none")]) == 2
    assert "not a model registry" in capsys.readouterr().err
    bad = tmp_path / "serve.yaml"
    bad.write_text("max_models_per_replica: 0\n")
    assert main(["serve", "--registry", str(reg.root), "--config", str(bad)]) == 2
    assert "max_models_per_replica" in capsys.readouterr().err
    bad.write_text("replicas: 2\n")
    assert main(["serve", "--registry", str(reg.root), "--config", str(bad)]) == 2
    assert "unknown key 'replicas'" in capsys.readouterr().err
    assert main(["serve", "--registry", str(reg.root), "--min-replicas", "1"]) == 2
    assert "both min_replicas and max_replicas" in capsys.readouterr().err


def test_shipped_configs_are_valid(registry):
    from ray.serve.schema import ServeDeploySchema

    from bayprano.config import ServeConfig, load_yaml_config
    from bayprano.serve.app import build_app

    cfg = load_yaml_config(ROOT / "configs" / "serve.yaml", ServeConfig, {"registry": str(registry[0].root)})
    assert cfg.max_models_per_replica >= 1 and cfg.batching
    deploy = yaml.safe_load((ROOT / "configs" / "serve_deploy.yaml").read_text())
    schema = ServeDeploySchema.model_validate(deploy)
    app = schema.applications[0]
    assert app.import_path == "bayprano.serve.app:build_app"
    args = {**app.args, "registry": str(registry[0].root), "config": str(ROOT / "configs" / "serve.yaml")}
    assert build_app(args) is not None
    with pytest.raises(Exception, match="not a model registry"):
        build_app({**app.args})


def test_serve_command_serves_until_stopped(registry, tmp_path, ray_session):
    from ray import serve

    reg, token, model = registry
    address = ray_session.get_runtime_context().gcs_address
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"num_cpus": 0.2, "ingress_num_cpus": 0.1, "max_models_per_replica": 2,
                                      "port": 1}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([BAYPRANO, "serve", "--registry", str(reg.root), "--config", str(config), "--port",
                             str(port), "--address", address], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = requests.get(f"{url}/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy is still starting
                pass
            time.sleep(1)
        assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        image = good("wood", 40, 1)
        r = requests.post(f"{url}/v1/sites/plant-a/score", files=[("files", ("a.png", png(image[0]), "image/png"))],
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["score"] == pytest.approx(model.score(image, maps=False)[0].score, rel=1e-4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "bayprano" not in serve.status().applications  # it removed its application, nothing more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        serve.shutdown()  # the subprocess removed its application; Serve itself lives in the session's Ray
    text = (tmp_path / "serve.log").read_text()
    assert f"at http://127.0.0.1:{port}" in text and "stopping" in text
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
    assert r.json()["model_version"] == "v0001"
