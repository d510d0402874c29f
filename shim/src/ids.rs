//! Identifier checks. Every id that reaches a path on the host (container, exec, sandbox,
//! namespace) passes through here first, before any filesystem access.

/// An id that failed validation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} {shown}: ids must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}$")]
pub struct IdError {
    pub kind: &'static str,
    /// The id, quoted and escaped so NUL and control bytes show.
    pub shown: String,
}

/// Checks `id` against the rule both sides share (`hako_protocol::valid_id`), before any
/// filesystem access, and says which id failed.
pub fn validate(kind: &'static str, id: &str) -> Result<(), IdError> {
    if hako_protocol::valid_id(id) {
        Ok(())
    } else {
        let mut shown: String = id.chars().take(140).collect();
        if id.chars().count() > 140 {
            shown.push_str("...");
        }
        Err(IdError {
            kind,
            shown: format!("{shown:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for id in [
            "a",
            "t1",
            "default",
            "k8s.io",
            "abc_DEF-012.x",
            &"f".repeat(128),
        ] {
            assert_eq!(validate("container id", id), Ok(()), "{id}");
        }
    }

    #[test]
    fn refuses_paths_and_odd_bytes() {
        for id in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "a\0b",
            "-x",
            "_x",
            "a b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(validate("container id", id).is_err(), "{id:?}");
        }
    }

    #[test]
    fn error_names_the_id_and_escapes_it() {
        let err = validate("namespace", "a\0b").expect_err("NUL must be refused");
        assert_eq!(err.kind, "namespace");
        assert!(
            err.to_string().starts_with("invalid namespace \"a\\0b\""),
            "{err}"
        );
    }
}
