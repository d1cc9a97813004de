// Key files, public keys and fingerprints (docs/security.md, "Key files and fingerprints").
//
// A key pair file (`parjobs keys new`) is JSON: {"kind": "parjobs-keypair", "public": {name,
// x25519, ed25519}, "protected": base64}. `protected` is a passphrase blob: a 35-byte header
// ("PJP1", log2 N, r, p, 16-byte salt, 12-byte nonce) then AES-256-GCM (ciphertext and tag) under
// scrypt(passphrase, salt, N, r, p, 32 bytes), the AAD being the header and "parjobs-keypair-v1".
// The plaintext is the 32-byte X25519 private key then the 32-byte Ed25519 seed.
import { readFileSync } from 'node:fs';
import {
  createDecipheriv, createPrivateKey, createPublicKey, scryptSync, sign, verify,
} from 'node:crypto';
import { sha256Hex, unb64 } from './wire.mjs';

const HEADER_BYTES = 4 + 3 + 16 + 12;
const KEY_FILE_AAD = Buffer.from('parjobs-keypair-v1');
// RFC 8410 PKCS#8 wrappers of a raw 32-byte private key (Ed25519, X25519).
const PKCS8 = {
  ed25519: Buffer.from('302e020100300506032b657004220420', 'hex'),
  x25519: Buffer.from('302e020100300506032b656e04220420', 'hex'),
};
const SPKI_ED25519 = Buffer.from('302a300506032b6570032100', 'hex');

/** A party's public keys ({name, x25519, ed25519} of raw base64 keys) and its fingerprint:
 * SHA-256 (hex) of the raw X25519 key followed by the raw Ed25519 key. */
export function publicKeys(data) {
  const x25519 = unb64(data.x25519);
  const ed25519 = unb64(data.ed25519);
  if (x25519.length !== 32 || ed25519.length !== 32) {
    throw new Error(`public keys of ${data.name} are not two 32-byte keys`);
  }
  return {
    name: data.name,
    x25519,
    ed25519,
    fingerprint: sha256Hex(Buffer.concat([x25519, ed25519])),
    verifying: createPublicKey({ key: Buffer.concat([SPKI_ED25519, ed25519]), format: 'der', type: 'spki' }),
  };
}

/** True if `signature` is the owner of `keys`' Ed25519 signature over `data`. */
export function verifies(keys, data, signature) {
  return signature.length === 64 && verify(null, data, keys.verifying, signature);
}

function unprotect(blob, passphrase, aad) {
  if (blob.length < HEADER_BYTES + 16 || blob.subarray(0, 4).toString() !== 'PJP1') {
    throw new Error('the key file\'s private part is not a parjobs passphrase blob');
  }
  const header = blob.subarray(0, HEADER_BYTES);
  const [log2n, r, p] = header.subarray(4, 7);
  const salt = header.subarray(7, 23);
  const nonce = header.subarray(23, 35);
  const N = 2 ** log2n;
  const key = scryptSync(passphrase, salt, 32, { N, r, p, maxmem: 256 * N * r });
  const decipher = createDecipheriv('aes-256-gcm', key, nonce);
  decipher.setAAD(Buffer.concat([header, aad]));
  decipher.setAuthTag(blob.subarray(blob.length - 16));
  try {
    return Buffer.concat([decipher.update(blob.subarray(HEADER_BYTES, blob.length - 16)), decipher.final()]);
  } catch {
    throw new Error('wrong passphrase for the key file (or the file was changed)');
  }
}

/** The user's key pair from a `parjobs keys new` file, opened with `passphrase`. */
export function loadKeyPair(path, passphrase) {
  const document = JSON.parse(readFileSync(path, 'utf8'));
  if (document.kind !== 'parjobs-keypair') throw new Error(`${path} is not a parjobs key file`);
  const secret = unprotect(unb64(document.protected), passphrase, KEY_FILE_AAD);
  if (secret.length !== 64) throw new Error('the key file\'s private part has the wrong length');
  const pub = publicKeys(document.public);
  const signing = createPrivateKey({
    key: Buffer.concat([PKCS8.ed25519, secret.subarray(32)]), format: 'der', type: 'pkcs8',
  });
  const sealing = createPrivateKey({
    key: Buffer.concat([PKCS8.x25519, secret.subarray(0, 32)]), format: 'der', type: 'pkcs8',
  });
  const rawPublic = (key) => Buffer.from(createPublicKey(key).export({ format: 'jwk' }).x, 'base64url');
  if (!rawPublic(signing).equals(pub.ed25519) || !rawPublic(sealing).equals(pub.x25519)) {
    throw new Error(`${path}: its public and private parts do not belong together`);
  }
  return {
    ...pub,
    x25519Private: secret.subarray(0, 32),
    sign: (data) => sign(null, data, signing),
  };
}

/** The operator's service keys file: {"kind": "parjobs-service-keys", "roles": {role: [public
 * keys, current first, then older ones]}} (docs/security.md, "Key files and fingerprints"). */
export function loadServiceKeys(path) {
  const document = JSON.parse(readFileSync(path, 'utf8'));
  if (document.kind !== 'parjobs-service-keys') throw new Error(`${path} is not a service keys file`);
  const roles = {};
  for (const role of ['access', 'storage', 'compute']) {
    const listed = document.roles?.[role];
    if (!Array.isArray(listed) || listed.length === 0) throw new Error(`${path} has no key for ${role}`);
    roles[role] = listed.map(publicKeys);
  }
  return roles;
}
