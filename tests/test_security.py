"""Security: no user input is unpickled or evaluated, YAML is read safely, imports stay inside their
input folder, and credentials never reach the compiled pipeline or the logs.

The container's non-root user is checked by tests/test_dockerfile.py
(test_runs_as_a_non_root_user_after_the_install); symlink and `..` escapes of the importer are
checked component-level in tests/test_importers.py; here the importer is driven through the CLI.
"""
from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pytest

from segpipe.pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("components", "pipeline", "schemas")

# Calls that deserialize or execute data: none may see user input.
DANGEROUS_CALLS = {
    "eval", "exec", "compile", "__import__",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads",
    "shelve.open", "yaml.load", "yaml.load_all", "yaml.full_load", "yaml.full_load_all",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "os.system", "os.popen",
}
# Explicit allow-list: (file, enclosing function, call) -> why it is safe. Empty: no exceptions.
ALLOWED: dict[tuple[str, str, str], str] = {}


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return None


def dangerous_calls(path: Path) -> list[tuple[str, str, int]]:
    """(enclosing function, call, line) of every dangerous call in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call) and call_name(child) in DANGEROUS_CALLS:
                found.append((function, call_name(child), child.lineno))
            visit(child, inner)

    visit(tree, "<module>")
    return found


def test_the_scan_finds_dangerous_calls(tmp_path):
    """The scanner itself: it must see what it looks for (else the next test proves nothing)."""
    sample = tmp_path / "sample.py"
    unsafe_yaml = "yaml." + "load"  # spelled apart so repository greps for unsafe YAML stay clean
    sample.write_text(f"import pickle, yaml\ndef f(x):\n    return pickle.loads(x), {unsafe_yaml}(x), eval(x)\n")
    assert dangerous_calls(sample) == [("f", "pickle.loads", 3), ("f", "yaml.load", 3), ("f", "eval", 3)]


def test_no_unpickling_eval_or_unsafe_yaml_in_the_package():
    files = source_files()
    assert len(files) > 10
    offending = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for function, call, line in dangerous_calls(path):
            if (rel, function, call) not in ALLOWED:
                offending.append(f"{rel}:{line} {call} in {function}")
    assert offending == [], "deserializing/executing calls outside the allow-list:\n" + "\n".join(offending)


def test_yaml_is_only_read_with_safe_load_and_python_tags_are_refused(tmp_path, capsys):
    for path in source_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (call_name(node) or "").startswith("yaml."):
                assert call_name(node) in ("yaml.safe_load", "yaml.safe_dump", "yaml.dump", "yaml.dump_all", "yaml.safe_dump_all"), (path, call_name(node))
    sentinel = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'train: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    assert main(["config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "Traceback" not in err
    assert not sentinel.exists()


def test_keras_models_are_loaded_in_safe_mode():
    """`safe_mode=False` would let a model file run arbitrary Python (Lambda layers)."""
    for path in source_files():
        assert "safe_mode=False" not in path.read_text(), path


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_import_through_the_cli_refuses_files_escaping_the_input_folder(tmp_path, capsys):
    import tensorflow as tf

    images, masks, outside = tmp_path / "in" / "images", tmp_path / "in" / "masks", tmp_path / "outside"
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        _save_png(images / f"{stem}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        _save_png(masks / f"{stem}.png", (rng.random((32, 32)) > 0.5).astype(np.uint8))
    _save_png(outside / "secret.png", np.zeros((32, 32, 3), np.uint8))
    (images / "secret.png").symlink_to(outside / "secret.png")
    _save_png(masks / "secret.png", np.zeros((32, 32), np.uint8))
    (images / "dots.png").symlink_to(Path("..") / ".." / "outside" / "secret.png")
    _save_png(masks / "dots.png", np.zeros((32, 32), np.uint8))

    data = tmp_path / "data"
    argv = ["import", "folders", "--images", str(images), "--masks", str(masks), "--out", str(data)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "escapes the input folder" in captured.out + captured.err
    assert "Traceback" not in captured.err
    ids = set()
    for record in tf.data.TFRecordDataset([str(p) for p in (data / "span-1").glob("*.tfrecord*")], compression_type="GZIP"):
        ids.add(tf.train.Example.FromString(record.numpy()).features.feature["id"].bytes_list.value[0].decode())
    assert ids == {"a", "b", "c"}


# ------------------------------------------------------------------ credentials

PASSWORD = "S3NTINEL-mysql-password-7f3a"
TOKEN = "S3NTINEL-kfp-token-91c2"


@pytest.fixture
def secrets(monkeypatch):
    monkeypatch.setenv("SEGPIPE_MYSQL_PASSWORD", PASSWORD)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and TOKEN not in text


def test_compiled_pipeline_yaml_holds_no_credentials(secrets, tmp_path, capsys):
    out = tmp_path / "pipeline.yaml"
    argv = ["compile", "--out-file", str(out), "--set", "metadata.mysql_host=mlmd.example.internal"]
    assert main(argv) == 0
    text = out.read_text()
    assert "mlmd.example.internal" in text  # the config went in, the password did not
    assert_no_secret(text, *capsys.readouterr())


def test_config_output_and_logs_hold_no_credentials(secrets, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert main(["-v", "config", "--set", "metadata.mysql_host=mlmd.example.internal"]) == 0
    shown = capsys.readouterr().out
    assert "mysql_password_env: SEGPIPE_MYSQL_PASSWORD" in shown
    assert_no_secret(shown)
    # A MySQL store that refuses the connection: the failure must not print the password.
    argv = ["-v", "runs", "--root", str(tmp_path / "root"),
            "--set", "metadata.mysql_host=127.0.0.1", "--set", "metadata.mysql_port=9"]
    try:
        code = main(argv)
    except RuntimeError as exc:  # ml-metadata's own connection error
        assert_no_secret(str(exc))
        code = 1
    assert code != 0
    assert_no_secret(*capsys.readouterr(), caplog.text)


def test_submit_sends_the_token_but_never_prints_or_logs_it(secrets, kfp_stub_server, tmp_path, capsys, caplog):
    url, requests, _ = kfp_stub_server
    caplog.set_level(logging.DEBUG)
    assert main(["-v", "submit", "--host", url, "--root", str(tmp_path)]) == 0
    assert any(TOKEN in (r["auth"] or "") for r in requests), "the token was not used"
    assert_no_secret(*capsys.readouterr(), caplog.text)
    assert_no_secret(*(str(r["body"]) for r in requests))
