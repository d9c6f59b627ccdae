"""The Kubeflow trainer on many workers: one KFP task that runs the Trainer as a Training Operator TFJob.

KFP v2 tasks are single pods and set no `TF_CONFIG`. With `kubeflow.trainer_workers: N > 1` the
trainer's task (a CPU pod) instead:

1. stages what the replicas read on the shared volume that holds `root` (KFP downloads input
   artifacts into the task pod's own scratch space, which other pods cannot see): the inputs are
   copied to `<root>/.tfjobs/<job>/inputs/`, and a `replica.json` names them, the outputs
   `<root>/.tfjobs/<job>/outputs/` and the run's config;
2. creates a `TFJob` (kubeflow.org/v1): Chief x 1 + Worker x N-1, the task pod's own image,
   service account and root volumes, the trainer's resources on every replica (`build_tfjob`, a
   pure function), each running `python3 -m segpipe.pipeline.tfjob replica.json` (`run_replica`):
   the same `execute_node` call as the in-pod trainer, with `train.distribution: multi_worker`
   (MultiWorkerMirroredStrategy reads the `TF_CONFIG` the operator sets). Only the chief writes the
   staged outputs; the workers' copies go to a temporary folder of their own pod;
3. waits for the job's Succeeded or Failed condition (`kubeflow.tfjob_timeout_minutes`, which is
   also the job's `activeDeadlineSeconds`), copies the chief's published outputs into the task's
   output artifacts, so KFP uploads them as the in-pod trainer's, and deletes the job per
   `kubeflow.tfjob_cleanup`. A failed job fails the task with the job's condition message.

The job is named after the trainer's execution key, so a retried task (its pod preempted)
re-attaches to a job still running instead of starting a second one.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from segpipe.components.core import artifacts
from segpipe.components.core.errors import BadInputError, TrainingError
from segpipe.pipeline.config import KubeflowConfig, SegpipeConfig, with_overrides

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "tfjobs", "TFJob"
CHIEF, WORKER = "Chief", "Worker"  # TFJob replica types
CONTAINER = "tensorflow"  # the operator sets TF_CONFIG and the port in the container of this name
PORT = 2222  # the operator's default TFJob port
TASK_CONTAINER = "main"  # the KFP v2 task pod's user container
STAGING_DIR = ".tfjobs"  # under the root: what the replicas read and the chief writes
SPEC_FILE = "replica.json"
RESULT_FILE = "result.json"
POLL_SECONDS = 15.0
TRANSIENT_ERRORS = (ApiException, HTTPError, ConnectionError)  # is_transient decides among them
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Volume kinds that live on one pod or node: a root there is invisible to the other replicas.
POD_LOCAL_VOLUMES = ("emptyDir", "configMap", "secret", "projected", "downwardAPI", "ephemeral", "hostPath")


# ------------------------------------------------------------------ the manifest


def job_name(execution_key: str) -> str:
    """A DNS-1123 name from the trainer's execution key: the same inputs and parameters, the same job."""
    return f"segpipe-trainer-{execution_key[:12]}"


def replica_resources(kf: KubeflowConfig) -> dict[str, Any]:
    """The in-pod trainer's requests (`trainer_cpu_request` / `trainer_memory_request`) and its GPUs as a limit."""
    resources: dict[str, Any] = {"requests": {"cpu": kf.trainer_cpu_request, "memory": kf.trainer_memory_request}}
    if kf.accelerator_type and kf.accelerator_limit > 0:
        if "/" not in kf.accelerator_type:  # KFP maps e.g. NVIDIA_TESLA_T4 itself; a pod needs a resource name
            raise BadInputError(f"kubeflow.accelerator_type: {kf.accelerator_type!r} is not a Kubernetes resource "
                                "name such as nvidia.com/gpu, which the TFJob's replicas request")
        resources["limits"] = {kf.accelerator_type: str(kf.accelerator_limit)}
    return resources


