"""Kubeflow Pipelines: the compiled YAML, submit/schedule against a local API stub, and a real
end-to-end run of the compiled definition with kfp.local's subprocess runner."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from segpipe.pipeline.cli import main
from segpipe.pipeline.config import load_config, with_overrides
from segpipe.pipeline.kubeflow import build_pipeline, check_component, compile_pipeline, normalize_cron, parse_toleration
from segpipe.pipeline.pipeline import Node, RUN_PARAMETERS, create_pipeline

IMAGE = "registry.example.com/segpipe:1.2.3"


@pytest.fixture
def gpu_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPIPE_MYSQL_PASSWORD", "hunter2-not-in-yaml")
    return load_config(overrides={
        "root": str(tmp_path / "root"),
        "metadata.mysql_host": "mysql.internal",
        "kubeflow.gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
        "kubeflow.gpu_tolerations": ["nvidia.com/gpu:NoSchedule", "pool=gpu:NoExecute"],
        "kubeflow.accelerator_type": "nvidia.com/gpu",
        "kubeflow.accelerator_limit": 2,
    })


def _compiled(cfg, path: Path) -> tuple[dict, dict, str]:
    compile_pipeline(cfg, str(path), image=IMAGE)
    text = path.read_text()
    spec, platform = list(yaml.safe_load_all(text))
    return spec, platform, text


def test_compiled_yaml_carries_image_gpu_tolerations_retries_and_parameters(gpu_cfg, tmp_path):
    spec, platform, text = _compiled(gpu_cfg, tmp_path / "pipeline.yaml")
    executors = spec["deploymentSpec"]["executors"]
    node_names = [n.name for n in create_pipeline(gpu_cfg)]
    assert {f"exec-{n.replace('_', '-')}" for n in node_names} | {"exec-make-config", "exec-new-data"} == set(executors)
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name  # nothing installed at run time
        assert container["resources"]["cpuRequest"] > 0 and container["resources"]["memoryRequest"] > 0, name
    trainer = executors["exec-trainer"]["container"]["resources"]
    assert trainer["accelerator"]["resourceType"] == "nvidia.com/gpu" and trainer["accelerator"]["resourceCount"] == "2"
    assert trainer["cpuRequest"] == 4.0
    assert "accelerator" not in executors["exec-transform"]["container"]["resources"]

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == {"exec-trainer"}  # only the trainer goes to the GPU pool
    assert k8s["exec-trainer"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert k8s["exec-trainer"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"},
    ]

    # Every step sits inside dsl.If(new data): the local runner's "no new data" rule, as the first task.
    root_tasks = spec["root"]["dag"]["tasks"]
    [gate] = [t for name, t in root_tasks.items() if name.startswith("condition-")]
    assert set(root_tasks) == {"make-config", "new-data", gate["taskInfo"]["name"]}
    assert "new-data-new" in gate["triggerPolicy"]["condition"]
    assert root_tasks["new-data"]["cachingOptions"] == {}  # reads the serving dir: never cached
    tasks = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert tasks["trainer"]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["trainer"]["retryPolicy"]["backoffDuration"] == "60s"
    assert tasks["trainer"]["cachingOptions"] == {"enableCache": True}
    assert tasks["latest-model"]["cachingOptions"] == {}  # resolvers read the serving dir: never cached
    assert set(tasks["transform"]["dependentTasks"]) >= {"example-validator", "example-gen", "schema-gen"}

    # The InfraValidator (a CPU task) runs when the Evaluator blessed; inside that, the Pusher when it blessed.
    [condition] = [t for name, t in tasks.items() if name.startswith("condition-")]
    assert "evaluator-blessed" in condition["triggerPolicy"]["condition"]
    gated = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    [inner] = [t for name, t in gated.items() if name.startswith("condition-")]
    assert set(gated) == {"infra-validator", inner["taskInfo"]["name"]}
    assert "infra-validator-blessed" in inner["triggerPolicy"]["condition"]
    assert list(spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]) == ["pusher"]
    assert "accelerator" not in executors["exec-infra-validator"]["container"]["resources"]

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"profile", *RUN_PARAMETERS}
    assert params["span"]["defaultValue"] == -1 and params["epochs"]["defaultValue"] == 0  # 0: not set, planned
    assert params["pixel_accuracy_threshold"]["parameterType"] == "NUMBER_DOUBLE"

    assert "hunter2-not-in-yaml" not in text
    assert "password" not in text.lower().replace("mysql_password_env", "")


def test_local_build_leaves_out_the_condition(gpu_cfg):
    local = build_pipeline(gpu_cfg, image=IMAGE, with_condition=False)
    spec = local.pipeline_spec
    assert "pusher" in spec.root.dag.tasks and "new-data" in spec.root.dag.tasks
    assert not any(name.startswith("condition-") for name in spec.root.dag.tasks)
    assert not spec.root.dag.tasks["pusher"].trigger_policy.condition


def test_bulk_inferrer_is_a_cpu_task_inside_the_pushers_conditions_when_enabled(gpu_cfg, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(gpu_cfg, bulk_inference=dataclasses.replace(gpu_cfg.bulk_inference, enabled=True))
    spec, platform, _ = _compiled(cfg, tmp_path / "pipeline.yaml")
    resources = spec["deploymentSpec"]["executors"]["exec-bulk-inferrer"]["container"]["resources"]
    assert resources["cpuRequest"] == 1.0 and "accelerator" not in resources
    assert "exec-bulk-inferrer" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    # Find the component holding the pusher: new data > evaluator blessed > infra validator blessed.
    components = spec["components"]
    [tasks] = [c["dag"]["tasks"] for c in components.values() if "pusher" in c.get("dag", {}).get("tasks", {})]
    [gate] = [t for name, t in tasks.items() if name.startswith("condition-")]
    assert set(tasks) == {"pusher", gate["taskInfo"]["name"]}
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--pusher-pushed'] == true"
    assert gate["inputs"]["artifacts"]["pipelinechannel--pusher-pushed_model"]["taskOutputArtifact"] == {
        "outputArtifactKey": "pushed_model", "producerTask": "pusher"}
    inner = components[gate["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["bulk-inferrer"]
    assert inner["bulk-inferrer"]["inputs"]["artifacts"] == {
        "examples": {"componentInputArtifact": "pipelinechannel--example-gen-examples"},
        "pushed_model": {"componentInputArtifact": "pipelinechannel--pusher-pushed_model"},
    }
    assert components["comp-bulk-inferrer"]["outputDefinitions"]["artifacts"]["inference_result"]
    # The pusher's `pushed` flag is what gates it.
    assert components["comp-pusher"]["outputDefinitions"]["parameters"]["pushed"]["parameterType"] == "BOOLEAN"


def test_component_signatures_must_match_their_nodes(gpu_cfg):
    from kfp import dsl

    from segpipe.pipeline import kubeflow

    trainer = {n.name: n for n in create_pipeline(gpu_cfg)}["trainer"]
    component = dsl.component(kubeflow.trainer, base_image=IMAGE, install_kfp_package=False)
    check_component(trainer, component)  # the real pair matches
    drifted = Node(trainer.name, trainer.fn, trainer.params, inputs=trainer.inputs,
                   outputs={**trainer.outputs, "extra_uri": "Model"})
    with pytest.raises(ValueError, match="do not match node trainer"):
        check_component(drifted, component)


def test_tolerations_and_cron_are_parsed_strictly():
    assert parse_toleration("dedicated=gpu:NoSchedule") == {
        "key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
    with pytest.raises(ValueError, match="key\\[=value\\]:Effect"):
        parse_toleration("nvidia.com/gpu")
    assert normalize_cron("0 3 * * *") == "0 0 3 * * *"
    assert normalize_cron("30 0 3 * * 1") == "30 0 3 * * 1"


# ------------------------------------------------------------------ submit / schedule against a stub


def test_submit_posts_the_compiled_run_with_token_and_parameters(kfp_stub_server, tmp_path, monkeypatch, capsys):
    url, requests, _ = kfp_stub_server
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "token-abc")
    code = main(["submit", "--host", url, "--namespace", "team-a", "--experiment", "nightly",
                 "--root", str(tmp_path), "--image", IMAGE, "--param", "span=3", "--param", "epochs=2"])
    assert code == 0
    assert "submitted run run-1" in capsys.readouterr().out
    [run] = [r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
    assert run["auth"] == "Bearer token-abc"
    assert run["body"]["experiment_id"] == "exp-1"
    assert run["body"]["runtime_config"]["parameters"] == {"span": 3, "epochs": 2}
    pipeline_spec = run["body"]["pipeline_spec"]["pipeline_spec"]
    assert pipeline_spec["deploymentSpec"]["executors"]["exec-trainer"]["container"]["image"] == IMAGE
    [experiment] = [r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/experiments"]
    assert experiment["body"] == {"display_name": "nightly", "namespace": "team-a"}


def test_schedule_creates_a_recurring_run(kfp_stub_server, tmp_path, capsys):
    url, requests, _ = kfp_stub_server
    code = main(["schedule", "--host", url, "--cron", "0 3 * * *", "--root", str(tmp_path), "--name", "retrain"])
    assert code == 0
    assert "scheduled recurring run recurring-1" in capsys.readouterr().out
    [made] = [r for r in requests if r["path"] == "/apis/v2beta1/recurringruns"]
    assert made["body"]["display_name"] == "retrain"
    assert made["body"]["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert made["body"]["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "segpipe"


def test_submit_reports_a_refusal_in_one_line(kfp_stub_server, tmp_path, capsys):
    url, _, refuse = kfp_stub_server
    refuse.append("/apis/v2beta1/runs")
    code = main(["submit", "--host", url, "--namespace", "x", "--root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [f"segpipe: Kubeflow Pipelines at {url} refused the request: HTTP 403 Forbidden"]


def test_submit_reports_an_unreachable_host_in_one_line(tmp_path, capsys):
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["submit", "--host", f"http://127.0.0.1:{port}", "--namespace", "x", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [  # one line: no urllib3 retry noise, no traceback
        f"segpipe: cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}: Connection refused"]


# ------------------------------------------------------------------ the compiled pipeline, really run


@pytest.mark.slow
def test_compiled_pipeline_runs_end_to_end_with_kfp_local(tmp_path, write_tiny_span, tiny_pipeline_overrides):
    from kfp import local

    root = tmp_path / "root"
    write_tiny_span(root / "data", 1, num=32, size=(32, 32))
    cfg = load_config(overrides=tiny_pipeline_overrides(root))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    pipeline = build_pipeline(cfg, with_condition=False)
    pipeline(root=str(root))

    serving = root / "serving"
    assert sorted(p.name for p in serving.iterdir() if not p.name.startswith(".")) == ["1"]
    info = json.loads((serving / "1" / "segpipe.json").read_text())
    assert info["spans"] == [1]
    assert Path(info["run_info"]["statistics_uri"]).is_relative_to(tmp_path / "kfp")
    assert (serving / "1" / "saved_model.pb").is_file() and (serving / "1" / "model.keras").is_file()
    blessing = next((tmp_path / "kfp").rglob("blessing/blessing.json"))
    assert json.loads(blessing.read_text())["blessed"] is True
    infra = next((tmp_path / "kfp").rglob("infra_blessing/infra_blessing.json"))
    assert json.loads(infra.read_text())["blessed"] is True and info["infra_validation"]["load_seconds"] > 0


def test_the_tuner_compiles_to_its_own_gpu_task_feeding_the_trainer(gpu_cfg, tmp_path):
    cfg = with_overrides(gpu_cfg, {"tuner.enabled": True})
    spec, platform, _ = _compiled(cfg, tmp_path / "pipeline.yaml")
    tuner = spec["deploymentSpec"]["executors"]["exec-tuner"]["container"]["resources"]
    assert tuner["accelerator"]["resourceCount"] == "2" and tuner["cpuRequest"] == 4.0  # the trainer's resources
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == {"exec-tuner", "exec-tuned-trainer"} and k8s["exec-tuner"] == k8s["exec-tuned-trainer"]
    [gate] = [t for name, t in spec["root"]["dag"]["tasks"].items() if name.startswith("condition-")]
    tasks = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert tasks["tuner"]["inputs"]["artifacts"]["plan"]["taskOutputArtifact"]["producerTask"] == "plan"
    trainer = tasks["tuned-trainer"]  # the trainer's variant with the tuner's input
    assert trainer["inputs"]["artifacts"]["hyperparameters"]["taskOutputArtifact"] == {
        "outputArtifactKey": "hyperparameters", "producerTask": "tuner"}
    assert "tuner" in trainer["dependentTasks"] and trainer["taskInfo"]["name"] == "trainer"
    off, _, _ = _compiled(gpu_cfg, tmp_path / "off.yaml")  # tuner.enabled false: no task, no input
    [gate] = [t for name, t in off["root"]["dag"]["tasks"].items() if name.startswith("condition-")]
    tasks = off["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert "tuner" not in tasks and "hyperparameters" not in tasks["trainer"]["inputs"]["artifacts"]
