"""The Kubeflow trainer on many workers: the TFJob it creates (checked against the Training Operator's
schema), submit and wait against a stub Kubernetes API server, the replicas' entry point, and the
compiled pipeline's trainer task."""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError, TrainingError
from segpipe.pipeline import pipeline as dag
from segpipe.pipeline import tfjob
from segpipe.pipeline.config import load_config
from segpipe.pipeline.kubeflow import compile_pipeline, resolve_run_config

SCHEMA = yaml.safe_load((Path(__file__).parent / "data" / "tfjob_v1_schema.yaml").read_text())
NAMESPACE = "team-seg"
POD = "segpipe-run-trainer-abc"
IMAGE = "registry.example.com/segpipe:1.2.3"
TYPES = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}


def schema_errors(value: Any, schema: dict, path: str = "$") -> list[str]:
    """What the API server would reject, or prune as unknown, in `value` (the OpenAPI v3 subset the CRD uses)."""
    if "anyOf" in schema and all(schema_errors(value, option, path) for option in schema["anyOf"]):
        return [f"{path}: {value!r} matches none of {schema['anyOf']}"]
    kind = schema.get("type")
    if kind and (not isinstance(value, TYPES[kind]) or (kind == "integer" and isinstance(value, bool))):
        return [f"{path}: expected {kind}, got {type(value).__name__} {value!r}"]
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        return [f"{path}: {value!r} does not match {schema['pattern']}"]
    errors: list[str] = []
    if isinstance(value, dict):
        errors += [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{path}.{key}")
            elif properties is not None:
                errors.append(f"{path}.{key}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def tfjob_errors(job: dict) -> list[str]:
    """Schema errors plus the enums the operator's Go types define."""
    go = SCHEMA["goTypes"]
    errors = schema_errors(job, SCHEMA["openAPIV3Schema"])
    specs = job["spec"]["tfReplicaSpecs"]
    errors += [f"replica type {t!r}" for t in specs if t not in go["replicaTypes"]]
    errors += [f"{t}: restartPolicy {s.get('restartPolicy')!r}" for t, s in specs.items()
               if s.get("restartPolicy", "Always") not in go["restartPolicies"]]
    if job["spec"].get("runPolicy", {}).get("cleanPodPolicy", "") not in go["cleanPodPolicies"]:
        errors.append("cleanPodPolicy")
    return errors


class KubeStub:
    """A stand-in for the Kubernetes API on 127.0.0.1: this task's pod, and TFJobs.

    `statuses` are the job statuses served by successive GETs (the last one repeats); `on_create`
    runs on each accepted POST, as the operator's replicas would; `exists` makes POST answer 409.
    """

    def __init__(self, pod: dict) -> None:
        self.pod = pod
        self.requests: list[dict] = []
        self.statuses: list[dict] = [{}]
        self.on_create: Callable[[dict], None] | None = None
        self.exists = False
        self.forbidden: str | None = None  # POST answers 403 with this message
        self.job: dict | None = None

    def handle(self, method: str, path: str, body: Any) -> tuple[int, dict]:
        self.requests.append({"method": method, "path": path.split("?")[0], "body": body})
        jobs = f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/tfjobs"
        if method == "GET" and path == f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}":
            return 200, self.pod
        if method == "POST" and path.split("?")[0] == jobs:
            if self.forbidden:
                return 403, {"kind": "Status", "reason": "Forbidden", "code": 403, "message": self.forbidden}
            if self.exists:
                return 409, {"kind": "Status", "reason": "AlreadyExists", "code": 409}
            self.job, self.exists = body, True
            if self.on_create:
                self.on_create(body)
            return 201, body
        if path.split("?")[0].startswith(jobs + "/"):
            if method == "DELETE":
                self.exists = False
                return 200, {"kind": "Status", "status": "Success"}
            if not self.exists:
                return 404, {"kind": "Status", "reason": "NotFound", "code": 404}
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return 200, {**(self.job or {"metadata": {"name": path.rsplit("/", 1)[1]}}), "status": status}
        return 404, {"kind": "Status", "reason": "NotFound", "code": 404}

    def methods(self) -> list[str]:
        return [r["method"] for r in self.requests if "/tfjobs" in r["path"]]


def condition(kind: str, message: str = "") -> dict:
    return {"conditions": [{"type": "Created", "status": "True", "reason": "TFJobCreated"},
                           {"type": kind, "status": "True", "reason": f"TFJob{kind}", "message": message}]}


def task_pod(shared: Path, *, shared_volume: bool = True) -> dict:
    """A KFP v2 task pod: the root's volume (a PVC) and KFP's own scratch space (emptyDir)."""
    root_volume = {"persistentVolumeClaim": {"claimName": "segpipe-data"}} if shared_volume else {"emptyDir": {}}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD, "namespace": NAMESPACE},
        "spec": {
            "serviceAccountName": "pipeline-runner",
            "containers": [{"name": "main", "image": IMAGE, "volumeMounts": [
                {"name": "segpipe-root", "mountPath": str(shared)},
                {"name": "gcs-scratch", "mountPath": "/gcs"}]}],
            "volumes": [{"name": "segpipe-root", **root_volume}, {"name": "gcs-scratch", "emptyDir": {}}],
        },
    }


