"""Validates Kubernetes manifests offline (deploy/checks/tools.sh installs what it needs).

Usage: k8s.py FILE.yaml [--json OUT.json]

Every document is checked against the Kubernetes API JSON schemas of
kubernetes-validate in strict mode (an unknown field is an error, as `kubectl apply
--validate=strict` would say), except KEDA's kinds, which go to keda.mjs (validators
generated from KEDA's CRD schemas). A kind with no schema is an error, never a skip.
Prints one line per object; exits 1 if any object is invalid, 2 on unreadable input.
With --json, also writes the parsed objects as a JSON list (for the tests' own checks).
"""

import json
import os
import subprocess
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.32.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def name_of(doc):
    return "%s/%s" % (doc.get("kind", "?"), (doc.get("metadata") or {}).get("name", "?"))


def main(argv):
    if not argv:
        print("usage: k8s.py FILE.yaml [--json OUT.json]", file=sys.stderr)
        return 2
    path = argv[0]
    out = argv[2] if len(argv) > 2 and argv[1] == "--json" else None
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
    except (OSError, yaml.YAMLError) as e:
        print("error %s: cannot read: %s" % (path, e))
        return 2
    failed = False
    keda = []
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            print("error %s: a document without apiVersion and kind" % path)
            failed = True
            continue
        if doc["apiVersion"].startswith("keda.sh/"):
            keda.append(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            print("ok %s" % name_of(doc))
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            print("error %s: %s: %s" % (name_of(doc), where, e.message))
            failed = True
        except kubernetes_validate.SchemaNotFoundError:
            print("error %s: no schema for %s %s" % (name_of(doc), doc["apiVersion"], doc["kind"]))
            failed = True
    if keda:
        modules = os.path.join(os.environ["REFRESHD_TOOLS_DIR"], "node")
        run = subprocess.run(
            ["node", os.path.join(HERE, "keda.mjs"), modules],
            input=json.dumps(keda),
            text=True,
            capture_output=True,
        )
        sys.stdout.write(run.stdout)
        sys.stderr.write(run.stderr)
        failed = failed or run.returncode != 0
    if out:
        with open(out, "w") as f:
            json.dump(docs, f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
