# One image for every service; the command picks the service (`voiceassist serve auth`, ...).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home voiceassist
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY services ./services
# Editable, so the code stays under /app next to gen/voiceassist.binpb (the control plane serves it to Envoy).
RUN pip install --no-cache-dir -e .
USER 10001
ENV ENVIRONMENT=production GRPC_HOST=0.0.0.0 METRICS_HOST=0.0.0.0 DATA_DIR=/var/lib/voiceassist
ENTRYPOINT ["voiceassist"]
