# The image the three parjobs services run from (see compose.yaml).
FROM python:3.11-slim
# bubblewrap: compute runs every calculation in a bwrap sandbox and refuses to start without one
# (PARJOBS_SANDBOX=none opts out). Docker's default seccomp profile blocks the namespaces bwrap
# creates (moby/moby#42441) and its AppArmor profile the mounts: the compute container needs
# security_opt profiles that allow them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY schemas ./schemas
COPY orchestrator ./orchestrator
COPY workers ./workers
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