@pytest.fixture
def kube(tmp_path):
    """(stub, ApiClient) for a task pod whose root lives on a shared volume mounted at tmp_path/shared."""
    from kubernetes import client

    stub = KubeStub(task_pod(tmp_path / "shared"))

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            status, out = stub.handle(self.command, self.path, json.loads(raw) if raw else None)
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _reply

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_port}"
    api = client.ApiClient(configuration)
    try:
        yield stub, api
    finally:
        api.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


OVERRIDES = {
    "kubeflow.trainer_workers": 3,
    "kubeflow.accelerator_type": "nvidia.com/gpu",
    "kubeflow.accelerator_limit": 2,
    "kubeflow.gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
    "kubeflow.gpu_tolerations": ["nvidia.com/gpu:NoSchedule", "pool=gpu:NoExecute"],
}


def published(path: Path, kind: str, text: str) -> str:
    with artifacts.publish(path, kind, producer="test") as (tmp, _):
        (tmp / "content.txt").write_text(text)
    return str(path)


@pytest.fixture
def trainer_task(tmp_path):
    """What KFP hands the trainer task: the run's config JSON and its artifacts' local paths."""
    def make(**more: Any) -> tuple[str, dict]:
        overrides = {"root": str(tmp_path / "shared" / "root"), **OVERRIDES, **more}
        downloads = tmp_path / "gcs"  # KFP's copies in the task pod: no other pod sees them
        arguments = {
            "transformed_examples": published(downloads / "transformed_examples", artifacts.TRANSFORMED_EXAMPLES, "tx"),
            "transform_graph": published(downloads / "transform_graph", artifacts.TRANSFORM_GRAPH, "graph"),
            "plan": published(downloads / "plan", artifacts.PLAN, "plan"),
            "base_model": "",
            "model": str(downloads / "out" / "model"),
            "model_run": str(downloads / "out" / "model_run"),
        }
        return resolve_run_config(json.dumps(overrides), "auto", {}), arguments
    return make


def fake_trainer(calls: list[dict]) -> Callable[..., dict]:
    """execute_node in place of TensorFlow: records its call and publishes each output like the Trainer."""
    def execute_node(node, cfg, inputs, outputs, ctx):
        calls.append({"node": node.name, "distribution": cfg.train.distribution, "inputs": dict(inputs),
                      "outputs": dict(outputs), "scratch_dir": ctx.scratch_dir,
                      "staged_examples": (Path(inputs["transformed_examples_uri"]) / "content.txt").read_text()})
        for name, path in outputs.items():
            published(Path(path), artifacts.MODEL, f"{name} from {cfg.train.distribution}")
        return {"epochs": 2, "strategy": "MultiWorkerMirroredStrategy"}
    return execute_node


