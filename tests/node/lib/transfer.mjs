// Moving data through opened PARs: plain HTTP to S3's presigned URLs (docs/pars.md, "Using one
// from another language"). No S3 credentials: S3 checks the URL's signature and expiry.
import { createHash } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';

async function refused(response, what) {
  const text = await response.text();
  const code = /<Code>(.*?)<\/Code>/.exec(text)?.[1] ?? '';
  const message = /<Message>(.*?)<\/Message>/.exec(text)?.[1] ?? text.slice(0, 200);
  return new Error(`S3 refused to ${what}: ${response.status} ${code}: ${message}`);
}

/** PUT `data` to an object write PAR's `put_url`, with the `put_headers` it was signed with
 * (e.g. x-amz-checksum-sha256 when the PAR pins the content) and Content-MD5, so S3 rejects a
 * body changed on the way; the returned ETag must be the MD5 too. */
export async function upload(capability, data) {
  if (!capability.put_url) throw new Error('this PAR grants no upload (no put_url)');
  const md5 = createHash('md5').update(data).digest();
  const response = await fetch(capability.put_url, {
    method: 'PUT',
    headers: { ...capability.put_headers, 'Content-MD5': md5.toString('base64') },
    body: data,
  });
  if (!response.ok) throw await refused(response, 'write the input');
  const etag = response.headers.get('etag')?.replaceAll('"', '');
  if (etag && /^[0-9a-f]{32}$/.test(etag) && etag !== md5.toString('hex')) {
    throw new Error(`S3's ETag ${etag} is not the MD5 of the bytes sent`);
  }
  return { size: data.length, sha256: createHash('sha256').update(data).digest('hex') };
}

/** GET one object of a bucket read PAR's manifest; its SHA-256 must be `expectedSha256`. */
export async function download(url, expectedSha256, name) {
  const response = await fetch(url);
  if (!response.ok) throw await refused(response, `read output ${name}`);
  const data = Buffer.from(await response.arrayBuffer());
  const sha256 = createHash('sha256').update(data).digest('hex');
  if (sha256 !== expectedSha256) {
    throw new Error(`output ${name}: SHA-256 ${sha256} differs from the ${expectedSha256} its completed event recorded`);
  }
  return data;
}

/** Download every output a bucket read PAR's `manifest` lists, each checked against the SHA-256
 * the job's `completed` event recorded for it (the two must list the same keys); written under
 * `directory` if one is given. */
export async function downloadOutputs(manifest, outputs, directory) {
  const recorded = new Map(outputs.map((output) => [output.key, output.sha256]));
  const listed = Object.keys(manifest).sort();
  if (listed.join('\n') !== [...recorded.keys()].sort().join('\n')) {
    throw new Error(`the read PAR lists ${listed.join(', ')}; the completed event ${[...recorded.keys()].join(', ')}`);
  }
  for (const key of listed) {
    // A key is relative: no empty, '.' or '..' part may climb out of the directory.
    if (key.split('/').some((part) => ['', '.', '..'].includes(part))) {
      throw new Error(`output key ${JSON.stringify(key)} is not a safe relative key`);
    }
    const data = await download(manifest[key], recorded.get(key), key);
    if (directory) {
      const path = join(directory, key);
      mkdirSync(dirname(path), { recursive: true });
      writeFileSync(path, data);
    }
  }
}
