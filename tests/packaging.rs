//! The container path and the tested path cannot drift: the Dockerfile's
//! build steps are the README's, and the compose file mounts configs that
//! exist. (`scripts/test.sh` also validates the compose file with
//! `docker-compose config -q`; no engine runs in CI.)

use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

const BUILD_STEPS: [&str; 2] = [
    "scripts/setup.sh --build",
    "cargo build --release --locked --bin feedbridge",
];

#[test]
fn dockerfile_builds_the_way_the_readme_says() {
    let dockerfile = read("Dockerfile");
    let readme = read("README.md");
    for step in BUILD_STEPS {
        assert!(
            dockerfile.contains(&format!("RUN {step}")),
            "Dockerfile lacks `RUN {step}`"
        );
        assert!(
            readme.contains(step),
            "README lacks the build step `{step}`"
        );
    }
    assert!(
        dockerfile.contains("USER feedbridge"),
        "the image runs as a non-root user"
    );
}

#[test]
fn compose_uses_existing_configs_and_health_checks() {
    let compose = read("docker-compose.yml");
    assert!(compose.contains("${FEEDBRIDGE_CONFIG:-feedbridge.toml}"));
    for name in [
        "feedbridge.toml",
        "redis-zmq.toml",
        "redis-redis.toml",
        "etcd-etcd.toml",
    ] {
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(name)
                .exists(),
            "{name}"
        );
    }
    // Every config the compose file names exists.
    for word in compose.split(|c: char| c.is_whitespace() || c == '"' || c == '/' || c == '=') {
        if let Some(name) = word.strip_suffix(".toml").filter(|n| !n.contains('{')) {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("config")
                    .join(format!("{name}.toml"))
                    .exists(),
                "docker-compose.yml names config/{name}.toml"
            );
        }
    }
    assert_eq!(
        compose.matches("healthcheck:").count(),
        5,
        "etcd, redis, feedbridge, the cluster nodes (one anchor) and the cluster's bridge have health checks"
    );
}
