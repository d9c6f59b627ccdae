"""StatisticsGen: TFDV statistics per split, plus a derived-features view, on Beam.

Two views per split, both `DatasetFeatureStatisticsList` protos:
- `stats.pb`: TFDV over the raw examples with TFDV's image statistics generator, so the image
  features carry image statistics (format histogram, max height and width) and the schema's
  `image_domain` can be checked;
- `derived_stats.pb`: TFDV over per-example numbers that raw bytes hide (height, width, mask
  foreground fraction, mean intensity). These are the distributions the validator compares with
  the previous span to detect drift.

`statistics.html` renders both for a person: plain tables that open anywhere, then TFDV's Facets
view (`get_statistics_html`, which needs no IPython; Facets loads its script from the web).
"""
from __future__ import annotations

import base64
import html
import io
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from segpipe.components.core import artifacts
from segpipe.components.core.beam import beam_pipeline, worker_path
from segpipe.components.core.errors import BadInputError

log = logging.getLogger(__name__)

PRODUCER = "StatisticsGen"
DERIVED_STATS_FILE = "derived_stats.pb"
REPORT_FILE = "statistics.html"
HEIGHT, WIDTH, FOREGROUND_FRACTION, MEAN_INTENSITY = "height", "width", "foreground_fraction", "mean_intensity"
DERIVED_FEATURES = (HEIGHT, WIDTH, FOREGROUND_FRACTION, MEAN_INTENSITY)
RAW, DERIVED = "raw", "derived"
_SPLIT_COLUMN = "__segpipe_split__"
_BATCH = {"min_batch_size": 16, "max_batch_size": 256}


def _slice_by_split(record_batch: Any) -> Iterable[tuple[str, Any]]:
    """TFDV slice function: every batch holds one split, named in its `_SPLIT_COLUMN`."""
    split = record_batch.column(record_batch.schema.get_field_index(_SPLIT_COLUMN))[0][0].as_py().decode()
    yield split, record_batch


def _encode(stats: Any) -> str:
    """The statistics proto as one base64 line, so it travels through a plain text sink."""
    return base64.b64encode(stats.SerializeToString()).decode("ascii")


def _image_decoder() -> Any:
    """TFDV's image decoder with sizes read from the image header by PIL.

    TFDV's own TfImageDecoder decodes every image in a TF session just to get its size and fails
    on a batch without images (the `id` feature); PIL reads only the header.
    """
    import numpy as np
    from PIL import Image
    from tensorflow_data_validation.statistics.generators import image_stats_generator as isg

    class PilImageDecoder(isg.ImageDecoderInterface):
        def get_formats(self, values: np.ndarray) -> np.ndarray:
            return isg.TfImageDecoder().get_formats(values)

        def get_sizes(self, values: np.ndarray) -> np.ndarray:
            sizes = []
            for value in values:
                try:
                    with Image.open(io.BytesIO(bytes(value))) as img:
                        sizes.append((img.height, img.width))
                except Exception:  # a broken image with a valid signature: no size to report
                    sizes.append((0, 0))
            return np.asarray(sizes, dtype=np.int64).reshape(-1, 2)

    return PilImageDecoder()


def stats_options() -> Any:
    """TFDV options: the default generators, TFDV's ImageStatsGenerator and one slice per split.

    The image generator is added directly rather than through `enable_semantic_domain_stats`:
    that flag builds it with a 100-value minimum and without size statistics, so small spans got
    no image statistics and no span got height or width. One slice per split lets a single
    GenerateStatistics serve every split.
    """
    import tensorflow_data_validation as tfdv
    from tensorflow_data_validation.statistics.generators.image_stats_generator import ImageStatsGenerator

    image_stats = ImageStatsGenerator(image_decoder=_image_decoder(), enable_size_stats=True, values_threshold=1)
    return tfdv.StatsOptions(generators=[image_stats], experimental_slice_functions=[_slice_by_split])


def _decode(features: Any, key: str, mode: str | None) -> Any:
    """The feature's image as a numpy array, or None when it is missing or does not decode."""
    import numpy as np

    from segpipe.components.core.data_format import open_image

    values = features[key].bytes_list.value if key in features else []
    if len(values) != 1:
        return None
    try:
        with open_image(values[0]) as img:  # the quarantine split may hold images above the pixel cap
            return np.asarray(img.convert(mode) if mode else img)
    except Exception:  # PIL raises many types for corrupt data; the schema check reports it
        return None


