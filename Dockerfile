# goodspeed on the CPU. For CUDA, start from a CUDA base image and install the matching torch build.
FROM python:3.11-slim

WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY api ./api
COPY engine ./engine
COPY server ./server
COPY client ./client
COPY bench ./bench
COPY proto ./proto
RUN pip install --no-cache-dir .

# The converted model lives here; mount a volume so it is downloaded once.
ENV GOODSPEED_CACHE=/cache
VOLUME /cache
EXPOSE 50051 9090

HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["goodspeed", "health", "--target", "localhost:50051"]
CMD ["goodspeed", "serve", "--port", "50051", "--metrics-port", "9090"]
