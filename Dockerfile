# One image runs every lockstep command: operator, relay, crds.
FROM rust:1-bookworm AS build
WORKDIR /src
# rdkafka builds its bundled librdkafka with these.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin lockstep

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/lockstep /usr/local/bin/lockstep
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/lockstep"]
CMD ["operator"]
