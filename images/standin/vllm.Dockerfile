# Stand-in for vllm/vllm-openai:v<vllm pin>, built locally because no container registry is reachable from the
# build machines (tests/test_images.py, scripts/standin-base.sh). It is NOT the upstream image. It reproduces
# what images/evaluator/Dockerfile relies on from it:
#   - a root-owned Python 3 with pip first on PATH, installed into as root (upstream: Ubuntu, Python 3.12;
#     here Debian's 3.11 in a venv at /opt/venv, since Debian's own pip refuses to upgrade itself);
#   - root as the build user, no user with uid 1000 yet (the evaluator Dockerfile creates it);
#   - an ENTRYPOINT (the OpenAI server upstream) that the evaluator Dockerfile must reset.
# It does NOT have CUDA, the CUDA torch build or vLLM: the stand-in build of the evaluator installs the CPU
# builds instead (build flags EXTRAS=eval,k8s TORCH=cpu, docs/images.md).
ARG ROOTFS=localhost/dolly-standin/rootfs:bookworm
FROM ${ROOTFS}

ENV LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv /opt/venv
WORKDIR /vllm-workspace
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
