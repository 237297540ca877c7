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

/// The Kubernetes sidecar example: every manifest parses (PyYAML, which
/// `scripts/setup.sh` installs), and what must agree does: the ConfigMap's
/// config is valid for this binary, the container mounts it where its
/// `--config` points, the probes and the Prometheus annotation use the
/// admin listener's port, `/livez` and `/readyz` are what the admin
/// listener serves, the ZeroMQ port is the backend's, the image is the
/// compose file's.
#[test]
fn kubernetes_manifests_agree_with_the_config_and_the_binary() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/etcd-with-feedbridge.yaml");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&path)
        .output()
        .expect("python3 with PyYAML (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let toml = kind("ConfigMap")["data"]["feedbridge.toml"]
        .as_str()
        .unwrap();
    let config = feedbridge::config::Config::parse(toml, Path::new("configmap")).unwrap();
    config.validate(Path::new("configmap")).unwrap();
    let admin_port: u64 = config
        .admin
        .listen
        .as_deref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let feedbridge::config::BackendConfig::Zmq(zmq) = &config.backend else {
        panic!("the example publishes on ZeroMQ");
    };
    let zmq_port: u64 = zmq.bind.rsplit(':').next().unwrap().parse().unwrap();

    let pod = &kind("StatefulSet")["spec"]["template"];
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let containers = pod["spec"]["containers"].as_array().unwrap();
    let c = containers
        .iter()
        .find(|c| c["name"] == "feedbridge")
        .unwrap();
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port("admin"), admin_port);
    assert_eq!(port("zmq"), zmq_port);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    let admin_rs = read("src/admin.rs");
    for route in ["\"/livez\"", "\"/readyz\"", "\"/metrics\""] {
        assert!(
            admin_rs.contains(route),
            "the admin listener serves {route}"
        );
    }
    // The image is the one compose builds; the config is mounted where
    // the arguments (the Dockerfile's default command) read it.
    let image = c["image"].as_str().unwrap();
    assert!(
        read("docker-compose.yml").contains(&format!("image: {image}")),
        "{image}"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/feedbridge/feedbridge.toml"]);
    assert!(read("Dockerfile")
        .contains(r#"CMD ["run", "--config", "/etc/feedbridge/feedbridge.toml"]"#));
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    assert_eq!(mount["mountPath"], "/etc/feedbridge");
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(
        volume["configMap"]["name"],
        kind("ConfigMap")["metadata"]["name"]
    );
    // The source is the etcd container of the same pod.
    let feedbridge::config::SourceConfig::Etcd(source) = config.source.as_ref().unwrap() else {
        panic!("an etcd source");
    };
    assert_eq!(source.endpoints, ["http://127.0.0.1:2379"]);
    let etcd = containers.iter().find(|c| c["name"] == "etcd").unwrap();
    assert!(etcd["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["containerPort"] == 2379));
}

/// The Debian package's pieces agree with each other: every asset that is
/// not generated by `scripts/package.sh` exists, the unit runs the binary
/// and reads the config where the package puts them, as the user the
/// package creates, and the maintainer scripts leave room for cargo-deb's
/// generated fragments. (`scripts/package.sh --test`, run by
/// `scripts/test.sh`, builds the package and installs it.)
#[test]
fn the_debian_package_installs_what_the_unit_runs() {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let mut dests = Vec::new();
    for asset in deb["assets"].as_array().unwrap() {
        let [source, dest, _mode] = &asset.as_array().unwrap()[..] else {
            panic!("asset {asset:?}: [source, dest, mode]")
        };
        let (source, dest) = (source.as_str().unwrap(), dest.as_str().unwrap());
        dests.push(format!("/{dest}"));
        if source.starts_with("target/") {
            continue; // built, or generated from the built binary
        }
        let found = if let Some(dir) = source.strip_suffix("/*.toml") {
            std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
                .unwrap()
                .count()
                > 0
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(source).exists()
        };
        assert!(found, "the package's asset {source} does not exist");
    }
    assert!(dests.contains(&"/usr/bin/".to_string()));
    assert!(dests.contains(&"/etc/feedbridge/feedbridge.toml".to_string()));

    let units = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    let unit = read(&format!("{units}/feedbridge.service"));
    assert!(
        unit.contains("ExecStart=/usr/bin/feedbridge run --config /etc/feedbridge/feedbridge.toml")
    );
    let user = unit
        .lines()
        .find_map(|l| l.strip_prefix("User="))
        .expect("the unit names its user");
    let sysusers = read(&format!("{units}/feedbridge.sysusers"));
    assert!(
        sysusers
            .lines()
            .any(|l| l.starts_with(&format!("u {user} "))),
        "the package creates the unit's user {user}"
    );
    assert!(
        sysusers.contains("/var/lib/feedbridge") && unit.contains("StateDirectory=feedbridge"),
        "the user's home is the unit's state directory"
    );

    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    for script in ["postinst", "postrm"] {
        let text = read(&format!("{scripts}/{script}"));
        assert!(
            text.contains("\n#DEBHELPER#\n"),
            "{script} lacks #DEBHELPER#"
        );
        assert!(text.starts_with("#!/bin/sh\n") && text.contains("set -e"));
    }
    // The config the package installs as its conffile is valid.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/feedbridge.toml");
    feedbridge::config::Config::load(&config).unwrap();
}
