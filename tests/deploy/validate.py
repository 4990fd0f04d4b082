"""Validates rendered Kubernetes objects offline, strictly (unknown fields are errors).

usage: validate.py KUBERNETES_VERSION FILE...   (multi-document YAML, e.g. `kubectl kustomize` output)

- Built-in kinds: kubernetes-validate's strict schemas for KUBERNETES_VERSION (the same check as
  `kubernetes-validate --strict -k VERSION`).
- cert-manager.io and monitoring.coreos.com kinds: the JSON schema of the cloudcoil models
  generated from those projects' CRDs (cloudcoil-models-cert-manager,
  cloudcoil-models-prometheus-operator), made strict the way kubernetes-validate makes its
  strict schemas: `additionalProperties: false` on every object that lists its properties.

Prints one line per object; exits 1 when any object is invalid or has no schema.
Run by tests/tests/deploy.rs with the interpreter `cargo xtask setup` installs them into.
"""

import importlib
import sys

import jsonschema
import kubernetes_validate
import yaml

CRD_MODULES = {
    "cert-manager.io/v1": "cloudcoil.models.cert_manager.v1",
    "monitoring.coreos.com/v1": "cloudcoil.models.prometheus_operator.v1",
}


def strict(node):
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def crd_schema(api_version, kind):
    module = importlib.import_module(CRD_MODULES[api_version])
    model = getattr(module, kind, None)
    if model is None:
        return None, None
    package = module.__name__.rsplit(".", 1)[0].replace(".", "-").replace("_", "-")
    version = importlib.metadata.version(package)
    return strict(model.model_json_schema(mode="validation")), f"{package} {version}"


def main():
    import importlib.metadata  # noqa: F401  (used through importlib above)

    version, files = sys.argv[1], sys.argv[2:]
    failed = 0
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            api_version = doc.get("apiVersion", "")
            if api_version in CRD_MODULES:
                schema, source = crd_schema(api_version, doc.get("kind"))
                if schema is None:
                    print(f"invalid {name}: no schema for {api_version} {doc.get('kind')}")
                    failed += 1
                    continue
                errors = sorted(
                    jsonschema.Draft202012Validator(schema).iter_errors(doc),
                    key=lambda e: list(e.absolute_path),
                )
                if errors:
                    # An optional field's schema is anyOf(object, null): name the innermost cause.
                    for e in (jsonschema.exceptions.best_match([e]) for e in errors):
                        path_text = ".".join(str(p) for p in e.absolute_path)
                        print(f"invalid {name} against {source}: {path_text}: {e.message[:300]}")
                    failed += 1
                else:
                    print(f"ok {name} against {source} (strict)")
                continue
            try:
                used = kubernetes_validate.validate(doc, version, strict=True)
                print(f"ok {name} against Kubernetes {used} (strict)")
            except kubernetes_validate.SchemaNotFoundError as e:
                print(f"invalid {name}: {e}")
                failed += 1
            except kubernetes_validate.ValidationError as e:
                path_text = ".".join(str(p) for p in e.path)
                print(f"invalid {name} against Kubernetes {e.version}: {path_text}: {e.message[:300]}")
                failed += 1
    print(f"{failed} invalid")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
