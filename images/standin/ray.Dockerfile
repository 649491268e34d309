# Stand-in for rayproject/ray:<RAY_VERSION>-py311-cpu, built locally because no container registry is reachable
# from the build machines (tests/test_images.py, scripts/standin-base.sh). It is NOT the upstream image: it
# reproduces only what images/cpu and images/trainer rely on from it:
#   - a Debian root filesystem (debootstrap; upstream is Ubuntu) with apt-get working as root;
#   - Python 3.11 in /home/ray/anaconda3 (a venv here, conda upstream), first on PATH, owned by the user below;
#   - Ray at the pinned version (ray[default]), installed in that Python;
#   - the user `ray`, uid 1000, group `users` gid 100, home /home/ray, and USER/WORKDIR set to it;
#   - no compiler (upstream ships none either), so a JIT build at run time fails here as it would in a pod.
# ROOTFS is the debootstrap tree imported as an image (scripts/standin-base.sh builds and caches both).
ARG ROOTFS=localhost/dolly-standin/rootfs:bookworm
FROM ${ROOTFS}

ARG RAY_VERSION=2.60.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV LANG=C.UTF-8 \
    HOME=/home/ray \
    PATH=/home/ray/anaconda3/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray \
    && python3 -m venv /home/ray/anaconda3 \
    && chown -R 1000:100 /home/ray
USER 1000:100
WORKDIR /home/ray
# pip reaches the index through the build machine's CA bundle, mounted read-only for this step only (PIP_CERT is
# a path, never the bundle itself): see docs/images.md.
ARG PIP_CERT
ARG PIP_INDEX_URL
RUN python -m pip install --no-cache-dir --disable-pip-version-check -q "ray[default]==${RAY_VERSION}" \
    && python -c "import ray, sys; assert ray.__version__ == '${RAY_VERSION}', ray.__version__; print('ray', ray.__version__, sys.version)"
CMD ["/bin/bash"]
