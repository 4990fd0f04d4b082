//! The shipped Kubernetes manifests (deploy/) as the tests read them: each overlay rendered by
//! `kubectl kustomize`, its objects as JSON values, and the validators `cargo xtask setup`
//! installs. Shared by the manifest checks (tests/deploy.rs) and the image test
//! (tests/image.rs), which runs the image with the rendered DaemonSet's own settings.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// The repository's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Every overlay under deploy/overlays, sorted.
pub fn overlays() -> Vec<PathBuf> {
    let dir = workspace().join("deploy/overlays");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    all.sort();
    all
}

/// `kubectl kustomize OVERLAY`: the YAML stream `kubectl apply -k` would send.
pub fn render(overlay: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(overlay)
        .output()
        .expect("kubectl is on this kind of machine (cargo xtask setup checks it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        overlay.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 YAML")
}

/// The objects of a YAML stream.
pub fn objects(yaml: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered objects"))
}

/// The rendered plain overlay's objects: what the image test runs.
pub fn plain() -> Vec<Value> {
    objects(&render(&workspace().join("deploy/overlays/plain")))
}

/// The interpreter of the validators' virtualenv (xtask/src/setup.rs, `VALIDATOR_VENV`).
pub fn validator_python() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let python = Path::new(&home).join(".local/share/brokerscope/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup`",
        python.display()
    );
    python
}

/// Runs tests/deploy/validate.py on a YAML file; (success, its output).
pub fn validate(file: &Path, kubernetes_version: &str) -> (bool, String) {
    let out = Command::new(validator_python())
        .arg(workspace().join("tests/deploy/validate.py"))
        .arg(kubernetes_version)
        .arg(file)
        .output()
        .expect("run validate.py");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Metric names in PromQL text: every `brokerscope_*` identifier, and the others a rule may
/// use that the agent does not export (Prometheus's own `up`).
pub fn metric_names(promql: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\b(brokerscope_[a-z0-9_]+|up)\b").expect("regex");
    let mut names: Vec<String> = re
        .find_iter(promql)
        .map(|m| m.as_str().to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Every `expr` and variable `query` in a Grafana dashboard.
pub fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    fn walk(v: &Value, found: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => found.push(s.clone()),
                        ("query", Value::String(s)) => found.push(s.clone()),
                        _ => walk(v, found),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, found)),
            _ => {}
        }
    }
    walk(dashboard, &mut found);
    found
}

/// Metric names present in a Prometheus text page: sample names and `# TYPE` names.
pub fn exported_names(page: &str) -> std::collections::BTreeSet<String> {
    page.lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_metric_names_in_promql() {
        assert_eq!(
            metric_names(
                "histogram_quantile(0.99, sum by (le) (rate(brokerscope_x_bucket{a=\"up\"}[5m]))) \
                 / brokerscope_y - time() < 48 * 3600 or up{job=\"j\"} == 0"
            ),
            ["brokerscope_x_bucket", "brokerscope_y", "up"]
        );
    }

    #[test]
    fn exported_names_come_from_samples_and_types() {
        let page = "# HELP a_total x\n# TYPE a_total counter\na_total{x=\"1\"} 1\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_sum 0\nb 2\n";
        let names = exported_names(page);
        for n in ["a_total", "h", "h_bucket", "h_sum", "b"] {
            assert!(names.contains(n), "{n} in {names:?}");
        }
        assert!(!names.contains("HELP"));
    }
}