def test_success_runs_chief_and_workers_and_publishes_the_chiefs_outputs(kube, trainer_task, tmp_path, monkeypatch):
    stub, api = kube
    config, arguments = trainer_task()
    calls: list[dict] = []
    monkeypatch.setattr(dag, "execute_node", fake_trainer(calls))
    worker_outputs: list[dict] = []

    def operator(job: dict) -> None:
        # What the Training Operator does: every replica runs its command with its TF_CONFIG.
        command = job["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["python3", "-m", "segpipe.pipeline.tfjob"]
        cluster = {"chief": ["chief-0:2222"], "worker": ["worker-0:2222", "worker-1:2222"]}
        tfjob.run_replica(command[3], {"cluster": cluster, "task": {"type": "worker", "index": 1}})
        worker_outputs.append(calls[-1]["outputs"])
        tfjob.run_replica(command[3], {"cluster": cluster, "task": {"type": "chief", "index": 0}})

    stub.on_create = operator
    stub.statuses = [{}, condition("Running"), condition("Succeeded", "TFJob team-seg/x successfully completed.")]
    result = tfjob.run_trainer_tfjob(config, api_client=api, namespace=NAMESPACE, pod_name=POD, poll_seconds=0.01,
                                     **arguments)

    job = stub.job
    assert tfjob_errors(job) == []
    specs = job["spec"]["tfReplicaSpecs"]
    assert {kind: spec["replicas"] for kind, spec in specs.items()} == {"Chief": 1, "Worker": 2}
    for spec in specs.values():
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        assert container["name"] == SCHEMA["goTypes"]["defaultContainerName"]  # where the operator sets TF_CONFIG
        assert container["image"] == IMAGE  # the task pod's own image
        assert container["ports"] == [{"name": SCHEMA["goTypes"]["defaultPortName"], "containerPort": 2222}]
        assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"nvidia.com/gpu": "2"}}
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"}]
        assert pod["volumes"] == [{"name": "segpipe-root", "persistentVolumeClaim": {"claimName": "segpipe-data"}}]
        assert container["volumeMounts"] == [{"name": "segpipe-root", "mountPath": str(tmp_path / "shared")}]
        assert pod["serviceAccountName"] == "pipeline-runner"
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 1440 * 60

    # Both replicas trained on the staged copy under the shared root, with MultiWorkerMirroredStrategy.
    worker, chief = calls
    assert worker["distribution"] == chief["distribution"] == "multi_worker"
    staged = Path(chief["inputs"]["transformed_examples_uri"])
    assert (tmp_path / "shared" / "root" / tfjob.STAGING_DIR) in staged.parents and chief["staged_examples"] == "tx"
    assert chief["scratch_dir"] == worker["scratch_dir"] and str(tmp_path / "shared" / "root") in chief["scratch_dir"]
    # Only the chief wrote where the task reads; the worker's copies went to a temporary folder, removed.
    assert all(not Path(p).exists() and "segpipe-worker-" in p for p in worker_outputs[0].values())
    for name in ("model", "model_run"):
        assert (Path(arguments[name]) / "content.txt").read_text() == f"{name}_uri from multi_worker"
        assert artifacts.is_published(arguments[name])
    assert json.loads(result) == {"epochs": 2, "strategy": "MultiWorkerMirroredStrategy"}
    assert not (tmp_path / "shared" / "root" / tfjob.STAGING_DIR / job["metadata"]["name"]).exists()
    assert stub.methods()[0] == "POST" and stub.methods()[-1] == "DELETE"  # tfjob_cleanup: on_success


def test_failure_raises_the_conditions_message_and_keeps_the_job(kube, trainer_task, tmp_path):
    stub, api = kube
    config, arguments = trainer_task()
    message = "TFJob team-seg/segpipe-trainer is failed because 1 Worker replica(s) failed."
    stub.statuses = [condition("Running"), condition("Failed", message)]
    with pytest.raises(TrainingError, match=re.escape(message)):
        tfjob.run_trainer_tfjob(config, api_client=api, namespace=NAMESPACE, pod_name=POD, poll_seconds=0.01,
                                **arguments)
    assert "DELETE" not in stub.methods()  # a failed job's pods keep their logs
    assert stub.job["spec"]["runPolicy"]["cleanPodPolicy"] == "None"
    assert not Path(arguments["model"]).exists() and not Path(arguments["model_run"]).exists()


def test_timeout_fails_the_task_and_stops_the_job(kube, trainer_task):
    stub, api = kube
    config, arguments = trainer_task(**{"kubeflow.tfjob_timeout_minutes": 0.002})  # 0.12 s
    stub.statuses = [condition("Running")]
    with pytest.raises(TrainingError, match=r"not finished after 0.002 minutes .*last condition Running"):
        tfjob.run_trainer_tfjob(config, api_client=api, namespace=NAMESPACE, pod_name=POD, poll_seconds=0.02,
                                **arguments)
    assert stub.methods()[-1] == "DELETE"  # a running job would hold its GPUs until its deadline
    assert not Path(arguments["model"]).exists()


def test_a_retried_task_reattaches_to_its_running_job_and_replaces_a_finished_one(kube):
    stub, api = kube
    runner = tfjob.TFJobRunner(api, NAMESPACE, poll_seconds=0.01)
    manifest = {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": {"name": "segpipe-trainer-1"},
                "spec": {"tfReplicaSpecs": {}}}
    stub.exists, stub.statuses = True, [condition("Running")]
    runner.submit(manifest)
    assert stub.methods() == ["POST", "GET"]  # 409: the same execution's job is still running
    stub.requests.clear()
    stub.statuses = [condition("Failed", "earlier attempt")]
    runner.submit(manifest)
    assert stub.methods() == ["POST", "GET", "DELETE", "GET", "POST"]


