"""Deployment manifests for a serving directory (`segpipe deploy`): TensorFlow Serving and KServe.

Two files, each written complete or not at all:
- `models.config`: a TensorFlow Serving `ModelServerConfig` text proto (built with
  tensorflow_serving's own proto) naming one model whose `base_path` is the serving directory and
  whose `model_version_policy` matches `push.keep_last`: `latest { num_versions: K }` serves the K
  versions the pusher keeps, `all {}` every version when it keeps all (keep_last 0). Run
  `tensorflow_model_server --model_config_file=models.config`.
- `inferenceservice.yaml`: a ConfigMap holding the same config for the pod (base path
  `/mnt/models`, where KServe puts `storageUri`) and a KServe `InferenceService`
  (serving.kserve.io/v1beta1) whose `predictor.model` (modelFormat tensorflow) reads the serving
  directory from `storageUri` and starts TensorFlow Serving with that config, so KServe serves the
  same versions as the first file. Requests and limits come from the `kubeflow` section's CPU and
  memory; with a GPU configured (`accelerator_type` and `accelerator_limit`), the GPU limit, the
  GPU node selector and tolerations, and the `-gpu` build of TensorFlow Serving.

Before writing, the serving directory is read the way TensorFlow Serving reads it (every entry
whose name parses as an int64 is a version, file or folder, `007` included): the versions the
policy would load must be exactly complete pushed versions (core/serving.py
`is_complete_version`). A half-copied or foreign numeric folder among them is refused by name,
because TensorFlow Serving would try to serve it.
"""
from __future__ import annotations

import logging
import os
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from segpipe.components.core.artifacts import atomic_write
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

MODELS_CONFIG_FILE = "models.config"
INFERENCE_SERVICE_FILE = "inferenceservice.yaml"
KSERVE_API_VERSION = "serving.kserve.io/v1beta1"
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer places `storageUri`
CONFIG_MOUNT_DIR = "/mnt/segpipe-config"  # the ConfigMap's models.config inside the pod
CONFIG_VOLUME = "segpipe-models-config"
MODEL_FORMAT = {"name": "tensorflow", "version": "2"}  # KServe's TensorFlow Serving runtime supports "1" and "2"
# KServe's InferenceService name rule (IsvcNameFmt); a Kubernetes service name is at most 63 characters.
NAME_FORMAT = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME_LENGTH = 63
# Schemes KServe's storage initializer reads (SupportedStorageURIPrefixList).
STORAGE_URI_PREFIXES = ("gs://", "s3://", "pvc://", "file://", "https://", "http://", "hdfs://", "webhdfs://",
                        "oci://", "hf://")
RESOURCE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
INT64_MAX = 2**63 - 1
# TensorFlow Serving reads a child's name as a version with absl::SimpleAtoi: optional ASCII
# whitespace around an optional sign and decimal digits.
TF_SERVING_VERSION_NAME = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*")


# ------------------------------------------------------------------ what TensorFlow Serving loads


def tf_serving_version_children(serving_dir: str | os.PathLike) -> dict[int, list[str]]:
    """Version number -> the entries of `serving_dir` TensorFlow Serving reads as that version.

    Like its file system source: every child (file or folder) whose name parses as an int64.
    """
    children: dict[int, list[str]] = {}
    for entry in sorted(Path(serving_dir).iterdir()):
        found = TF_SERVING_VERSION_NAME.fullmatch(entry.name)
        if found and -INT64_MAX - 1 <= int(found.group(1)) <= INT64_MAX:
            children.setdefault(int(found.group(1)), []).append(entry.name)
    return children


def policy_versions(children: Mapping[int, list[str]], keep_last: int) -> list[int]:
    """The version numbers the policy for `keep_last` loads: the highest K, or all (keep_last 0)."""
    numbers = sorted(children)
    return numbers[-keep_last:] if keep_last > 0 else numbers


