# shadowproxy: slim runtime image, non-root, config mounted at /etc/shadowproxy/shadowproxy.toml.
FROM python:3.11-slim AS build
WORKDIR /src
# A C compiler for the hot path's mypyc build (setup.py); it stays in this stage.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY shadowproxy ./shadowproxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY config/shadowproxy.toml /etc/shadowproxy/shadowproxy.toml
RUN useradd --system --uid 10001 --no-create-home shadowproxy
USER 10001
EXPOSE 8080 9090
# Liveness only checks the process; readiness (/readyz) is for the orchestrator to probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status == 200 else 1)"]
# SIGTERM drains in-flight requests (listen.drain_timeout_s) before exiting 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["shadowproxy"]
CMD ["serve", "--config", "/etc/shadowproxy/shadowproxy.toml"]
