# One image for both servers: `cardline orchestrator serve` (the default command) or, with
# deploy/gateway-softhsm.sh or `gateway serve`, a gateway. It carries a default configuration:
# the settings file /etc/cardline/settings.yaml (deploy/settings.yaml) and the configuration
# directory /etc/cardline/config (examples/). Mount TLS files at /etc/cardline/tls, secrets
# at /run/secrets, data at /var/lib/cardline (docker-compose.yml, docs/operator-guide.md).
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libpcsclite-dev pcscd softhsm2 opensc openssl \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY orchestrator orchestrator
RUN pip install --no-cache-dir '.[postgres]'
COPY examples /etc/cardline/config
COPY deploy/settings.yaml /etc/cardline/settings.yaml
COPY deploy/gateway-softhsm.sh /app/deploy/gateway-softhsm.sh
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/cardline --create-home cardline
ENV CARDLINE_CONFIG=/etc/cardline/settings.yaml
USER 10001:10001
WORKDIR /var/lib/cardline
VOLUME ["/var/lib/cardline"]
EXPOSE 7400 7401
# The orchestrator's; a gateway service overrides it with `cardline health --server gateway`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["cardline", "health", "--server", "orchestrator"]
ENTRYPOINT ["cardline"]
CMD ["orchestrator", "serve"]
