# syntax=docker/dockerfile:1
# neox-ray image: CUDA PyTorch + flash-attn + Ray + the project, for KubeRay pods (cluster/kuberay/*.yaml).
#
#   docker build -t ghcr.io/your-org/neox-ray:0.1.0 .      # from the repo root
#   docker push ghcr.io/your-org/neox-ray:0.1.0
#
# Layout inside the image: the project is pip-installed (not editable) into the base image's Python, and the
# repository's jobs/ and configs/ are at /opt/neox-ray, which is what RayJob entrypoints name
# (`python /opt/neox-ray/jobs/generate.py --config /opt/neox-ray/configs/...`). Pods run as the non-root user
# `ray` (uid 1000, the uid KubeRay's docs and rayproject/ray images use).
#
# Two stages: flash-attn is built (or its prebuilt wheel fetched) against the *devel* image's torch and nvcc,
# then installed into the *runtime* image of the same tag, so the final image carries no compiler toolchain
# and the wheel matches its torch ABI exactly.

# The base tag pins torch, CUDA and Python together; flash-attn's prebuilt wheels are keyed on all three.
ARG PYTORCH_TAG=2.7.1-cuda12.8-cudnn9
# Must equal spec.rayVersion in cluster/kuberay/*.yaml (tests/test_cluster_manifests.py checks it): the
# KubeRay operator, the head, the workers and the job submitter must all speak the same Ray version.
ARG RAY_VERSION=2.60.0
ARG FLASH_ATTN_VERSION=2.8.3

FROM pytorch/pytorch:${PYTORCH_TAG}-devel AS flash-attn
ARG FLASH_ATTN_VERSION
# flash-attn's setup.py first tries the release wheel matching this torch/CUDA/Python/C++ ABI; only without
# one does it compile (slow: tens of minutes or more; MAX_JOBS caps parallel compiler jobs, hence memory).
ENV MAX_JOBS=8
RUN pip install --no-cache-dir ninja packaging wheel \
 && pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels "flash-attn==${FLASH_ATTN_VERSION}"

FROM pytorch/pytorch:${PYTORCH_TAG}-runtime
ARG RAY_VERSION
# wget: KubeRay's default liveness/readiness probes run `wget ... localhost:52365/api/local_raylet_healthz`
# (and :8000/-/healthz on Serve pods) inside the container; without it pods never become ready.
# uid 1000 becomes `ray` (Ubuntu 24.04 bases already give that uid to `ubuntu`).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
 && useradd --create-home --uid 1000 --shell /bin/bash ray

COPY --from=flash-attn /wheels /tmp/wheels
# ray[default] brings the dashboard and job server KubeRay talks to; torch is already in the base image and
# satisfies the project's `torch>=2.3`, so pip keeps it instead of pulling another CUDA build.
RUN pip install --no-cache-dir /tmp/wheels/*.whl "ray[default,data,serve]==${RAY_VERSION}" \
 && rm -rf /tmp/wheels

WORKDIR /opt/neox-ray
# .dockerignore admits only the package, jobs/, configs/ and the build metadata.
COPY . /opt/neox-ray
# The smoke check needs no GPU (importing flash_attn's CUDA extension may need the driver, absent at build).
RUN pip install --no-cache-dir /opt/neox-ray \
 && python -c "import importlib.metadata as m, neox_ray, ray; print(ray.__version__, m.version('flash-attn'))"

USER 1000:1000
ENV HOME=/home/ray
WORKDIR /home/ray
