# The image the three parjobs services run from (see compose.yaml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY schemas ./schemas
COPY orchestrator ./orchestrator
COPY workers ./workers
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
