// Validates KEDA objects (a JSON list on stdin) with the validators that
// @kubernetes-models/keda generates from KEDA's CRD schemas. Argument: the npm prefix
// deploy/checks/tools.sh installed it into. One line per object; exit 1 if any is invalid.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const prefix = process.argv[2];
const base = join(prefix, "node_modules", "@kubernetes-models", "keda", "keda.sh", "v1alpha1");
const kinds = new Set(["ScaledObject", "ScaledJob", "TriggerAuthentication", "ClusterTriggerAuthentication"]);
const docs = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const doc of docs) {
  const name = `${doc.kind}/${doc.metadata?.name ?? "?"}`;
  if (!kinds.has(doc.kind)) {
    console.log(`error ${name}: no KEDA schema for ${doc.apiVersion} ${doc.kind}`);
    failed = true;
    continue;
  }
  let model;
  try {
    model = await import(pathToFileURL(join(base, `${doc.kind}.js`)).href);
  } catch {
    console.log(`error ${name}: no KEDA schema for ${doc.apiVersion} ${doc.kind}`);
    failed = true;
    continue;
  }
  if (doc.apiVersion !== "keda.sh/v1alpha1") {
    console.log(`error ${name}: apiVersion must be keda.sh/v1alpha1`);
    failed = true;
    continue;
  }
  try {
    new model[doc.kind](doc).validate();
    console.log(`ok ${name}`);
  } catch (e) {
    console.log(`error ${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
