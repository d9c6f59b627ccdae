"""segpipe deploy: models.config parses as TensorFlow Serving's ModelServerConfig and loads exactly the
pushed versions; the InferenceService uses only fields of KServe's published v1beta1 CRD."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from segpipe.components.core import artifacts
from segpipe.components.core.errors import EXIT_BAD_INPUT, EXIT_OK, BadInputError
from segpipe.components.core.serving import SERVING_INFO_FILE, list_version_numbers
from segpipe.components.tools import deploy
from segpipe.pipeline.cli import main

# ------------------------------------------------------------------ the real schemas

# Field names of serving.kserve.io/v1beta1 InferenceService, copied from KServe's published CRD
# config/crd/full/serving.kserve.io_inferenceservices.yaml (github.com/kserve/kserve, commit
# aaac4e294dae2c7b1aa1886447793f3aa1c30912), whose Go types are pkg/apis/serving/v1beta1/
# inference_service.go (InferenceServiceSpec), predictor.go (PredictorSpec: PodSpec and
# ComponentExtensionSpec inline), predictor_model.go (ModelSpec, ModelFormat: PredictorExtensionSpec
# and corev1.Container inline). Each entry: object path -> (its property names, required ones).
KSERVE_OBJECTS: dict[str, tuple[set[str], set[str]]] = {
    "": (set("""
        apiVersion kind metadata spec status
    """.split()), set()),
    "spec": (set("""
        canary explainer predictor transformer
    """.split()), {"predictor"}),
    "spec.predictor": (set("""
        activeDeadlineSeconds affinity annotations autoScaling automountServiceAccountToken batcher
        canaryTrafficPercent containerConcurrency containers deploymentStrategy dnsConfig dnsPolicy
        enableServiceLinks hostAliases hostIPC hostNetwork hostPID hostUsers hostname
        hostnameOverride huggingface imagePullSecrets initContainers labels lightgbm logger
        maxReplicas minReplicas model name nodeName nodeSelector onnx os overhead paddle pmml
        preemptionPolicy priority priorityClassName pytorch readinessGates resourceClaims resources
        restartPolicy runtimeClassName scaleMetric scaleMetricType scaleTarget schedulerName
        schedulingGates securityContext serviceAccount serviceAccountName setHostnameAsFQDN
        shareProcessNamespace sklearn storageContainerName storageUris subdomain tensorflow
        terminationGracePeriodSeconds timeout tolerations topologySpreadConstraints triton volumes
        workerSpec xgboost
    """.split()), set()),
    "spec.predictor.model": (set("""
        args command confidential env envFrom image imagePullPolicy lifecycle livenessProbe
        modelFormat name ports protocolVersion readinessProbe resizePolicy resources restartPolicy
        restartPolicyRules runtime runtimeVersion securityContext startupProbe stdin stdinOnce
        storage storageUri terminationMessagePath terminationMessagePolicy tty volumeDevices
        volumeMounts workingDir
    """.split()), set()),
    "spec.predictor.model.modelFormat": ({"name", "version"}, {"name"}),
    "spec.predictor.model.resources": ({"claims", "limits", "requests"}, set()),
    "spec.predictor.model.volumeMounts[]": (set("""
        mountPath mountPropagation name readOnly recursiveReadOnly subPath subPathExpr
    """.split()), {"mountPath", "name"}),
    "spec.predictor.tolerations[]": ({"effect", "key", "operator", "tolerationSeconds", "value"}, set()),
    "spec.predictor.volumes[]": (set("""
        awsElasticBlockStore azureDisk azureFile cephfs cinder configMap csi downwardAPI emptyDir
        ephemeral fc flexVolume flocker gcePersistentDisk gitRepo glusterfs hostPath image iscsi
        name nfs persistentVolumeClaim photonPersistentDisk portworxVolume projected quobyte rbd
        scaleIO secret storageos vsphereVolume
    """.split()), {"name"}),
    "spec.predictor.volumes[].configMap": ({"defaultMode", "items", "name", "optional"}, set()),
}
# The CRD's types of the leaves segpipe writes: "string", "boolean", "string[]" (array of
# strings), "map" (additionalProperties: string) and "quantities" (int-or-string values).
KSERVE_LEAVES = {
    "apiVersion": "string", "kind": "string", "metadata": "metadata",
    "spec.predictor.model.modelFormat.name": "string", "spec.predictor.model.modelFormat.version": "string",
    "spec.predictor.model.storageUri": "string", "spec.predictor.model.runtimeVersion": "string",
    "spec.predictor.model.args": "string[]",
    "spec.predictor.model.resources.requests": "quantities", "spec.predictor.model.resources.limits": "quantities",
    "spec.predictor.model.volumeMounts[].name": "string", "spec.predictor.model.volumeMounts[].mountPath": "string",
    "spec.predictor.model.volumeMounts[].readOnly": "boolean",
    "spec.predictor.volumes[].name": "string", "spec.predictor.volumes[].configMap.name": "string",
    "spec.predictor.nodeSelector": "map",
    "spec.predictor.tolerations[].key": "string", "spec.predictor.tolerations[].operator": "string",
    "spec.predictor.tolerations[].value": "string", "spec.predictor.tolerations[].effect": "string",
}
# KServe's IsvcNameFmt (pkg/apis/serving/v1beta1/inference_service_validation.go).
ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def check_leaf(kind: str, value: Any, where: str) -> None:
    from kubernetes.client import V1ObjectMeta

    if kind == "string":
        assert isinstance(value, str), where
    elif kind == "boolean":
        assert isinstance(value, bool), where
    elif kind == "string[]":
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), where
    elif kind == "map":
        assert isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()), where
    elif kind == "quantities":
        assert isinstance(value, dict) and all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                               for v in value.values()), where
    elif kind == "metadata":  # the CRD leaves metadata to Kubernetes' ObjectMeta
        assert set(value) <= set(V1ObjectMeta.attribute_map.values()), where
        assert all(isinstance(v, str) for v in value.get("labels", {}).values()), where
    else:
        raise AssertionError(f"{where}: unknown kind {kind}")


def check_against_crd(value: Any, path: str = "") -> None:
    """Every field is one the CRD defines, required fields are there, leaves have the CRD's type."""
    if path in KSERVE_OBJECTS:
        allowed, required = KSERVE_OBJECTS[path]
        assert isinstance(value, dict), path
        assert set(value) <= allowed, f"{path or 'InferenceService'}: {sorted(set(value) - allowed)} not in KServe's CRD"
        assert required <= set(value), f"{path}: lacks {sorted(required - set(value))}"
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else key
            if isinstance(child, list) and f"{child_path}[]" in KSERVE_OBJECTS:
                for item in child:
                    check_against_crd(item, f"{child_path}[]")
            else:
                check_against_crd(child, child_path)
    elif path in KSERVE_LEAVES:
        check_leaf(KSERVE_LEAVES[path], value, path)
    else:
        raise AssertionError(f"{path}: no schema here; copy it from KServe's CRD before writing it")


