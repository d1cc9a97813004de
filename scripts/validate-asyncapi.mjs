// Validates an AsyncAPI document with the official parser (@asyncapi/parser, pinned in
// package.json): prints every diagnostic, one a line, and exits 1 if any is an error.
//   node scripts/validate-asyncapi.mjs docs/asyncapi.json
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const SEVERITIES = ["error", "warning", "information", "hint"]; // @stoplight/types' numbering

const [path] = process.argv.slice(2);
if (path === undefined) {
  console.error("usage: node scripts/validate-asyncapi.mjs FILE");
  process.exit(2);
}
const { document, diagnostics } = await new Parser().parse(await readFile(path, "utf8"), {
  source: path,
});
for (const { severity, code, message, path: where } of diagnostics) {
  console.log(`${SEVERITIES[severity]} ${code} at ${where.join(".") || "/"}: ${message}`);
}
const errors = diagnostics.filter(({ severity }) => severity === 0).length;
if (errors > 0 || document === undefined) {
  console.log(`${path}: ${errors} error(s): not a valid AsyncAPI document`);
  process.exit(1);
}
console.log(`${path}: a valid AsyncAPI ${document.version()} document`);
