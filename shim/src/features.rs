//! What the runtime tells containerd it supports: `containerd-shim-hako-v2 -info` prints a
//! `containerd.types.RuntimeInfo` (protobuf) whose `features` is the OCI runtime-spec features
//! document (JSON), as `runc features` prints it. containerd 2.x reads it before it sends a
//! spec with `rro` mounts (ctr validates them; the CRI plugin reports recursive read-only
//! mounts as supported, so Kubernetes asks for them).

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use serde_json::json;

/// `types.containerd.io/opencontainers/runtime-spec/1/features/Features`.
const FEATURES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("the runtime options on stdin are not a protobuf Any: {0}")]
    Options(String),
    #[error("encoding the runtime info: {0}")]
    Encode(String),
}

/// The OCI features document: the hooks hako runs (on the host), every mount option it
/// knows, the namespaces and cgroup version of the guest, seccomp.
pub fn features() -> serde_json::Value {
    let mount_options: Vec<&str> = hako_protocol::mount_options::names().collect();
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.1",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": mount_options,
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false, "rdma": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": false}}
        },
        "annotations": {
            "io.github.hako.version": env!("CARGO_PKG_VERSION")
        }
    })
}

/// The `-info` answer: `options` is what containerd passed on stdin (its runtime options, an
/// `Any`, or nothing), echoed back.
pub fn runtime_info(runtime: &str, options: &[u8]) -> Result<Vec<u8>, FeaturesError> {
    let options = if options.is_empty() {
        MessageField::none()
    } else {
        MessageField::some(
            Any::parse_from_bytes(options).map_err(|e| FeaturesError::Options(e.to_string()))?,
        )
    };
    let features =
        serde_json::to_vec(&features()).map_err(|e| FeaturesError::Encode(e.to_string()))?;
    let info = RuntimeInfo {
        name: runtime.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }),
        options,
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE.to_string(),
            value: features,
            ..Default::default()
        }),
        ..Default::default()
    };
    info.write_to_bytes()
        .map_err(|e| FeaturesError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_a_runtime_info_with_the_features_document() {
        let bytes = runtime_info("io.containerd.hako.v2", &[]).expect("encodes");
        let info = RuntimeInfo::parse_from_bytes(&bytes).expect("parses");
        assert_eq!(info.name, "io.containerd.hako.v2");
        assert!(info.options.is_none());
        let features = info.features.as_ref().expect("features");
        assert_eq!(features.type_url, FEATURES_TYPE);
        let doc: serde_json::Value = serde_json::from_slice(&features.value).expect("json");
        let options = doc["mountOptions"].as_array().expect("list");
        for wanted in ["rro", "ro", "rbind", "nosuid", "rnoexec"] {
            assert!(options.iter().any(|o| o == wanted), "{wanted}");
        }
        assert!(!options.iter().any(|o| o == "idmap"));
        // Options come back as they were given.
        let given = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 1, b'x'],
            ..Default::default()
        };
        let bytes = runtime_info("x", &given.write_to_bytes().expect("any")).expect("encodes");
        let info = RuntimeInfo::parse_from_bytes(&bytes).expect("parses");
        assert_eq!(info.options.as_ref(), Some(&given));
        assert!(runtime_info("x", b"\xff\xff").is_err());
    }
}
