# Image of the scg-token-operator binary.
#   docker build -t ghcr.io/scgtoken/scg-token-operator:0.1.0 .

# ---- build ----------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies first, against stub sources: this layer is rebuilt only when a manifest or
# Cargo.lock changes, not on every source edit. testkit is a workspace member, so cargo
# needs its manifest (and a target) to load the workspace, though the operator never
# links it.
COPY Cargo.toml Cargo.lock ./
COPY testkit/Cargo.toml testkit/Cargo.toml
RUN mkdir -p src testkit/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs testkit/src/lib.rs \
    && cargo build --release --locked -p scg-token-operator \
    && rm -rf src testkit/src

COPY src src
COPY testkit/src testkit/src
# COPY keeps the sources' old timestamps, older than the stub build: touch them so cargo
# rebuilds the operator crate instead of shipping the stub.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p scg-token-operator \
    && cp target/release/scg-token-operator /scg-token-operator

# ---- runtime --------------------------------------------------------------------------
# distroless/cc: glibc and libgcc for the Rust binary, CA certificates for TLS to SCG and
# the API server, no shell, no package manager. The nonroot tag runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="scg-token-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps Syniverse SCG access tokens fresh in Secrets" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/scgtoken/scg-token-operator"

COPY --from=builder /scg-token-operator /scg-token-operator

# Numeric, so Kubernetes' runAsNonRoot check can verify it without /etc/passwd.
USER 65532:65532
# Admin server: /metrics, /healthz, /readyz.
EXPOSE 8080
ENTRYPOINT ["/scg-token-operator"]
CMD ["run"]
