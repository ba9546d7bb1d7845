// Renders every overlay of deploy/k8s with `kubectl kustomize` and validates
// every object against the Kubernetes API schema: each object becomes an
// instance of its kubernetes-models class (by apiVersion and kind; cert-manager's
// kinds from @kubernetes-models/cert-manager) and .validate() must pass. An
// object of a kind neither knows is a failure too (a typo in apiVersion/kind).
//
// Usage: node tests/deploy/validate_k8s.mjs      (KUBECTL=path overrides kubectl)
// Exit: 0 all valid, 1 invalid objects, 77 skipped (no kubectl installed).
import { spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";

const here = path.dirname(fileURLToPath(import.meta.url));
const k8s = path.resolve(here, "../../deploy/k8s");
const overlays = ["dev", "prod"];
const kubectl = process.env.KUBECTL || "kubectl";

function render(overlay) {
  const r = spawnSync(kubectl, ["kustomize", path.join(k8s, "overlays", overlay)], {
    encoding: "utf8",
    maxBuffer: 64 << 20,
  });
  if (r.error && r.error.code === "ENOENT") {
    console.log(`SKIP: ${kubectl} not installed (Debian 12: package kubernetes-client)`);
    process.exit(77);
  }
  if (r.status !== 0) throw new Error(`kubectl kustomize overlays/${overlay} failed:\n${r.stderr}`);
  return YAML.parseAllDocuments(r.stdout).map((d) => d.toJS()).filter(Boolean);
}

// Custom resources of add-ons the overlays use, by API group: their npm
// package of the same project (the CRDs' OpenAPI schemas).
const addons = { "cert-manager.io": "@kubernetes-models/cert-manager" };

async function modelClass(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : [null, apiVersion];
  const pkg = (group && addons[group]) || "kubernetes-models";
  const spec = group ? `${pkg}/${group}/${version}/${kind}` : `${pkg}/${version}/${kind}`;
  try {
    return (await import(spec))[kind];
  } catch (e) {
    return null;
  }
}

let failures = 0;
for (const overlay of overlays) {
  const objs = render(overlay);
  let valid = 0;
  for (const obj of objs) {
    const id = `${overlay}: ${obj.apiVersion} ${obj.kind}/${obj.metadata?.name}`;
    const Model = await modelClass(obj.apiVersion, obj.kind);
    if (!Model) {
      console.log(`FAIL ${id}: no such kind in the Kubernetes API (kubernetes-models)`);
      failures++;
      continue;
    }
    // kustomize wraps long base64 values; the API server's decoder ignores
    // the line breaks, the schema's "byte" format does not.
    for (const k of ["data"]) {
      if (obj.kind === "Secret" && obj[k]) for (const key in obj[k]) obj[k][key] = obj[k][key].replace(/\s+/g, "");
    }
    try {
      new Model(obj).validate();
      valid++;
    } catch (e) {
      console.log(`FAIL ${id}: ${e.message}`);
      failures++;
    }
  }
  console.log(`overlays/${overlay}: ${valid} of ${objs.length} objects valid`);
}
process.exit(failures ? 1 : 0);