def build_tfjob(
    *,
    name: str,
    namespace: str,
    image: str,
    command: list[str],
    kf: KubeflowConfig,
    volumes: list[dict[str, Any]],
    volume_mounts: list[dict[str, Any]],
    service_account: str | None,
) -> dict[str, Any]:
    """The TFJob object: Chief x 1 + Worker x (kf.trainer_workers - 1), every replica the same pod."""
    from segpipe.pipeline.kubeflow import parse_toleration

    container = {
        "name": CONTAINER,
        "image": image,
        "command": list(command),
        "ports": [{"name": "tfjob-port", "containerPort": PORT}],
        "resources": replica_resources(kf),
        "volumeMounts": volume_mounts,
    }
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if kf.gpu_node_selector:
        pod_spec["nodeSelector"] = dict(kf.gpu_node_selector)
    if kf.gpu_tolerations:
        pod_spec["tolerations"] = [{k: v for k, v in parse_toleration(t).items() if v is not None}
                                   for t in kf.gpu_tolerations]
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    template = {
        # An Istio sidecar never exits, so a replica pod with one would never complete.
        "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": pod_spec,
    }

    def replica(count: int) -> dict[str, Any]:
        # ExitCode: a preempted or killed replica (exit 128 + signal) restarts and resumes from the
        # trainer's backups; an error exit (1-127, e.g. bad input) fails the job at once.
        return {"replicas": count, "restartPolicy": "ExitCode", "template": copy.deepcopy(template)}

    specs = {CHIEF: replica(1)}
    if kf.trainer_workers > 1:
        specs[WORKER] = replica(kf.trainer_workers - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "segpipe"}},
        "spec": {
            "runPolicy": {
                # Keep a failed job's pods (and their logs) unless the job is deleted anyway.
                "cleanPodPolicy": "All" if kf.tfjob_cleanup == "always" else "None",
                "backoffLimit": kf.retries,
                # The operator stops the job even when this task's pod is gone.
                "activeDeadlineSeconds": max(1, int(kf.tfjob_timeout_minutes * 60)),
            },
            "tfReplicaSpecs": specs,
        },
    }