def derive_features(serialized: bytes) -> dict[str, float | None]:
    """Height, width, foreground fraction (labelled non-background pixels) and mean intensity.

    Pixels labelled 255 (ignore) count neither as foreground nor in the denominator. A value is
    None where the image or mask is missing or broken: TFDV then counts it as missing, and the
    schema validation of the raw view reports the cause.
    """
    import numpy as np
    from tensorflow.core.example import example_pb2

    features = example_pb2.Example.FromString(serialized).features.feature
    image = _decode(features, artifacts.IMAGE_KEY, "RGB")
    mask = _decode(features, artifacts.MASK_KEY, None)
    row: dict[str, float | None] = dict.fromkeys(DERIVED_FEATURES)
    if image is not None:
        row.update({HEIGHT: float(image.shape[0]), WIDTH: float(image.shape[1]), MEAN_INTENSITY: float(image.mean())})
    if mask is not None:
        labelled = mask != artifacts.IGNORE_LABEL
        foreground = np.logical_and(labelled, mask != 0).sum()
        row[FOREGROUND_FRACTION] = float(foreground / max(int(labelled.sum()), 1))
    return row


def to_record_batch(serialized: Sequence[bytes], split: str) -> Any:
    """A pyarrow RecordBatch in TFDV's layout: the raw features as decoded by tfx_bsl, one
    list<float> column per derived feature, and the split name for the slice function."""
    import pyarrow as pa
    from tfx_bsl.coders import example_coder

    batch = example_coder.ExamplesToRecordBatchDecoder().DecodeBatch(list(serialized))
    rows = [derive_features(record) for record in serialized]
    arrays = batch.columns + [
        pa.array([None if row[name] is None else [row[name]] for row in rows], type=pa.list_(pa.float32()))
        for name in DERIVED_FEATURES
    ]
    arrays.append(pa.array([[split.encode()]] * len(rows), type=pa.list_(pa.binary())))
    return pa.RecordBatch.from_arrays(arrays, batch.schema.names + list(DERIVED_FEATURES) + [_SPLIT_COLUMN])


def _view(stats: Any, split: str, view: str) -> Any:
    """The split's dataset from the sliced statistics, keeping the raw or the derived features."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    wanted = statistics_pb2.DatasetFeatureStatistics(name=split, num_examples=0)
    dataset = next((d for d in stats.datasets if d.name == split), wanted)  # no slice: empty split
    wanted.CopyFrom(dataset)
    del wanted.features[:]
    for feature in dataset.features:
        name = ".".join(feature.path.step) or feature.name
        if name != _SPLIT_COLUMN and (name in DERIVED_FEATURES) == (view == DERIVED):
            wanted.features.add().CopyFrom(feature)
    return statistics_pb2.DatasetFeatureStatisticsList(datasets=[wanted])


def _build_pipeline(p: Any, examples_uri: str, splits: Sequence[str], manifest_prefix: str) -> None:
    """One read per split, one GenerateStatistics for all (sliced by split), one text sink."""
    import apache_beam as beam
    import tensorflow_data_validation as tfdv

    batches = []
    for split in splits:
        pattern = str(artifacts.split_dir(examples_uri, split) / artifacts.SHARD_PATTERN)
        batches.append(
            p
            | f"Read-{split}" >> beam.io.ReadFromTFRecord(pattern)
            | f"Batch-{split}" >> beam.BatchElements(**_BATCH)
            | f"ToArrow-{split}" >> beam.Map(to_record_batch, split)
        )
    _ = (
        batches
        | "AllSplits" >> beam.Flatten()
        | "Statistics" >> tfdv.GenerateStatistics(stats_options())
        | "Serialize" >> beam.Map(_encode)
        | "WriteManifest" >> beam.io.WriteToText(manifest_prefix, file_name_suffix=".txt")
    )


def _read_manifest(work_dir: Path) -> Any:
    from tensorflow_metadata.proto.v0 import statistics_pb2

    lines = [line for path in sorted(work_dir.glob("manifest*.txt")) for line in path.read_text().split()]
    if len(lines) != 1:
        raise RuntimeError(f"StatisticsGen: expected one statistics proto from Beam, got {len(lines)}")
    return statistics_pb2.DatasetFeatureStatisticsList.FromString(base64.b64decode(lines[0]))


def stats_path(statistics_uri: str | Path, split: str, view: str = RAW) -> Path:
    """Where a split's raw (`stats.pb`) or derived (`derived_stats.pb`) statistics live."""
    name = artifacts.STATS_FILE if view == RAW else DERIVED_STATS_FILE
    return artifacts.split_dir(statistics_uri, split) / name


