# callscribe with the embedded engine: slim, non-root, health-checked.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY callscribe ./callscribe
# [remote]: the tokenizer engine remote needs (the compose gpu profile); small, so always in.
RUN pip install --no-cache-dir --prefix=/install '.[remote]'

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/callscribe --create-home callscribe
USER callscribe
WORKDIR /var/lib/callscribe
# Every listener on every interface of the container. The address peers must send RTP to is
# not knowable from inside: `callscribe serve` refuses to start until CALLSCRIBE_RTP_PUBLIC_HOST
# is set (docker run -e CALLSCRIBE_RTP_PUBLIC_HOST=<the host's address>; compose sets it).
ENV CALLSCRIBE_HTTP_HOST=0.0.0.0 \
    CALLSCRIBE_RTP_HOST=0.0.0.0 \
    CALLSCRIBE_AUDIOSOCKET_HOST=0.0.0.0 \
    CALLSCRIBE_SIP_HOST=0.0.0.0 \
    CALLSCRIBE_SPOOL_DIR=/var/lib/callscribe/spool \
    PYTHONUNBUFFERED=1
EXPOSE 8080/tcp 9092/tcp 5060/udp 5060/tcp 40000/udp 40002-40099/udp
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
ENTRYPOINT ["callscribe"]
CMD ["serve"]
