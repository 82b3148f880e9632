# deploybot: multi-stage build, slim runtime, non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY migrations ./migrations
RUN python -m venv /opt/deploybot \
    && /opt/deploybot/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/deploybot/bin/pip install --no-cache-dir ".[postgres]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app deploybot \
    && mkdir -p /app/rules /data \
    && chown -R deploybot /app /data
COPY --from=build /opt/deploybot /opt/deploybot
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