def load_stats(statistics_uri: str | Path, split: str, view: str = RAW) -> Any:
    """The split's statistics proto; BadInputError names the file when it is missing or unreadable."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    path = stats_path(statistics_uri, split, view)
    try:
        return statistics_pb2.DatasetFeatureStatisticsList.FromString(path.read_bytes())
    except FileNotFoundError:
        raise BadInputError(f"{path}: statistics file not found") from None
    except Exception as exc:  # protobuf raises DecodeError for corrupt bytes
        raise BadInputError(f"{path}: not a DatasetFeatureStatisticsList ({exc})") from None


def stats_splits(statistics_uri: str | Path) -> list[str]:
    """The splits with statistics, in canonical order."""
    return [s for s in artifacts.SPLITS if stats_path(statistics_uri, s).is_file()]


def generate_statistics(examples_uri: str, statistics_uri: str, *, beam_args: list[str]) -> dict:
    """Compute both statistics views for every split of the Examples artifact and publish them.

    Returns {"splits": [...], "num_examples": {split: n}, "report": path of statistics.html}.
    """
    splits = [s for s in artifacts.SPLITS if artifacts.split_files(examples_uri, s)]
    if not splits:
        raise BadInputError(f"{examples_uri}: no split holds {artifacts.SHARD_PATTERN} shards")
    log.info("StatisticsGen: splits %s of %s", splits, examples_uri)
    with artifacts.publish(statistics_uri, artifacts.STATISTICS, producer=PRODUCER, inputs=(examples_uri,)) as (
        tmp,
        info,
    ):
        work_dir = tmp / "_work"
        with beam_pipeline(beam_args) as p:
            _build_pipeline(p, worker_path(examples_uri), splits, worker_path(work_dir / "manifest"))
        sliced = _read_manifest(work_dir)
        shutil.rmtree(work_dir)
        found = {(s, v): _view(sliced, s, v) for s in splits for v in (RAW, DERIVED)}
        for (split, view), stats in found.items():
            path = stats_path(tmp, split, view)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(stats.SerializeToString())
        counts = {s: _num_examples(found[(s, RAW)]) for s in splits}
        (tmp / REPORT_FILE).write_text(render_report({s: (found[(s, RAW)], found[(s, DERIVED)]) for s in splits}))
        info["counts"] = counts
        info["extra"] = {"splits": splits, "report": REPORT_FILE}
    report = str(Path(statistics_uri) / REPORT_FILE)
    log.info("StatisticsGen: published %s (%s); report %s", statistics_uri, counts, report)
    return {"splits": splits, "num_examples": counts, "report": report}


def _num_examples(stats: Any) -> int:
    return int(stats.datasets[0].num_examples) if stats.datasets else 0


# ------------------------------------------------------------------ the HTML report


def _feature_rows(stats: Any) -> Iterable[list[str]]:
    """One table row per feature: name, type, presence and the numbers a person looks at first."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    if not stats.datasets:
        return
    dataset = stats.datasets[0]
    type_names = statistics_pb2.FeatureNameStatistics.Type.Name
    for feature in dataset.features:
        name = ".".join(feature.path.step) or feature.name
        kind = feature.WhichOneof("stats")
        common = getattr(feature, kind).common_stats if kind in ("num_stats", "bytes_stats", "string_stats") else None
        present = f"{common.num_non_missing} / {dataset.num_examples}" if common else ""
        details = []
        if kind == "num_stats":
            s = feature.num_stats
            details.append(f"mean {s.mean:.4g}, std {s.std_dev:.4g}, min {s.min:.4g}, max {s.max:.4g}")
        for custom in feature.custom_stats:
            if custom.WhichOneof("val") == "num":
                details.append(f"{custom.name} {custom.num:g}")
            elif custom.WhichOneof("val") == "str":
                details.append(f"{custom.name}: {custom.str}")
            elif custom.WhichOneof("val") == "rank_histogram":
                buckets = ", ".join(f"{b.label} {b.sample_count:g}" for b in custom.rank_histogram.buckets)
                details.append(f"{custom.name}: {buckets}")
        yield [name, type_names(feature.type), present, "; ".join(details)]


def _table(title: str, stats: Any) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in _feature_rows(stats)
    )
    head = "".join(f"<th>{h}</th>" for h in ("feature", "type", "present", "statistics"))
    return f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{rows}</table>"


def render_report(per_split: dict[str, tuple[Any, Any]]) -> str:
    """statistics.html: plain tables per split and view, then TFDV's Facets view of each."""
    import tensorflow_data_validation as tfdv

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>segpipe statistics</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style></head><body>",
        "<h1>segpipe statistics</h1>",
    ]
    for split, (raw, derived) in per_split.items():
        parts.append(f"<h2>Split {html.escape(split)}: {_num_examples(raw)} examples</h2>")
        parts.append(_table(f"{split}: raw features (TFDV with image statistics)", raw))
        parts.append(_table(f"{split}: derived features (per example)", derived))
    parts.append("<h2>Facets view (loads its script from the web)</h2>")
    for split, (raw, derived) in per_split.items():
        parts.append(f"<h3>{html.escape(split)}: raw</h3>")
        parts.append(tfdv.get_statistics_html(raw, lhs_name=split))
        parts.append(f"<h3>{html.escape(split)}: derived</h3>")
        parts.append(tfdv.get_statistics_html(derived, lhs_name=split))
    parts.append("</body></html>")
    return "\n".join(parts)
