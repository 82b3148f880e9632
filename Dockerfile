# deploybot: multi-stage build, slim runtime, non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
# pip keeps no cache in the image (an environment variable: a test replays these steps).
ENV PIP_NO_CACHE_DIR=1
# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they
# change, not on every code change.
COPY pyproject.toml README.md ./
RUN python -m venv /opt/deploybot \
    && /opt/deploybot/bin/pip install --upgrade pip \
    && /opt/deploybot/bin/python -c "import subprocess, sys, tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; subprocess.run([sys.executable, '-m', 'pip', 'install', *project['dependencies'], *project['optional-dependencies']['postgres']], check=True)"
COPY bot ./bot
COPY migrations ./migrations
RUN /opt/deploybot/bin/pip install --no-deps .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app deploybot \
    && mkdir -p /app/rules /data \
    && chown -R deploybot /app /data
COPY --from=build /opt/deploybot /opt/deploybot
# The example rules ship in the image (mount your own folder over /app/rules).
COPY --chown=deploybot rules /app/rules
WORKDIR /app
USER deploybot
ENV PATH=/opt/deploybot/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DEPLOYBOT_DATABASE_URL=sqlite+aiosqlite:////data/deploybot.db \
    DEPLOYBOT_RULES_DIR=/app/rules \
    DEPLOYBOT_PORT=8080
VOLUME ["/app/rules", "/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"
CMD ["deploybot", "serve"]
