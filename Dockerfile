# One image runs every lockstep command: operator, relay, crds.
FROM rust:1-bookworm AS build
WORKDIR /src
# rdkafka builds librdkafka, OpenSSL, zstd and zlib from source, statically, with gcc, make and
# perl (already in rust:1-bookworm; listed to be sure): the binary needs libc only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc make perl \
 && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
# Cargo.toml names the benches: cargo refuses a manifest whose targets are missing.
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin lockstep

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/lockstep /usr/local/bin/lockstep
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/lockstep"]
CMD ["operator"]
