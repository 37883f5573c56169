# One image for the gateway and the upstream (they are one Python project).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY upstream ./upstream
RUN pip install --no-cache-dir . && useradd --system --home /app emp && mkdir -p /app/var && chown emp /app/var
COPY config ./config
COPY policies ./policies
USER emp
ENTRYPOINT ["gateway"]
CMD ["serve"]