def check_config_map(manifest: dict[str, Any]) -> None:
    """Kubernetes' own field names (the client's OpenAPI models)."""
    from kubernetes.client import V1ConfigMap

    assert set(manifest) <= set(V1ConfigMap.attribute_map.values())
    assert (manifest["apiVersion"], manifest["kind"]) == ("v1", "ConfigMap")
    assert all(isinstance(v, str) for v in manifest["data"].values())


def parse_models_config(text: str) -> Any:
    """Strict text-format parse with TensorFlow Serving's proto: an unknown field fails."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def tf_serving_would_load(base_path: Path, model_config: Any) -> list[str]:
    """The children TensorFlow Serving aspires under the config's policy, after
    tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc (tensorflow/serving at
    9d981c5c2708d23c5407c7c1e30309e6f9798874): a child is a version when absl::SimpleAtoi parses
    its name as an int64 (whitespace, sign, leading zeros allowed; files count too); `latest` takes
    the highest num_versions (at least 1), `all` every one."""
    versions: dict[int, str] = {}
    children = []
    for child in sorted(p.name for p in base_path.iterdir()):
        text = child.strip(" \t\n\v\f\r")
        if re.fullmatch(r"[+-]?[0-9]+", text) and abs(int(text)) < 2**63:
            versions[int(text)] = child
            children.append(child)
    policy = model_config.model_version_policy.WhichOneof("policy_choice")
    if policy == "all":
        return children
    assert policy == "latest", policy
    count = max(model_config.model_version_policy.latest.num_versions, 1)
    return [versions[v] for v in sorted(versions)[-count:]]


# ------------------------------------------------------------------ serving directories


def push(serving: Path, model: Path, keep_last: int) -> int:
    """One push with the pusher's own version writer (numbering, atomic rename, pruning)."""
    from segpipe.components.pusher import write_version

    def fill(tmp: Path, version: int) -> None:
        shutil.copytree(model / artifacts.SAVED_MODEL_DIR, tmp)
        (tmp / SERVING_INFO_FILE).write_text(json.dumps({"version": version}))

    return write_version(serving, fill, keep_last=keep_last)[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, rule_models: dict) -> Path:
    """Three pushes of a real SavedModel, plus what TensorFlow Serving must not take for a version."""
    serving = tmp_path_factory.mktemp("deploy") / "serving"
    for _ in range(3):
        push(serving, rule_models["bright"], keep_last=0)
    (serving / ".push-tmp-9-0123abcd").mkdir()  # a killed push's leftover: hidden, not a number
    (serving / "notes").mkdir()
    (serving / "README.txt").write_text("not a version")
    return serving


