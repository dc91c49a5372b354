# One image for both processes: `cardline orchestrator serve` or `cardline gateway serve`.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libpcsclite-dev pcscd softhsm2 opensc \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY orchestrator orchestrator
COPY deploy deploy
RUN pip install --no-cache-dir '.[postgres]'
ENTRYPOINT ["cardline"]
