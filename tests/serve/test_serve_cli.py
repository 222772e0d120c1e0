"""`bayprano serve` as an operator runs it: a subprocess that joins a running Ray cluster (the test
session's) with --address, serves, and is stopped with SIGTERM; its config validation; and the application
builder that `serve deploy` imports."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from bayprano.cli import main
from bayprano.serve.registry import Registry

from serving_fixtures import free_port, good, png
from waiting import poll, wait_until
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
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from bayprano.config import ServeConfig, load_yaml_config
    from bayprano.platform.errors import DataError
    from bayprano.serve.app import build_app, build_config, deployment_options

    cfg = load_yaml_config(ROOT / "configs" / "serve.yaml", ServeConfig, {"registry": str(registry[0].root)})
    assert cfg.max_models_per_replica >= 1 and cfg.batching and cfg.docs is False
    deploy = yaml.safe_load((ROOT / "configs" / "serve_deploy.yaml").read_text())
    schema = ServeDeploySchema.model_validate(deploy)
    app = schema.applications[0]
    assert app.import_path == "bayprano.serve.app:build_app"
    args = {**app.args, "registry": str(registry[0].root), "config": str(ROOT / "configs" / "serve.yaml")}
    assert isinstance(build_app(args), serve.Application)
    # what `serve deploy` would run: the settings and deployment options that build_app binds
    built = build_config(args)
    assert built.registry == registry[0].root and built.docs is False
    assert built.max_image_pixels == cfg.max_image_pixels and built.max_jpeg_scans == cfg.max_jpeg_scans
    options = deployment_options(built)
    assert options["Gateway"]["ray_actor_options"] == {"num_cpus": cfg.ingress_num_cpus}
    assert options["SiteModels"]["ray_actor_options"]["num_cpus"] == app.args["num_cpus"]
    scaling = options["SiteModels"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (app.args["min_replicas"], app.args["max_replicas"])
    assert "num_replicas" not in options["SiteModels"]  # autoscaling replaces a fixed count
    assert cfg.gateway_memory_budget < 2 * 1024**3  # the shipped limits bound the gateway to under 2 GiB
    with pytest.raises(DataError, match="not a model registry"):
        build_app({**app.args})


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> str:
    """'ours' once our server answers /readyz; 'taken' when something else answers on the port; 'exited' or
    'timeout' otherwise."""

    def state() -> str | None:
        if proc.poll() is not None:
            return "exited"
        try:
            r = requests.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200 and r.headers.get("X-Frame-Options") == "DENY" and r.json() == {"status": "ok"}:
                return "ours"
            # Serve's proxy answers 404 for a route whose application is still deploying, 503 while it starts
            if "X-Frame-Options" not in r.headers and r.status_code not in (404, 503):
                return "taken"
        except (requests.RequestException, ValueError):  # not listening yet, or the proxy is still starting
            pass
        return None

    return poll(state, timeout, every=1.0) or "timeout"


def test_serve_command_serves_until_stopped(registry, tmp_path, ray_session):
    from ray import serve

    reg, token, model = registry
    address = ray_session.get_runtime_context().gcs_address
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump({"num_cpus": 0.2, "ingress_num_cpus": 0.1, "max_models_per_replica": 2, "port": 1})
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = open(tmp_path / "serve.log", "w")
    for attempt in range(3):  # a free port can be taken by another process before the server binds it
        port = free_port()
        proc = subprocess.Popen(
            [
                BAYPRANO,
                "serve",
                "--registry",
                str(reg.root),
                "--config",
                str(config),
                "--port",
                str(port),
                "--address",
                address,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        ready = wait_ready(url, proc, timeout=240)
        if ready == "ours":
            break
        proc.kill()
        proc.wait(timeout=30)
        serve.shutdown()
    try:
        assert ready == "ours", f"not ready ({ready}): " + (tmp_path / "serve.log").read_text()[-3000:]
        image = good("wood", 40, 1)
        r = requests.post(
            f"{url}/v1/sites/plant-a/score",
            files=[("files", ("a.png", png(image[0]), "image/png"))],
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["score"] == pytest.approx(model.score(image, maps=False)[0].score, rel=1e-4)
        # /readyz can answer before `serve.run` has returned in the command: stop it once it says it serves
        wait_until(
            lambda: f"at http://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text(),
            "the serve command printed where it serves",
            timeout=120,
            every=0.5,
        )
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