def test_a_refused_submission_fails_in_one_line(kube, trainer_task, tmp_path):
    stub, api = kube
    config, arguments = trainer_task()
    stub.forbidden = 'tfjobs.kubeflow.org is forbidden: User "system:serviceaccount:team-seg:pipeline-runner" cannot create'
    with pytest.raises(TrainingError, match=r"^Kubernetes API refused to create TFJob team-seg/segpipe-trainer-\w+: "
                                            r"HTTP 403 Forbidden: tfjobs.kubeflow.org is forbidden"):
        tfjob.run_trainer_tfjob(config, api_client=api, namespace=NAMESPACE, pod_name=POD, **arguments)
    assert list((tmp_path / "shared" / "root" / tfjob.STAGING_DIR).iterdir()) == []  # the staged copies removed


def test_root_off_a_shared_volume_is_refused_naming_it(kube, trainer_task, tmp_path):
    stub, api = kube
    stub.pod = task_pod(tmp_path / "shared", shared_volume=False)
    config, arguments = trainer_task()
    with pytest.raises(BadInputError, match=r"root: .*shared/root is not on a volume"):
        tfjob.run_trainer_tfjob(config, api_client=api, namespace=NAMESPACE, pod_name=POD, **arguments)
    assert stub.methods() == []


def test_schema_check_catches_invented_fields_and_the_manifest_matches_the_workers():
    cfg = load_config(overrides={**OVERRIDES, "kubeflow.trainer_workers": 2, "kubeflow.tfjob_cleanup": "always"})
    job = tfjob.build_tfjob(name="segpipe-trainer-1", namespace=NAMESPACE, image=IMAGE, command=["true"],
                            kf=cfg.kubeflow, volumes=[], volume_mounts=[], service_account=None)
    assert tfjob_errors(job) == []
    assert job["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 1
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "All"
    job["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"]["containers"][0]["gpus"] = 2
    job["spec"]["tfReplicaSpecs"]["Chief"]["replicas"] = "1"
    assert tfjob_errors(job) == [
        "$.spec.tfReplicaSpecs.Chief.replicas: expected integer, got str '1'",
        "$.spec.tfReplicaSpecs.Chief.template.spec.containers[0].gpus: unknown field",
    ]
    vertex = load_config(overrides={**OVERRIDES, "kubeflow.accelerator_type": "NVIDIA_TESLA_T4"})
    with pytest.raises(BadInputError, match="kubeflow.accelerator_type: 'NVIDIA_TESLA_T4' is not a Kubernetes"):
        tfjob.replica_resources(vertex.kubeflow)


def test_compiled_trainer_task_submits_a_tfjob_from_a_cpu_pod(tmp_path):
    cfg = load_config(overrides={"root": str(tmp_path / "root"), **OVERRIDES, "kubeflow.trainer_workers": 2})
    path = compile_pipeline(cfg, str(tmp_path / "pipeline.yaml"), image=IMAGE)
    spec, *platform = list(yaml.safe_load_all(Path(path).read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert "exec-trainer" not in executors
    launcher = executors["exec-trainer-tfjob"]["container"]
    assert "run_trainer_tfjob(config" in " ".join(launcher["command"] + launcher.get("args", []))
    assert launcher["image"] == IMAGE
    assert "accelerator" not in launcher["resources"] and launcher["resources"]["cpuRequest"] == 1.0
    gpu_pool = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}
    assert "exec-trainer-tfjob" not in gpu_pool  # no node selector or tolerations: its replicas get them
    gate = next(c for name, c in spec["components"].items() if "trainer-tfjob" in c.get("dag", {}).get("tasks", {}))
    tasks = gate["dag"]["tasks"]
    assert "trainer-tfjob" in tasks["evaluator"]["dependentTasks"]  # downstream reads its model
    assert tasks["trainer-tfjob"]["taskInfo"]["name"] == "trainer"
    assert executors["exec-evaluator"]["container"]["resources"]["cpuRequest"] == 1.0


def test_the_chief_follows_tensorflows_convention():
    with_chief = {"chief": ["c:2222"], "worker": ["w0:2222"]}
    assert tfjob.is_chief({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    assert not tfjob.is_chief({"cluster": with_chief, "task": {"type": "worker", "index": 0}})
    workers_only = {"worker": ["w0:2222", "w1:2222"]}
    assert tfjob.is_chief({"cluster": workers_only, "task": {"type": "worker", "index": 0}})
    assert not tfjob.is_chief({"cluster": workers_only, "task": {"type": "worker", "index": 1}})