def finished_condition(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The job's true Succeeded or Failed condition (the latest), or None while it runs."""
    conditions = (job.get("status") or {}).get("conditions") or []
    done = [c for c in conditions if c.get("type") in ("Succeeded", "Failed") and c.get("status") == "True"]
    return done[-1] if done else None


def last_condition(job: Mapping[str, Any]) -> str:
    """The job's latest condition as `Type: message`, for logs and errors."""
    conditions = (job.get("status") or {}).get("conditions") or []
    if not conditions:
        return "no status yet"
    last = conditions[-1]
    return f"{last.get('type')}: {last.get('message') or last.get('reason') or ''}".rstrip(": ")


# ------------------------------------------------------------------ the task pod and its shared volumes


def shared_mounts(pod: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(volumeMount, volume) pairs of the task container that other pods can mount too."""
    spec = pod["spec"]
    containers = spec["containers"]
    main = next((c for c in containers if c["name"] == TASK_CONTAINER), containers[0])
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    pairs = []
    for mount in main.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is not None and not any(kind in volume for kind in POD_LOCAL_VOLUMES):
            pairs.append((mount, volume))
    return pairs


def covering_mount(path: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any] | None:
    """The shared mount that holds `path`, if any."""
    target = Path(os.path.abspath(path))
    for mount, _ in pairs:
        where = Path(mount["mountPath"])
        if target == where or where in target.parents:
            return mount
    return None


def refusal(exc: ApiException, doing: str) -> TrainingError:
    """One line for a refused request: what was asked, the HTTP status and the API server's message."""
    try:
        message = json.loads(exc.body or "{}").get("message") or ""
    except ValueError:
        message = ""
    return TrainingError(f"Kubernetes API refused to {doing}: HTTP {exc.status} {exc.reason or ''}"
                         f"{': ' + message if message else ''}")


def task_pod(core: Any, namespace: str, pod_name: str) -> dict[str, Any]:
    """This task's pod as a plain dict (camelCase, as the API serves it)."""
    try:
        pod = core.read_namespaced_pod(name=pod_name, namespace=namespace)
    except ApiException as exc:
        raise refusal(exc, f"read this task's pod {namespace}/{pod_name}") from None
    return core.api_client.sanitize_for_serialization(pod)


def stage_inputs(inputs: Mapping[str, str | None], staging: Path,
                 pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, str | None]:
    """Inputs on a shared volume as they are; the others (KFP's downloads) copied under `staging`."""
    staged: dict[str, str | None] = {}
    for name, path in inputs.items():
        if path is None or covering_mount(path, pairs) is not None:
            staged[name] = path
            continue
        target = staging / "inputs" / name
        if not artifacts.is_published(target):
            with artifacts.atomic_dir(target, replace=True) as tmp:
                shutil.copytree(path, tmp, dirs_exist_ok=True)
        staged[name] = str(target)
    return staged


def copy_artifact(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A published artifact copied to another path, appearing complete or not at all."""
    if not artifacts.is_published(source):
        raise TrainingError(f"{source}: the TFJob succeeded but its chief published no artifact there")
    with artifacts.atomic_dir(target, replace=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


# ------------------------------------------------------------------ submit and wait


class TFJobRunner:
    """Create, watch and delete one TFJob through the Kubernetes API (the kubernetes client)."""

    def __init__(self, api_client: Any, namespace: str, *, poll_seconds: float = POLL_SECONDS) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.poll_seconds = poll_seconds

    def _call(self, method: str, **kwargs: Any) -> Any:
        return getattr(self.custom, method)(group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL,
                                            **kwargs)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get_namespaced_custom_object", name=name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        try:
            self._call("delete_namespaced_custom_object", name=name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create the job: True, or False when one of that name exists; TrainingError when refused."""
        name = manifest["metadata"]["name"]
        try:
            self._call("create_namespaced_custom_object", body=manifest)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise refusal(exc, f"create TFJob {self.namespace}/{name}") from None
        log.info("created TFJob %s/%s", self.namespace, name)
        return True

    def submit(self, manifest: dict[str, Any], *,
               reusable: Callable[[Mapping[str, Any]], bool] = lambda job: False) -> None:
        """Create the job; one of that name still running (or `reusable`) is kept, a finished one replaced."""
        name = manifest["metadata"]["name"]
        if self.create(manifest):
            return
        existing = self.get(name) or {}
        if finished_condition(existing) is None or reusable(existing):
            log.info("TFJob %s/%s exists (%s): waiting for it", self.namespace, name, last_condition(existing))
            return
        log.info("TFJob %s/%s finished earlier (%s): replacing it", self.namespace, name, last_condition(existing))
        self.delete(name)
        while self.get(name) is not None:  # deletion is asynchronous; the name is taken until it ends
            time.sleep(self.poll_seconds)
        if not self.create(manifest):
            raise TrainingError(f"TFJob {self.namespace}/{name}: created again by someone else while replacing it")

    def wait(self, name: str, timeout_seconds: float) -> dict[str, Any]:
        """The job's final condition; TrainingError after `timeout_seconds` or when the job vanishes."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                job = self.get(name)
            except TRANSIENT_ERRORS as exc:  # the API server restarting must not fail hours of training
                if not is_transient(exc) or time.monotonic() >= deadline:
                    raise
                log.warning("TFJob %s/%s: reading its status failed (%s); retrying", self.namespace, name, exc)
                time.sleep(self.poll_seconds)
                continue
            if job is None:
                raise TrainingError(f"TFJob {self.namespace}/{name}: deleted while the trainer waited for it")
            condition = finished_condition(job)
            if condition is not None:
                return condition
            if time.monotonic() >= deadline:
                raise TrainingError(f"TFJob {self.namespace}/{name}: not finished after {timeout_seconds / 60:g} "
                                    f"minutes (kubeflow.tfjob_timeout_minutes); last condition {last_condition(job)}")
            time.sleep(self.poll_seconds)


def is_transient(exc: BaseException) -> bool:
    """An API server error worth another poll: 429, 5xx, or no connection."""
    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return True


def in_cluster_client() -> Any:
    """A kubernetes ApiClient from the pod's service account."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def run_trainer_tfjob(
    config: str,
    *,
    api_client: Any = None,
    namespace: str | None = None,
    pod_name: str | None = None,
    poll_seconds: float = POLL_SECONDS,
    **arguments: Any,
) -> str:
    """The trainer task's body on many workers: the TFJob's result as the in-pod trainer's JSON.

    `api_client`, `namespace` and `pod_name` default to the pod's own (in-cluster config, the
    service account's namespace, HOSTNAME); tests point them at a stub API server.
    """
    from kubernetes import client

    from segpipe.pipeline.kubeflow import config_from_json, node_call
    from segpipe.pipeline.pipeline import artifact_name, create_pipeline, nodes_by_name

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_json(config)
    kf = cfg.kubeflow
    node = nodes_by_name(create_pipeline(cfg))["trainer"]
    inputs, outputs, ctx = node_call(node, cfg, arguments)
    api_client = api_client or in_cluster_client()
    namespace = namespace or Path(NAMESPACE_FILE).read_text().strip()
    pod = task_pod(client.CoreV1Api(api_client), namespace, pod_name or os.environ["HOSTNAME"])
    pairs = shared_mounts(pod)
    root = os.path.abspath(cfg.root)
    if covering_mount(root, pairs) is None:
        raise BadInputError(f"root: {root} is not on a volume this pod shares with other pods "
                            f"({[m['mountPath'] for m, _ in pairs] or 'none mounted'}); the TFJob's replicas "
                            "read and write the artifacts there")
    name = job_name(Path(ctx.scratch_dir).name)  # the scratch folder is named after the execution key
    staging = Path(root) / STAGING_DIR / name
    spec = {
        "config": config,
        "inputs": stage_inputs(inputs, staging, pairs),
        "outputs": {arg: str(staging / "outputs" / artifact_name(arg)) for arg in outputs},
        "run_id": ctx.run_id,
        "scratch_dir": os.path.abspath(ctx.scratch_dir),
        "result": str(staging / RESULT_FILE),
    }
    artifacts.write_json_atomic(staging / SPEC_FILE, spec)
    manifest = build_tfjob(
        name=name, namespace=namespace, image=main_image(pod),
        command=["python3", "-m", "segpipe.pipeline.tfjob", str(staging / SPEC_FILE)], kf=kf,
        volumes=[volume for _, volume in pairs], volume_mounts=[mount for mount, _ in pairs],
        service_account=pod["spec"].get("serviceAccountName"))
    runner = TFJobRunner(api_client, namespace, poll_seconds=poll_seconds)

    def already_done(job: Mapping[str, Any]) -> bool:  # its task died after the job succeeded
        return (finished_condition(job) or {}).get("type") == "Succeeded" and Path(spec["result"]).is_file()

    try:
        runner.submit(manifest, reusable=already_done)
    except TrainingError:  # refused: no job will read the staged copies
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        condition = runner.wait(name, kf.tfjob_timeout_minutes * 60)
    except TrainingError:  # timed out or deleted: a running job would hold its GPUs until its deadline
        if kf.tfjob_cleanup != "never":
            runner.delete(name)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Any other error (the API server unreachable) leaves the job and the staging: a retry re-attaches.
    succeeded = condition["type"] == "Succeeded"
    try:
        if not succeeded:
            raise TrainingError(f"TFJob {namespace}/{name} failed: "
                                f"{condition.get('message') or condition.get('reason') or 'no message'}")
        for arg, target in outputs.items():
            copy_artifact(spec["outputs"][arg], target)
        result = Path(spec["result"]).read_text()
    finally:
        if kf.tfjob_cleanup == "always" or (kf.tfjob_cleanup == "on_success" and succeeded):
            runner.delete(name)
        shutil.rmtree(staging, ignore_errors=True)
    log.info("TFJob %s/%s succeeded; outputs copied to %s", namespace, name, sorted(outputs.values()))
    return result


def main_image(pod: Mapping[str, Any]) -> str:
    """The task container's image: the replicas run exactly the code this task runs."""
    containers = pod["spec"]["containers"]
    return next((c for c in containers if c["name"] == TASK_CONTAINER), containers[0])["image"]


# ------------------------------------------------------------------ inside each replica


def is_chief(tf_config: Mapping[str, Any]) -> bool:
    """TensorFlow's convention: the chief (or master) task; without one, worker 0."""
    task, cluster = tf_config.get("task") or {}, tf_config.get("cluster") or {}
    if task.get("type") in ("chief", "master"):
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and not (
        cluster.get("chief") or cluster.get("master"))


def replica_config(config: str) -> SegpipeConfig:
    """The run's config with MultiWorkerMirroredStrategy, which reads the operator's TF_CONFIG."""
    from segpipe.pipeline.kubeflow import config_from_json

    return with_overrides(config_from_json(config), {"train.distribution": "multi_worker"}, explicit=False)


def run_replica(spec_path: str | os.PathLike, tf_config: Mapping[str, Any]) -> Any:
    """One replica: the trainer node on the staged paths; only the chief writes the outputs and the result."""
    from segpipe.pipeline.pipeline import (
        NodeContext,
        create_pipeline,
        execute_node,
        nodes_by_name,
    )

    spec = json.loads(Path(spec_path).read_text())
    cfg = replica_config(spec["config"])
    node = nodes_by_name(create_pipeline(cfg))["trainer"]
    ctx = NodeContext(run_id=spec["run_id"], inputs=spec["inputs"], scratch_dir=spec["scratch_dir"])
    chief = is_chief(tf_config)
    log.info("TFJob replica %s: %s", tf_config.get("task"), "chief" if chief else "worker")
    if chief:
        result = execute_node(node, cfg, spec["inputs"], spec["outputs"], ctx)
        artifacts.write_json_atomic(spec["result"], result)
        return result
    # TensorFlow's multi-worker pattern: a worker saves too (the collectives need every replica)
    # but into a folder of its own, discarded.
    scratch = Path(tempfile.mkdtemp(prefix="segpipe-worker-"))
    try:
        return execute_node(node, cfg, spec["inputs"], {arg: str(scratch / arg) for arg in spec["outputs"]}, ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python3 -m segpipe.pipeline.tfjob SPEC`: the replica's command in the TFJob."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m segpipe.pipeline.tfjob REPLICA_SPEC.json", file=sys.stderr)
        return 2
    run_replica(args[0], json.loads(os.environ.get("TF_CONFIG") or "{}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
