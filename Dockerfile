# feedbridge container image: a release build, run as a non-root user in a
# small runtime image. The build steps are the README's "Build from source"
# steps (scripts/setup.sh --build, then cargo build); CI checks they match.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/setup.sh --build
RUN cargo build --release --locked --bin feedbridge

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/feedbridge --create-home feedbridge
COPY --from=build /src/target/release/feedbridge /usr/local/bin/feedbridge
COPY config /etc/feedbridge
USER feedbridge
WORKDIR /var/lib/feedbridge
EXPOSE 8866 9095
ENTRYPOINT ["feedbridge"]
CMD ["run", "--config", "/etc/feedbridge/feedbridge.toml"]
