//! `[*.auth]`: credentials and TLS files of a database connection.

use std::path::PathBuf;

use serde::Deserialize;

/// Credentials and TLS of a database connection. Secrets come from the
/// environment or a file, never from the config file, and never appear in
/// logs or in `check` output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// User name (etcd user, Redis ACL user).
    #[serde(default)]
    pub user: Option<String>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate to verify the server (etcd `https://`, Redis `rediss://`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl AuthConfig {
    /// The password, read from its variable or file.
    pub fn password(&self) -> Result<Option<String>, String> {
        match (&self.password_env, &self.password_file) {
            (Some(_), Some(_)) => Err("set password_env or password_file, not both".into()),
            (Some(var), None) => std::env::var(var)
                .map(Some)
                .map_err(|_| format!("environment variable {var} (password_env) is not set")),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|p| Some(p.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read password_file {}: {e}", path.display())),
            (None, None) => Ok(None),
        }
    }

    /// Reads a PEM file named in this section.
    pub fn pem(path: &Option<PathBuf>, field: &str) -> Result<Option<Vec<u8>>, String> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| format!("cannot read {field} {}: {e}", p.display()))
            })
            .transpose()
    }

    /// Checks that secrets and files can be read, and that a client
    /// certificate comes with its key.
    pub fn check(&self) -> Result<(), String> {
        self.password()?;
        Self::pem(&self.ca_file, "ca_file")?;
        Self::pem(&self.cert_file, "cert_file")?;
        Self::pem(&self.key_file, "key_file")?;
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert_file and key_file go together".into());
        }
        Ok(())
    }
}
