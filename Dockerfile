# slsr-ray on the official Ray image of the Ray version this project is tested with (2.60.0, Python 3.11).
#
#   CPU image:  docker build -t REGISTRY/slsr-ray:0.1.0-cpu .
#   GPU image:  docker build --build-arg VARIANT=-gpu -t REGISTRY/slsr-ray:0.1.0-gpu .
#   push:       docker push REGISTRY/slsr-ray:0.1.0-gpu
#
# VARIANT picks the base image: "" is rayproject/ray:2.60.0-py311 (Ubuntu, CPU only), "-gpu" is
# rayproject/ray:2.60.0-py311-gpu (CUDA). The GPU variant installs the package with its `gpu` extra
# (faiss on the GPU); the CPU variant takes torch from PyTorch's CPU wheel index (no CUDA libraries).
ARG RAY_VERSION=2.60.0
ARG VARIANT=""
FROM rayproject/ray:${RAY_VERSION}-py311${VARIANT}

ARG RAY_VERSION
ARG VARIANT
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# --chown: the image runs as the unprivileged `ray` user, and pip builds the package in place
COPY --chown=ray:users pyproject.toml README.md /home/ray/slsr-ray/
COPY --chown=ray:users slsr_ray /home/ray/slsr-ray/slsr_ray
COPY --chown=ray:users jobs /home/ray/slsr-ray/jobs
WORKDIR /home/ray/slsr-ray

# Ray stays at the base image's version (the pin below); faiss-cpu and faiss-gpu-cu12 both ship the
# `faiss` module, so the GPU variant keeps only the GPU one.
RUN set -eux; \
    extras=""; \
    if [ "${VARIANT}" = "-gpu" ]; then extras="[gpu]"; else export PIP_EXTRA_INDEX_URL="${TORCH_CPU_INDEX}"; fi; \
    pip install --no-cache-dir "ray[default,data,train,tune]==${RAY_VERSION}" "/home/ray/slsr-ray${extras}"; \
    if [ "${VARIANT}" = "-gpu" ]; then \
        pip uninstall -y faiss-cpu; \
        pip install --no-cache-dir --force-reinstall --no-deps "faiss-gpu-cu12>=1.8"; \
    fi; \
    python -c "import faiss, ray, slsr_ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"; \
    slsr --help > /dev/null

ENV RAY_TRAIN_V2_ENABLED=1
# The Ray image's entrypoint stays; cluster launchers and KubeRay run `ray start` themselves, and
# `docker run IMAGE slsr demo` runs the laptop demo inside the container.
