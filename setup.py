"""segpipe: a TFX-style image segmentation pipeline (TFT + TFDV on Beam, Keras U-Net, Kubeflow).

Ranges here say what segpipe is compatible with; `constraints.txt` pins the exact,
tested set. Install with `pip install -c constraints.txt -e .`.
"""
from setuptools import setup

setup(
    name="segpipe",
    version="0.1.0",
    description="Production U-Net segmentation pipeline: TFRecords -> TFDV -> TFT -> Keras -> Kubeflow",
    python_requires=">=3.11,<3.12",
    # One import package, `segpipe`, mapped from the repository's top-level folders: the tree a
    # reader opens is the tree Python imports. `segpipe` itself is a namespace with no folder.
    packages=[
        "segpipe.components",
        "segpipe.components.core",
        "segpipe.components.tools",
        "segpipe.pipeline",
        "segpipe.schemas",
    ],
    package_dir={
        "segpipe.components": "components",
        "segpipe.pipeline": "pipeline",
        "segpipe.schemas": "schemas",
    },
    package_data={
        "segpipe.pipeline": ["*.yaml", "profiles/*.yaml"],
        "segpipe.schemas": ["*.pbtxt"],
    },
    install_requires=[
        "tensorflow>=2.16.2,<2.17",
        "keras>=3.3,<4",
        "tensorflow-transform>=1.16,<1.17",
        "tensorflow-data-validation>=1.16.1,<1.17",
        "tfx-bsl>=1.16.1,<1.17",
        "apache-beam[gcp]>=2.72,<2.73",
        "dill",  # TFT imports it; Beam no longer pulls it in
        "google-crc32c",  # ExampleGen checks TFRecord CRCs itself to name the bad record
        "kfp>=2.13,<2.14",  # 2.14+ needs protobuf 6, which TF 2.16 forbids
        "kfp-kubernetes>=1.5,<1.6",
        "keras-tuner>=1.4,<1.5",  # the Tuner node; 1.4 is the first line that runs on Keras 3
        "ml-metadata>=1.16,<1.17",
        "numpy>=1.26,<2",
        "protobuf>=4.25,<5",
        "pyarrow==10.0.1",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.8",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"console_scripts": ["segpipe=segpipe.pipeline.cli:entry"]},
)