def served_versions(serving_dir: str | os.PathLike, keep_last: int) -> list[int]:
    """The versions TensorFlow Serving would load from `serving_dir` under `keep_last`'s policy.

    BadInputError naming the entries when one of them is not a complete pushed version, or when
    the directory holds no version at all.
    """
    from segpipe.components.core.serving import is_complete_version

    root = Path(serving_dir)
    if not root.is_dir():
        raise BadInputError(f"--serving-dir {root}: not a folder")
    children = tf_serving_version_children(root)
    versions = policy_versions(children, keep_last)
    strays = [name for v in versions for name in children[v] if not is_complete_version(root / name)]
    if strays:
        raise BadInputError(
            f"{root}: TensorFlow Serving would load {', '.join(map(repr, strays))} as version(s), and "
            "they are not complete pushed versions (a numeric name, saved_model.pb, variables/ and segpipe.json); "
            "move them out of the serving directory"
        )
    if not versions:
        raise BadInputError(f"{root}: no pushed versions to deploy (push a blessed model first)")
    return versions


# ------------------------------------------------------------------ TensorFlow Serving


def models_config_text(model_name: str, base_path: str, keep_last: int) -> str:
    """The ModelServerConfig text proto for one model (see the module docstring)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(name=model_name, base_path=base_path, model_platform="tensorflow")
    if keep_last > 0:
        model.model_version_policy.latest.num_versions = keep_last
    else:
        model.model_version_policy.all.SetInParent()
    return text_format.MessageToString(config)


def tf_serving_release() -> str:
    """The TensorFlow Serving release matching this TensorFlow: the installed tensorflow-serving-api's."""
    return importlib_metadata.version("tensorflow-serving-api")


# ------------------------------------------------------------------ KServe


def check_name(name: str) -> None:
    if not NAME_FORMAT.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise BadInputError(
            f"pipeline_name {name!r}: the model and InferenceService name must match {NAME_FORMAT.pattern} "
            f"(KServe's rule) and have at most {MAX_NAME_LENGTH} characters; set e.g. --set pipeline_name=segpipe"
        )


def check_storage_uri(uri: str) -> None:
    if not uri.startswith(STORAGE_URI_PREFIXES):
        raise BadInputError(f"--storage-uri {uri}: KServe reads only {', '.join(STORAGE_URI_PREFIXES)} URIs")


def gpu_resource(accelerator_type: str, accelerator_limit: int) -> dict[str, int]:
    """{resource name: count} of the configured GPU, {} without one."""
    if not accelerator_type or accelerator_limit <= 0:
        return {}
    if not RESOURCE_NAME.fullmatch(accelerator_type):
        raise BadInputError(
            f"kubeflow.accelerator_type {accelerator_type!r}: an InferenceService requests a GPU by its Kubernetes "
            "resource name (e.g. nvidia.com/gpu); set that, or kubeflow.accelerator_limit=0 to serve on CPU"
        )
    return {accelerator_type: accelerator_limit}