def deployment(serving: Path, out: Path, **changes: Any) -> dict[str, Any]:
    kwargs = dict(model_name="segpipe", keep_last=0, storage_uri=None, cpu_request="2", memory_request="6Gi",
                  accelerator_type="", accelerator_limit=0, node_selector={}, tolerations=[])
    return deploy.write_deployment(serving, out, **{**kwargs, **changes})


def manifests(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config_map, service = yaml.safe_load_all((out / deploy.INFERENCE_SERVICE_FILE).read_text())
    return config_map, service


@pytest.mark.parametrize("keep_last", [0, 1, 2, 5])
def test_models_config_loads_exactly_the_pushed_versions(served: Path, tmp_path: Path, keep_last: int) -> None:
    result = deployment(served, tmp_path / "out", keep_last=keep_last)
    config = parse_models_config((tmp_path / "out" / deploy.MODELS_CONFIG_FILE).read_text())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("segpipe", str(served.resolve()), "tensorflow")
    pushed = list_version_numbers(served)
    expected = pushed[-keep_last:] if keep_last else pushed
    assert tf_serving_would_load(Path(model.base_path), model) == [str(v) for v in expected]
    assert result["versions"] == expected
    policy = model.model_version_policy
    assert policy.WhichOneof("policy_choice") == ("latest" if keep_last else "all")
    if keep_last:
        assert policy.latest.num_versions == keep_last
    # The pod's copy differs only in the base path: KServe's storage initializer puts storageUri there.
    config_map, service = manifests(tmp_path / "out")
    pod_model = parse_models_config(config_map["data"][deploy.MODELS_CONFIG_FILE]).model_config_list.config[0]
    assert pod_model.base_path == deploy.KSERVE_MODEL_DIR
    assert pod_model.model_version_policy == policy and pod_model.name == service["metadata"]["name"]


def test_the_pushers_pruning_and_the_policy_agree(tmp_path: Path, rule_models: dict) -> None:
    serving = tmp_path / "serving"
    for _ in range(4):
        push(serving, rule_models["bright"], keep_last=2)
    result = deployment(serving, tmp_path / "out", keep_last=2)
    model = parse_models_config((tmp_path / "out" / deploy.MODELS_CONFIG_FILE).read_text()).model_config_list.config[0]
    assert tf_serving_would_load(serving, model) == ["3", "4"] and result["versions"] == [3, 4]


@pytest.mark.parametrize(
    "stray, keep_last",
    [("9", 0), ("9", 2), ("007", 0), ("0", 0), (" 12", 2), ("+10", 1)],
    ids=["incomplete-above", "incomplete-above-latest", "leading-zeros", "incomplete-below-all", "space", "sign"],
)
def test_a_stray_version_tf_serving_would_load_is_refused(served: Path, tmp_path: Path, stray: str, keep_last: int) -> None:
    serving = tmp_path / "serving"
    shutil.copytree(served, serving)
    if stray == "007":
        shutil.copytree(serving / "1", serving / stray)  # a complete SavedModel, under a name segpipe never writes
    elif stray.strip() == "12":
        (serving / stray).write_text("a file: TensorFlow Serving still reads its name as version 12")
    else:
        (serving / stray).mkdir()
        (serving / stray / "saved_model.pb").write_bytes(b"half copied")
    with pytest.raises(BadInputError, match=re.escape(repr(stray))):
        deployment(serving, tmp_path / "out", keep_last=keep_last)
    assert not (tmp_path / "out").exists()


def test_a_stray_below_the_latest_versions_is_not_loaded(served: Path, tmp_path: Path) -> None:
    serving = tmp_path / "serving"
    shutil.copytree(served, serving)
    (serving / "0").mkdir()  # TensorFlow Serving skips it under latest 2: nothing to refuse
    assert deployment(serving, tmp_path / "out", keep_last=2)["versions"] == [2, 3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no pushed versions"):
        deployment(tmp_path / "empty", tmp_path / "out2")


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_inference_service_has_only_kserve_fields(served: Path, tmp_path: Path, gpu: bool) -> None:
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "value": None, "effect": "NoSchedule"},
                   {"key": "dedicated", "operator": "Equal", "value": "serving", "effect": "NoExecute"}]
    deployment(served, tmp_path / "out", keep_last=2, storage_uri="gs://bucket/segpipe/serving",
               accelerator_type="nvidia.com/gpu", accelerator_limit=1 if gpu else 0,
               node_selector={"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}, tolerations=tolerations)
    config_map, service = manifests(tmp_path / "out")
    check_config_map(config_map)
    check_against_crd(service)
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert ISVC_NAME.fullmatch(service["metadata"]["name"])
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "tensorflow", "version": "2"}
    assert model["storageUri"] == "gs://bucket/segpipe/serving"
    resources = model["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "6Gi", **({"nvidia.com/gpu": 1} if gpu else {})}
    assert model["runtimeVersion"].endswith("-gpu") == gpu
    assert ("nodeSelector" in predictor, "tolerations" in predictor) == (gpu, gpu)
    if gpu:
        assert predictor["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    # The config file the runtime is pointed at is the ConfigMap's, mounted where the flag says.
    (mount,) = model["volumeMounts"]
    (volume,) = predictor["volumes"]
    assert volume == {"name": mount["name"], "configMap": {"name": config_map["metadata"]["name"]}}
    assert model["args"] == [f"--model_config_file={mount['mountPath']}/{deploy.MODELS_CONFIG_FILE}"]


def test_unservable_settings_are_refused(served: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="pipeline_name 'seg_pipe'"):
        deployment(served, tmp_path / "out", model_name="seg_pipe")
    with pytest.raises(BadInputError, match="Kubernetes resource name"):
        deployment(served, tmp_path / "out", accelerator_type="NVIDIA_TESLA_T4", accelerator_limit=1)
    with pytest.raises(BadInputError, match="--storage-uri ftp://x"):
        deployment(served, tmp_path / "out", storage_uri="ftp://x")
    with pytest.raises(BadInputError, match="the serving directory"):
        deployment(served, served / "manifests")
    assert not (tmp_path / "out").exists() and not (served / "manifests").exists()


def test_cli_paths_are_relative_and_the_config_supplies_policy_and_resources(
        served: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    root = tmp_path / "root"
    shutil.copytree(served, root / "serving")
    monkeypatch.chdir(tmp_path)
    code = main(["deploy", "--out", "manifests", "--root", "root", "--set", "push.keep_last=2",
                 "--set", "kubeflow.memory_request=3Gi", "--set", "kubeflow.accelerator_limit=0"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "latest { num_versions: 2 }" in out and "versions 2, 3" in out and "--storage-uri" in out
    _, service = manifests(tmp_path / "manifests")
    model = service["spec"]["predictor"]["model"]
    assert model["storageUri"] == (root / "serving").resolve().as_uri()
    assert model["resources"]["limits"] == {"cpu": "1", "memory": "3Gi"}
    code = main(["deploy", "--serving-dir", "root/serving", "--out", "manifests", "--storage-uri", "pvc://models/serving",
                 "--root", "root"])
    assert code == EXIT_OK and "--storage-uri" not in capsys.readouterr().out
    _, service = manifests(tmp_path / "manifests")
    assert service["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/serving"
    assert service["spec"]["predictor"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                            "effect": "NoSchedule"}]  # default.yaml's GPU settings
    code = main(["deploy", "--out", "root/serving/manifests", "--root", "root"])
    assert code == EXIT_BAD_INPUT and "serving directory" in capsys.readouterr().err


def test_the_documented_requests_feed_serving_default(served: Path, tmp_path: Path) -> None:
    """docs/serving.md's gRPC PredictRequest and REST body carry what the signature takes: the
    model server turns the TensorProto (gRPC) or the decoded {"b64": ...} (REST) into this tensor."""
    import base64
    import io

    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from tensorflow_serving.apis import predict_pb2

    from segpipe.components.core import serving

    buf = io.BytesIO()
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(buf, format="PNG")
    image = buf.getvalue()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "segpipe"
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image]))
    body = {"signature_name": "serving_default", "instances": [{"image_bytes": {"b64": base64.b64encode(image).decode()}}]}
    rest = [base64.b64decode(row["image_bytes"]["b64"]) for row in json.loads(json.dumps(body))["instances"]]

    loaded = serving.load_serving_model(served / "3")
    signature = loaded.signatures[request.model_spec.signature_name]
    assert set(request.inputs) == set(signature.structured_input_signature[1]) == {serving.BYTES_INPUT}
    grpc_out = signature(image_bytes=tf.constant(tf.make_ndarray(request.inputs["image_bytes"])))
    rest_out = signature(image_bytes=tf.constant(rest))
    np.testing.assert_array_equal(grpc_out[serving.CLASS_MASK].numpy(), rest_out[serving.CLASS_MASK].numpy())
    assert grpc_out[serving.CLASS_MASK].shape == (1, 32, 32) and grpc_out[serving.PROBABILITIES].shape == (1, 32, 32, 1)
