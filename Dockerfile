# One image runs every lockstep command: operator, relay, replay, crds.
#
# The bases are build arguments so that a machine that cannot pull them (an air-gapped builder, or
# the test environment, which has no registry) can supply equivalent local ones:
#   buildah bud --build-arg BUILD_IMAGE=<rust + gcc/make/perl> --build-arg RUNTIME_IMAGE=<glibc, uid 65532> .
ARG BUILD_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
# rdkafka builds librdkafka, OpenSSL, zstd and zlib from source, statically, with gcc, make and
# perl (all in rust:1-bookworm): the binary needs libc only.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml names the benches: cargo refuses a manifest whose targets are missing.
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin lockstep

FROM ${RUNTIME_IMAGE}
COPY --from=build /src/target/release/lockstep /usr/local/bin/lockstep
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/lockstep"]
CMD ["operator"]