def inference_service_manifests(
    model_name: str,
    storage_uri: str,
    keep_last: int,
    *,
    cpu_request: str,
    memory_request: str,
    accelerator_type: str,
    accelerator_limit: int,
    node_selector: Mapping[str, str],
    tolerations: Sequence[Mapping[str, str | None]],
) -> list[dict[str, Any]]:
    """[the ConfigMap, the InferenceService] as plain dicts (see the module docstring).

    `tolerations` are Kubernetes toleration fields (key, operator, value, effect; None values are
    left out). Limits equal requests: KServe's runtime defaults (2Gi) would otherwise cap a larger request.
    """
    check_name(model_name)
    check_storage_uri(storage_uri)
    gpu = gpu_resource(accelerator_type, accelerator_limit)
    config_map_name = f"{model_name}-models-config"
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name, "labels": {"app.kubernetes.io/managed-by": "segpipe"}},
        "data": {MODELS_CONFIG_FILE: models_config_text(model_name, KSERVE_MODEL_DIR, keep_last)},
    }
    requests = {"cpu": cpu_request, "memory": memory_request}
    model: dict[str, Any] = {
        "modelFormat": dict(MODEL_FORMAT),
        "storageUri": storage_uri,
        # The -gpu tag when a GPU is requested; KServe replaces only the runtime image's tag.
        "runtimeVersion": tf_serving_release() + ("-gpu" if gpu else ""),
        # Appended to the runtime's flags; with a config file TensorFlow Serving ignores
        # --model_name/--model_base_path and applies the version policy.
        "args": [f"--model_config_file={CONFIG_MOUNT_DIR}/{MODELS_CONFIG_FILE}"],
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_DIR, "readOnly": True}],
        "resources": {"requests": {**requests, **gpu}, "limits": {**requests, **gpu}},
    }
    predictor: dict[str, Any] = {
        "model": model,
        "volumes": [{"name": CONFIG_VOLUME, "configMap": {"name": config_map_name}}],
    }
    if gpu:
        if node_selector:
            predictor["nodeSelector"] = dict(sorted(node_selector.items()))
        if tolerations:
            predictor["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in tolerations]
    service = {
        "apiVersion": KSERVE_API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": model_name, "labels": {"app.kubernetes.io/managed-by": "segpipe"}},
        "spec": {"predictor": predictor},
    }
    return [config_map, service]


def dump_manifests(manifests: Sequence[Mapping[str, Any]]) -> str:
    """YAML documents, multi-line strings (the ConfigMap's models.config) as readable `|` blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper: yaml.SafeDumper, value: str) -> Any:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, represent_str)
    return yaml.dump_all(manifests, Dumper=Dumper, sort_keys=False)


# ------------------------------------------------------------------ the command


def write_deployment(
    serving_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_name: str,
    keep_last: int,
    storage_uri: str | None,
    cpu_request: str,
    memory_request: str,
    accelerator_type: str,
    accelerator_limit: int,
    node_selector: Mapping[str, str],
    tolerations: Sequence[Mapping[str, str | None]],
    protected: Sequence[tuple[str | os.PathLike, str]] = (),
) -> dict[str, Any]:
    """Write models.config and inferenceservice.yaml into `out_dir` for `serving_dir`.

    `storage_uri` None means `file://<serving_dir>` (a path on this machine: a cluster needs the
    URI it reads the directory from). `out_dir` is never inside a folder segpipe owns, the serving
    directory included. Returns {"models_config", "inference_service", "versions", "policy", "storage_uri"}.
    """
    from segpipe.components.tools.predict import check_output_dir

    root = Path(serving_dir).resolve()
    out = Path(out_dir)
    check_output_dir(out, (), [*protected, (root, "the serving directory")])
    versions = served_versions(root, keep_last)
    check_name(model_name)
    storage_uri = storage_uri or root.as_uri()
    manifests = inference_service_manifests(
        model_name, storage_uri, keep_last, cpu_request=cpu_request, memory_request=memory_request,
        accelerator_type=accelerator_type, accelerator_limit=accelerator_limit, node_selector=node_selector,
        tolerations=tolerations,
    )
    policy = f"latest {{ num_versions: {keep_last} }}" if keep_last > 0 else "all {}"
    header = (f"# segpipe deploy: model {model_name!r} from {storage_uri}, version policy {policy} "
              f"(versions {', '.join(map(str, versions))} today)\n")
    out.mkdir(parents=True, exist_ok=True)
    config_path = atomic_write(out / MODELS_CONFIG_FILE, header + models_config_text(model_name, str(root), keep_last))
    service_path = atomic_write(out / INFERENCE_SERVICE_FILE, header + dump_manifests(manifests))
    log.info("deploy: %s and %s for versions %s of %s", config_path, service_path, versions, root)
    return {"models_config": str(config_path), "inference_service": str(service_path), "versions": versions,
            "policy": policy, "storage_uri": storage_uri}
