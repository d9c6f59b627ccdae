# segpipe image: the one every Kubeflow task runs in (GPU-capable; runs on CPU nodes unchanged).
# Build: docker build -t segpipe:0.1.0 .      Run: docker run --gpus all segpipe:0.1.0 run --root /data/root
FROM tensorflow/tensorflow:2.16.2-gpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/segpipe

# Dependencies first, from the lock, so code edits do not reinstall them.
COPY constraints.txt setup.py pyproject.toml README.md ./
COPY components/ components/
COPY pipeline/ pipeline/
COPY schemas/ schemas/
RUN python3 -m pip install -c constraints.txt . \
 && cd / && python3 -c "import segpipe.components, segpipe.pipeline.cli, segpipe.schemas"

# Never run as root; KFP mounts artifacts under /tmp or object-storage fuse paths.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin segpipe
USER 10001:10001
WORKDIR /home/segpipe

ENTRYPOINT ["segpipe"]
CMD ["--help"]
