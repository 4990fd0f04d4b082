//! Tracepoint record layouts, read from tracefs at load time.
//!
//! Field offsets of a tracepoint record are ABI only by convention; reading them from
//! `events/<category>/<name>/format` keeps the kernel programs right on kernels that moved them.

use std::{collections::HashMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    NoField { tracepoint: String, field: String },
    #[error("tracepoint {tracepoint} does not exist on this kernel ({reason})")]
    NoTracepoint { tracepoint: String, reason: String },
}

/// A field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// The fields of one tracepoint, by name.
#[derive(Debug)]
pub struct Format {
    tracepoint: String,
    fields: HashMap<String, Field>,
    /// Why the tracepoint could not be read (it does not exist here, or its module is not
    /// loaded): every field lookup then says so, and only the programs needing it go.
    missing: Option<String>,
}

impl Format {
    /// Reads `<tracefs>/events/<category>/<name>/format`. A tracepoint this kernel lacks gives
    /// a format without fields whose lookups name the cause.
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Self {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let tracepoint = format!("{category}:{name}");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&tracepoint, &text),
            Err(e) => Self {
                tracepoint,
                fields: HashMap::new(),
                missing: Some(format!("cannot read {}: {e}", path.display())),
            },
        }
    }

    /// Reads the format of `category:name` from a capture of several tracefs `format` files,
    /// each after a line `== <category>/<name>` (the kernels under test, see
    /// `testdata/kernels`).
    #[cfg(test)]
    pub fn from_capture(capture: &str, category: &str, name: &str) -> Self {
        let header = format!("== {category}/{name}");
        let tracepoint = format!("{category}:{name}");
        let mut lines = capture.lines();
        if lines.by_ref().any(|l| l.trim_end() == header) {
            let text: Vec<&str> = lines.take_while(|l| !l.starts_with("== ")).collect();
            Self::parse(&tracepoint, &text.join("\n"))
        } else {
            Self {
                tracepoint,
                fields: HashMap::new(),
                missing: Some("not in the capture".into()),
            }
        }
    }

    /// Parses lines such as `field:__u16 sport; offset:24; size:2; signed:0;`.
    pub fn parse(tracepoint: &str, text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.trim().split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse().ok();
                } else if let Some(s) = part.strip_prefix("size:") {
                    size = s.parse().ok();
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                continue;
            };
            // The name is the last identifier of the declaration, before any array suffix.
            let name = decl
                .split('[')
                .next()
                .and_then(|d| d.split_whitespace().last())
                .map(|n| n.trim_start_matches('*'));
            if let Some(name) = name {
                fields.insert(name.to_string(), Field { offset, size });
            }
        }
        Self {
            tracepoint: tracepoint.into(),
            fields,
            missing: None,
        }
    }

    /// The field `name`, which must have `size` bytes.
    pub fn field(&self, name: &str, size: u32) -> Result<u32, FormatError> {
        if let Some(reason) = &self.missing {
            return Err(FormatError::NoTracepoint {
                tracepoint: self.tracepoint.clone(),
                reason: reason.clone(),
            });
        }
        match self.fields.get(name) {
            Some(f) if f.size == size => Ok(f.offset),
            _ => Err(FormatError::NoField {
                tracepoint: self.tracepoint.clone(),
                field: format!("{name} ({size} bytes)"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INET_SOCK_SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"
";

    #[test]
    fn parses_scalar_pointer_and_array_fields() {
        let f = Format::parse("sock:inet_sock_set_state", INET_SOCK_SET_STATE);
        assert_eq!(f.field("skaddr", 8).unwrap(), 8);
        assert_eq!(f.field("oldstate", 4).unwrap(), 16);
        assert_eq!(f.field("newstate", 4).unwrap(), 20);
        assert_eq!(f.field("sport", 2).unwrap(), 24);
        assert_eq!(f.field("protocol", 2).unwrap(), 30);
        assert_eq!(f.field("saddr_v6", 16).unwrap(), 40);
    }

    #[test]
    fn missing_or_resized_fields_are_named() {
        let f = Format::parse("sock:inet_sock_set_state", INET_SOCK_SET_STATE);
        let err = f.field("dport", 2).unwrap_err().to_string();
        assert!(
            err.contains("dport") && err.contains("inet_sock_set_state"),
            "{err}"
        );
        assert!(f.field("sport", 4).is_err());
    }
}
